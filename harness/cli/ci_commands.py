"""CLI commands for CI: `harness compare`, `harness check`, `harness export`, `harness export-benchmark`.
Registered on the main app (harness.cli.main imports this module), kept apart so the run commands stay readable."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from rich.table import Table

from harness.cli.base import app, console, err_console, user_errors
from harness.errors import HarnessError

Z_HELP = "standard errors a difference must exceed to count (noise is not a regression)"


def _base(base: Optional[Path], runs_root: Optional[Path], base_ref: Optional[str], cand: Path, what: str) -> Optional[Path]:
    """BASE as given, or found under --runs-root by --base-ref (git sha) + the candidate's profile."""
    # lazy: CLI start-up stays free of numpy, pydantic
    from harness.ci.compare import resolve_base

    if base is not None and base_ref is not None:
        raise HarnessError(f"give {what} either as a run directory or as --base-ref REF, not both")
    if base_ref is not None:
        if runs_root is None:
            raise HarnessError("--base-ref needs --runs-root DIR (where runs are kept)")
        rd = resolve_base(runs_root, base_ref, cand)
        err_console.print(f"{what}: {rd.path} ({base_ref})", highlight=False, soft_wrap=True, markup=False)
        return rd.path
    return base


@app.command()
def compare(
    runs: list[Path] = typer.Argument(..., help="BASE_RUN CAND_RUN, or only CAND_RUN with --runs-root/--base-ref"),
    html: Optional[Path] = typer.Option(None, "--html", help="write a self-contained HTML comparison here"),
    markdown: Optional[Path] = typer.Option(None, "--markdown", help="write a markdown summary (PR comment) here"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="write every delta as JSON here"),
    runs_root: Optional[Path] = typer.Option(None, "--runs-root", help="directory of runs to find the base in"),
    base_ref: Optional[str] = typer.Option(None, "--base-ref", help="git ref of the base run (e.g. main): the latest "
                                           "run under --runs-root at that commit, same suite and hardware profile"),
    z: float = typer.Option(2.0, "--z", help=Z_HELP),
    min_change: float = typer.Option(0.0, "--min-change", help="relative change below which a significant delta still "
                                     "counts as unchanged (e.g. 0.02 for speed on shared machines)"),
    fail_on_regression: bool = typer.Option(False, "--fail-on-regression", help="exit 1 if anything regressed"),
    show_all: bool = typer.Option(False, "--all", help="print unchanged values too"),
):
    """Compare two runs cell by cell: deltas with significance, regressions and improvements flagged."""
    import json

    # lazy: CLI start-up stays free of numpy, pydantic
    from harness.ci.compare import QUIET, compare_runs, fmt_delta, fmt_value
    from harness.ci.compare import markdown as to_markdown

    with user_errors():
        if len(runs) > 2 or (len(runs) == 1) != (base_ref is not None):
            raise HarnessError("give BASE_RUN CAND_RUN, or only CAND_RUN with --runs-root DIR --base-ref REF")
        base, cand = (None, runs[0]) if len(runs) == 1 else runs
        base = _base(base, runs_root, base_ref, cand, "base")
        cmp = compare_runs(base, cand, z=z, min_change=min_change)
        for w in cmp.warnings:
            err_console.print(f"warning: {w}", highlight=False, soft_wrap=True, markup=False)
        table = Table(title=escape(f"{cmp.base['run_id']} -> {cmp.cand['run_id']}"))
        for col in ("verdict", "cell", "metric", "base", "candidate", "delta"):
            table.add_column(col, overflow="fold")
        style = {"regression": "red", "failed": "red", "improvement": "green", "recovered": "green", "changed": "yellow"}
        for d in cmp.deltas:
            if show_all or d.verdict not in QUIET:
                v = f"[{style[d.verdict]}]{d.verdict}[/]" if d.verdict in style else d.verdict
                table.add_row(v, escape(f"{d.model} {d.cell}"), escape(f"{d.measurement}/{d.metric}"),
                              fmt_value(d.base, d.base_sigma), fmt_value(d.cand, d.cand_sigma), escape(fmt_delta(d)))
        console.print(table)
        quiet = sum(d.verdict in QUIET for d in cmp.deltas)
        console.print(f"{len(cmp.regressions)} regression(s), {len(cmp.improvements)} improvement(s), "
                      f"{quiet} unchanged or within noise (z > {z:g})", highlight=False, soft_wrap=True, markup=False)
        if markdown:
            markdown.write_text(to_markdown(cmp))
            console.print(f"markdown: {markdown}", highlight=False, soft_wrap=True, markup=False)
        if json_out:
            json_out.write_text(json.dumps(cmp.to_json(), indent=2, default=str))
        if html:
            from harness.reports.compare_html import write_compare_html

            console.print(f"html: {write_compare_html(cmp, html)}", highlight=False, soft_wrap=True, markup=False)
    if fail_on_regression and cmp.regressions:
        raise typer.Exit(1)


