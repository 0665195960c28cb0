"""The `harness` command line. Every user error ends as one line on stderr and a non-zero exit."""

from __future__ import annotations

import sys
from enum import Enum
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from harness.adapters import BACKENDS, get_adapter
from harness.cli.base import EXIT_USER_ERROR, app, console, err_console, user_errors  # noqa: F401 - EXIT_USER_ERROR is part of the CLI's API
from harness.cli.run_view import LOG_WIDTH, failure_lines, progress_events, summary_table
from harness.errors import HarnessError
from harness.models.zoo import quiet_libraries
from harness.reports.static_figures import check_formats


class ListWhat(str, Enum):
    suites = "suites"
    backends = "backends"
    models = "models"
    measurements = "measurements"
    corpora = "corpora"


STATIC_HELP = "also write every figure as svg, png or pdf under RUN/figures/ (repeatable; needs kaleido and Chromium)"


@app.command()
def run(
    suite: str = typer.Option(..., "--suite", "-s", help="built-in suite name or path to a suite YAML"),
    model: Optional[list[str]] = typer.Option(None, "--model", "-m", help="run on this model instead of the suite's (repeatable)"),
    backend: Optional[list[str]] = typer.Option(None, "--backend", "-b", help="only this backend of the suite (repeatable)"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="run directory (default: runs/<suite>-<time>)"),
    resume: bool = typer.Option(False, "--resume", help="continue the run in --out, skipping finished cells"),
    device: Optional[str] = typer.Option(None, "--device", help="auto, cpu or cuda (default: the suite's)"),
    executor: str = typer.Option("local", "--executor", help="local (one process per cell, here) or ray (cells as Ray tasks)"),
    address: Optional[str] = typer.Option(None, "--address", help="ray: 'auto' or 'ray://host:port' of a running cluster (default: a local Ray instance)"),
    allow_failed_cells: bool = typer.Option(False, "--allow-failed-cells", help="exit 0 even if cells failed (a skipped cell never fails the run)"),
    static: Optional[list[str]] = typer.Option(None, "--static", help=STATIC_HELP),
    reference_from: Optional[Path] = typer.Option(None, "--reference-from", help="reuse the finished reference cells of this run (same suite settings, same model files: checked by hash) instead of running them"),
):
    """Run a suite: every model x backend variant in its own process, then write the HTML report.
    Exits 1 if a cell failed (unless --allow-failed-cells) or a gate failed, 2 on bad input."""
    # lazy: CLI start-up stays free of pydantic, yaml
    from harness.run.runner import run_suite
    from harness.run.suite import load_suite

    with user_errors():
        if device not in (None, "auto", "cpu", "cuda"):
            raise HarnessError(f"unknown device '{device}' (choose from: auto, cpu, cuda)")
        if resume and out is None:
            raise HarnessError("--resume needs --out RUN_DIR (the run to continue)")
        from harness.reports.static_figures import check_formats

        formats = check_formats(tuple(static or ()))
        spec = load_suite(suite)
        from harness.run.executor import EXECUTORS

        if address and executor != "ray":
            raise HarnessError("--address is for --executor ray")
        runner = EXECUTORS.get(executor)(**({"address": address} if executor == "ray" else {}))
        result = _run_with_progress(run_suite, spec, out, model, backend, device, resume, runner, reference_from, formats)
        _print_summary(result.run_dir)
        if result.report:
            console.print(f"report: {result.report}", highlight=False, soft_wrap=True)
        else:
            err_console.print(f"report failed ({result.report_error}); records are safe in {result.run_dir.path}", highlight=False, soft_wrap=True)
        failures = failure_lines(result.run_dir)
        if failures:
            err_console.print(f"{len(failures)} cell(s) failed (whole reasons: report, records.jsonl, cells/<id>/worker.log):",
                              highlight=False, soft_wrap=True, markup=False)
            for line in failures:
                err_console.print(f"  {line}", highlight=False, soft_wrap=True, markup=False)
        gates_failed = bool(result.gates) and not all(g.passed for g in result.gates)
        if result.gates:
            _print_gates(result.gates)
        if gates_failed or (failures and not allow_failed_cells):
            raise typer.Exit(1)


def _print_gates(gates) -> None:
    table = Table(title="gates")
    for col in ("gate", "cell", "verdict", "detail"):
        table.add_column(col, overflow="fold")
    for g in gates:
        table.add_row(g.gate, g.cell, "[green]pass[/]" if g.passed else "[red]FAIL[/]", g.detail)
    console.print(table)


def _run_with_progress(run_suite, spec, out, model, backend, device, resume, executor=None, reference_from=None, static=()):
    with progress_events(err_console, "planning (first use converts the embedded model, ~1 min)") as on_event:
        return run_suite(spec, out=out, models=model, backends=backend, device=device, resume=resume, executor=executor,
                         on_event=on_event, reference_from=reference_from, static=static)