@app.command()
def check(
    run: Path = typer.Argument(..., help="the run directory to judge"),
    baseline: Optional[Path] = typer.Option(None, "--baseline", help="baseline run for the *_baseline_ratio gates"),
    runs_root: Optional[Path] = typer.Option(None, "--runs-root", help="directory of runs to find the baseline in"),
    base_ref: Optional[str] = typer.Option(None, "--base-ref", help="git ref of the baseline (e.g. main), found "
                                           "under --runs-root by git sha, suite and hardware profile"),
    gates_file: Optional[Path] = typer.Option(None, "--gates", help="YAML with gates (a list, or a suite with gates:) "
                                              "instead of the run's suite gates"),
    junit: Optional[Path] = typer.Option(None, "--junit", help="write JUnit XML here"),
    z: float = typer.Option(2.0, "--z", help=Z_HELP + "; 0: plain comparisons"),
    allow_failed_cells: bool = typer.Option(False, "--allow-failed-cells", help="a failed cell is not a violation"),
):
    """Judge a run against its suite's gates (noise-aware); exit 1 on a violation, with JUnit XML."""
    # lazy: CLI start-up stays free of numpy, pydantic, yaml
    from harness.ci.check import check_run, junit_properties
    from harness.ci.junit import write_junit

    with user_errors():
        baseline = _base(baseline, runs_root, base_ref, run, "baseline")
        res = check_run(run, baseline, z=z, gates_file=gates_file, allow_failed_cells=allow_failed_cells)
        table = Table(title=escape(f"gates of {res.run['run_id']}" + (f" vs baseline {res.baseline['run_id']}" if res.baseline else "")))
        for col in ("gate", "cell", "verdict", "detail"):
            table.add_column(col, overflow="fold")
        for g in res.results:
            verdict = ("[red]FAIL[/]" if not g.passed else "skip" if g.skipped
                       else "[green]pass[/] (noise)" if "within noise" in g.detail else "[green]pass[/]")
            table.add_row(escape(g.gate), escape(g.cell), verdict, escape(g.detail))
        console.print(table)
        if junit:
            write_junit(junit, res.results, str(res.run["suite"]), junit_properties(res, z), res.seconds)
            console.print(f"junit: {junit}", highlight=False, soft_wrap=True, markup=False)
        for g in res.failed:
            err_console.print(f"FAIL {g.gate} [{g.cell}]: {g.detail}", highlight=False, soft_wrap=True, markup=False)
        n = len(res.results)
        if res.failed:
            err_console.print(f"{len(res.failed)} of {n} gate check(s) failed", highlight=False, soft_wrap=True, markup=False)
        else:
            console.print(f"all {n} gate check(s) passed", highlight=False, soft_wrap=True, markup=False)
    if res.failed:
        raise typer.Exit(1)


@app.command("export-benchmark")
def export_benchmark(
    run: Path = typer.Argument(..., help="a run directory"),
    out: Path = typer.Argument(..., help="JSON file to write (pytest-benchmark format)"),
):
    """Export the run's timed records (params.samples_s) as pytest-benchmark JSON."""
    # lazy: CLI start-up stays free of pydantic
    from harness.results.export.benchmark_json import export_benchmarks

    with user_errors():
        path, n = export_benchmarks(run, out)
        console.print(f"{n} benchmark(s) -> {path} (read with: pytest-benchmark compare {path})", highlight=False, soft_wrap=True, markup=False)


@app.command("export")
def export(
    run: Path = typer.Argument(..., help="a run directory"),
    to: str = typer.Option(..., "--to", help="mlflow, sqlite, lm-eval-json or pytest-benchmark (docs/EXPORTS.md)"),
    out: Optional[str] = typer.Option(None, "--out", help="mlflow: tracking URI, or local folder for mlflow.db + mlruns/ "
                                      "(default: $MLFLOW_TRACKING_URI, else .); sqlite: "
                                      "database file (./qharness.sqlite); lm-eval-json: folder (./lm-eval-results); "
                                      "pytest-benchmark: JSON file (./RUN_ID.benchmark.json)"),
    experiment: Optional[str] = typer.Option(None, "--experiment", help="mlflow: experiment name (default: the suite's name)"),
):
    """Export the run's current records to MLflow, an SQLite file, lm-eval results JSON or pytest-benchmark JSON."""
    # lazy: CLI start-up stays free of pydantic
    from harness.results.export import export_run

    with user_errors():
        done = export_run(run, to, out, experiment=experiment)
        console.print(done.summary, highlight=False, soft_wrap=True, markup=False)