def _print_summary(run_dir) -> None:
    terminal = console.is_terminal
    out = console if terminal else Console(width=LOG_WIDTH, file=console.file, color_system=None)
    out.print(summary_table(run_dir, terminal))


@app.command("list")
def list_(what: ListWhat = typer.Argument(..., help="suites, backends, models, measurements or corpora")):
    """List what can be named in a suite."""
    with user_errors():
        table = Table()
        if what is ListWhat.suites:
            from harness.run.suite import builtin_suites, load_suite

            table.add_column("suite")
            table.add_column("description")
            for name in sorted(builtin_suites()):
                table.add_row(name, load_suite(name).description)
        elif what is ListWhat.backends:
            from harness.adapters import BACKENDS, get_adapter

            table.add_column("backend")
            table.add_column("description")
            table.add_column("variant knobs")
            for name in BACKENDS.names():
                try:
                    adapter = get_adapter(name)
                    table.add_row(name, adapter.description, ", ".join(adapter.Variant.model_fields))
                except HarnessError as exc:
                    table.add_row(name, f"(cannot load: {exc})", "")
        elif what is ListWhat.models:
            from harness.models.zoo import model_names

            table.add_column("model")
            for name in model_names():
                table.add_row(name)
            table.caption = "also: a local Hugging Face folder, or a hub id when a hub is reachable"
        elif what is ListWhat.measurements:
            from harness.metrics import MEASUREMENTS, get_measurement

            table.add_column("measurement")
            table.add_column("parameters")
            for name in MEASUREMENTS.names():
                table.add_row(name, ", ".join(get_measurement(name).Params.model_fields))
        else:
            from harness.models.corpora import corpus_names

            table.add_column("corpus")
            for name in corpus_names():
                table.add_row(name)
            table.caption = "also: file:PATH (a text file; documents separated by blank lines)"
        console.print(table)


@app.command()
def report(run_dir: Path = typer.Argument(..., help="a run directory"),
           static: Optional[list[str]] = typer.Option(None, "--static", help=STATIC_HELP)):
    """(Re)write report.html for a run directory."""
    # lazy: CLI start-up stays free of jinja2, markupsafe, pandas, plotly, pydantic
    from harness.reports.html import write_report
    from harness.results.run_dir import RunDir

    with user_errors():
        formats = check_formats(tuple(static or ()))
        rd = RunDir(run_dir)
        rd.run_info()
        rd.records()
        console.print(f"report: {write_report(run_dir, static=formats)}", highlight=False, soft_wrap=True)


@app.command()
def env(device: str = typer.Option("auto", help="device to check backends against: auto, cpu or cuda")):
    """Device, hardware profile, versions, and every backend's availability (or why not)."""
    # lazy: CLI start-up stays free of importlib.metadata, pydantic, yaml
    from harness import hardware
    from harness.results import provenance
    from harness.run.planner import resolve_device

    with user_errors():
        dev = resolve_device(device)
        profile, name = hardware.detect(dev)
        prov = provenance.collect(dev)
        console.print(f"device: {dev} ({name}); hardware profile: {profile}", highlight=False, soft_wrap=True)
        console.print(hardware.describe(hardware.profiles().get(profile)), highlight=False, soft_wrap=True)
        console.print(f"harness {prov['harness_version']} ({prov['git_sha']}), python {prov['python']}, {prov['platform']}",
                      highlight=False, soft_wrap=True)
        if prov.get("gpu"):
            console.print(f"gpu: {prov['gpu']}, driver {prov.get('driver')}", highlight=False, soft_wrap=True)
        versions = Table(title="libraries")
        versions.add_column("package")
        versions.add_column("version")
        for pkg, ver in prov["versions"].items():
            versions.add_row(pkg, ver)
        console.print(versions)
        backends = Table(title=f"backends on {dev}")
        backends.add_column("backend")
        backends.add_column("status")
        notes: list[str] = []
        for bname in BACKENDS.names():
            try:
                adapter = get_adapter(bname)
                avail = adapter.availability(dev)
                status = "available" if avail.ok else avail.reason
                if avail.ok:
                    notes += adapter.environment_notes(dev)
            except HarnessError as exc:
                status = f"broken: {exc}"
            backends.add_row(bname, status)
        console.print(backends)
        for line in notes:
            console.print(line, highlight=False, soft_wrap=True, markup=False)



from harness.cli import ci_commands  # noqa: E402,F401 - registers compare / check / export on app, after run/list/report/env


def main() -> None:
    quiet_libraries()
    try:
        app()
    except SystemExit:
        raise
    except Exception as exc:  # noqa: BLE001 - last resort: a bug still prints one line, log has details
        err_console.print(f"internal error: {type(exc).__name__}: {exc} (please report; set QHARNESS_DEBUG=1 for a traceback)",
                          highlight=False, soft_wrap=True)
        import os

        if os.environ.get("QHARNESS_DEBUG"):
            raise
        sys.exit(1)


if __name__ == "__main__":
    main()
