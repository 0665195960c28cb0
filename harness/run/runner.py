"""Run a suite: plan, execute each cell in isolation, append its records as it finishes, report.

The driver is the only writer of the run directory. Resuming skips every cell that has a final
'cell' record with status ok; failed, skipped and unfinished cells run again."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from harness import hardware
from harness.ci.gates import evaluate
from harness.errors import HarnessError
from harness.results import provenance
from harness.run.executor import CellOutcome, LocalExecutor
from harness.results.records import CellIdentity, Record, utc_now
from harness.results.run_dir import RunDir
from harness.run.planner import plan as make_plan
from harness.run.suite import CellSpec, Suite


@dataclass
class RunResult:
    run_dir: RunDir
    ran: int
    skipped_done: int
    failed: int
    report: Path | None
    report_error: str | None = None
    gates: list | None = None


def default_out(suite: Suite) -> Path:
    return Path("runs") / f"{suite.name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def finished_cells(run_dir: RunDir) -> set[str]:
    return {r.cell_id for r in run_dir.current_records() if r.measurement == "cell" and r.status == "ok"}


def cell_records(cell: CellSpec, run_id: str, hardware_profile: str, outcome: CellOutcome,
                 attempt: int = 1) -> list[Record]:
    identity = {
        **cell.model_dump(include=set(CellIdentity.model_fields)),
        "hardware_profile": hardware_profile, "run_id": run_id, "attempt": attempt,
    }
    records = [Record(**identity, **value, provenance={}) for value in outcome.values]
    records.append(Record(
        **identity, measurement="cell", metric="duration_s", value=outcome.duration_s, unit="s", n=1, direction=0, kind="bookkeeping",
        status=outcome.status, error=outcome.error, provenance=outcome.provenance,
    ))
    return records


def _check_writable(path: Path) -> None:
    probe = path
    while not probe.exists():
        probe = probe.parent
    import os

    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise HarnessError(f"output directory '{path}' is not writable")


def prepare_run_dir(out: Path, resume: bool) -> tuple[RunDir, dict | None]:
    """The run directory and, when resuming, its existing run info (validated)."""
    run_dir = RunDir(out)
    _check_writable(out)
    if run_dir.exists():
        if not resume:
            raise HarnessError(f"'{out}' already holds a run: pass --resume to continue it, or choose another --out")
        info = run_dir.run_info()
        run_dir.records()  # corruption is reported now, before any work
        return run_dir, info
    if out.exists() and any(out.iterdir()) and resume:
        raise HarnessError(f"cannot resume: '{out}' is not a run directory (no run.json)")
    return run_dir, None


# what a resumed run must share with the run it continues: another name, reference, models or
# measurements would mix incomparable cells into one record set (editing, adding or removing
# backend variants is fine: cells are identified by their own parameters)
RESUME_KEYS = ("name", "models", "reference", "measurements", "calibration")


def check_same_suite(stored, suite: Suite, out: Path) -> None:
    """One line naming the first of RESUME_KEYS that differs from the suite the run started with."""
    if not isinstance(stored, dict):
        raise HarnessError(f"cannot resume '{out}': its run.json holds no suite")
    current = suite.model_dump(mode="json")
    for key in RESUME_KEYS:
        if stored.get(key) != current.get(key):
            raise HarnessError(f"cannot resume '{out}': it was started with another suite ('{key}' differs: "
                               f"{_short(stored.get(key))} there, {_short(current.get(key))} now); resume with the "
                               "suite it ran, or choose another --out")


def _short(value, limit: int = 60) -> str:
    import json

    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def stored_references(the_plan, reference_from: Path) -> dict[str, list[Record]]:
    """Reference cell id -> its records in run `reference_from`, for every reference cell of the
    plan. The cell must have finished there with the same identity (model, backend, variant,
    device, measurements: the cell id is their hash) on the same model (the model fingerprint:
    a hash of its files); anything else is one line, before any model loads."""
    other = RunDir(reference_from)
    info = other.run_info()
    records = other.current_records()
    found = {}
    for cell in (c for c in the_plan.cells if c.is_reference):
        mine = [r for r in records if r.cell_id == cell.cell_id]
        if not any(r.measurement == "cell" and r.status == "ok" for r in mine):
            raise HarnessError(f"--reference-from {reference_from}: it has no finished reference cell "
                               f"{cell.backend}:{cell.variant} of model {cell.model} with this suite's measurements and "
                               "device (run it with the same suite, or without --reference-from)")
        there = (info.get("models") or {}).get(cell.model, {}).get("fingerprint")
        here = the_plan.models.get(cell.model, {}).get("fingerprint")
        if there != here:
            raise HarnessError(f"--reference-from {reference_from}: model {cell.model} is not the one that run used "
                               f"(fingerprint {str(here)[:12]} here, {str(there)[:12]} there)")
        found[cell.cell_id] = mine
    return found


def reuse_reference(run_dir: RunDir, cell: CellSpec, records: list[Record], source: Path, run_id: str) -> CellOutcome:
    """Copy a finished reference cell (its stored NLLs, log-probabilities, continuations and
    records) from another run into this one, instead of running it."""
    import shutil

    shutil.copytree(Path(source) / "cells" / cell.cell_id, run_dir.cell_dir(cell.cell_id), dirs_exist_ok=True)
    origin = {"run": str(Path(source).resolve()), "run_id": records[0].run_id}
    copied = [r.model_copy(update={"run_id": run_id, "suite": cell.suite, "attempt": 1,
                                   "provenance": {**r.provenance, "reused_from": origin} if r.measurement == "cell"
                                   else r.provenance}) for r in records]
    run_dir.append(copied)
    cell_record = next(r for r in copied if r.measurement == "cell")
    return CellOutcome("ok", provenance=cell_record.provenance, duration_s=0.0)


def run_suite(
    suite: Suite,
    out: Path | None = None,
    models: list[str] | None = None,
    backends: list[str] | None = None,
    device: str | None = None,
    resume: bool = False,
    executor=None,
    on_event: Callable[[str, dict], None] | None = None,
    reference_from: Path | None = None,
    static: tuple[str, ...] = (),
) -> RunResult:
    """Plan and run `suite`. `on_event(kind, data)` receives planned/cell_start/progress/cell_end.
    `reference_from`: a run whose finished reference cells (same cell, same model files) are
    copied in instead of being run again. `static`: formats for static copies of the report's
    figures (reports.static_figures)."""
    emit = on_event or (lambda kind, data: None)
    out = Path(out) if out else default_out(suite)
    run_dir, previous = prepare_run_dir(out, resume)
    if previous is not None:
        check_same_suite(previous.get("suite"), suite, out)
    executor = executor or LocalExecutor()
    executor.warm_up(device or suite.device)  # e.g. the first worker starts while the driver plans
    try:
        the_plan = make_plan(suite, models=models, backends=backends, device=device)
        reused = stored_references(the_plan, Path(reference_from)) if reference_from else {}
        info, profile = _write_run_info(run_dir, suite, the_plan, previous, reference_from)

        done = finished_cells(run_dir) if previous else set()
        attempts: dict[str, int] = {}
        for r in run_dir.records() if previous else []:
            attempts[r.cell_id] = max(attempts.get(r.cell_id, 0), r.attempt)
        todo = [c for c in the_plan.cells if c.cell_id not in done]
        emit("planned", {"run_dir": run_dir.path, "total": len(the_plan.cells), "todo": len(todo),
                         "done": len(the_plan.cells) - len(todo), "device": the_plan.device, "profile": profile})
        todo, failed = _run_cells(the_plan, todo, reused, run_dir, info["run_id"], attempts, profile, executor, emit,
                                  reference_from)
    finally:
        executor.close()

    gate_results, report, report_error = _finish_run(suite, run_dir, info, static)
    return RunResult(run_dir, len(todo), len(the_plan.cells) - len(todo), failed, report, report_error, gate_results)


def _write_run_info(run_dir: RunDir, suite: Suite, the_plan, previous: dict | None, reference_from: Path | None):
    """run.json for a new run, or updated for a resumed one (its run id and start kept). Returns
    (the run info, the hardware profile)."""
    profile, device_name = hardware.detect(the_plan.device)
    run_id = previous["run_id"] if previous else f"{suite.name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    info = {
        "run_id": run_id,
        "suite": suite.model_dump(mode="json"),
        "started_at": previous.get("started_at") if previous else utc_now(),
        "resumed_at": [*previous.get("resumed_at", []), utc_now()] if previous else [],
        "hardware_profile": profile,
        "device_name": device_name,
        "provenance": provenance.collect(the_plan.device),
        "models": the_plan.models,
        "cells": [c.model_dump(mode="json") for c in the_plan.cells],
        **({"reference_from": str(Path(reference_from).resolve())} if reference_from else {}),
    }
    if previous is None:
        run_dir.create(info)
    else:
        run_dir.write_run_info(info)
    return info, profile


def _run_cells(the_plan, todo: list[CellSpec], reused: dict, run_dir: RunDir, run_id: str, attempts: dict[str, int],
               profile: str, executor, emit, reference_from: Path | None) -> tuple[list[CellSpec], int]:
    """The cells still to do: reused reference cells copied in, unavailable ones recorded as skipped,
    the rest run by the executor; each cell's records are written as it finishes. Returns (the cells
    this run had to do, reused ones left out; how many failed)."""
    failed = 0

    def finish(cell: CellSpec, outcome: CellOutcome) -> None:
        nonlocal failed
        run_dir.append(cell_records(cell, run_id, outcome.hardware_profile or profile, outcome,
                                    attempts.get(cell.cell_id, 0) + 1))
        failed += outcome.status == "failed"
        emit("cell_end", {"cell": cell, "outcome": outcome})

    for cell in [c for c in todo if c.cell_id in reused]:
        emit("cell_start", {"cell": cell})
        emit("cell_end", {"cell": cell, "outcome": reuse_reference(run_dir, cell, reused[cell.cell_id], reference_from, run_id)})
    todo = [c for c in todo if c.cell_id not in reused]
    runnable = [c for c in todo if c.cell_id not in the_plan.unavailable]
    executor.prepare(runnable, profile)  # e.g. connect to Ray, check the cluster can run them
    for cell in todo:  # unavailable cells cost nothing: recorded as skipped first
        if cell.cell_id in the_plan.unavailable:
            emit("cell_start", {"cell": cell})
            finish(cell, CellOutcome("skipped", error=f"unavailable: {the_plan.unavailable[cell.cell_id]}"))
    # the executor yields each cell as it finishes (in any order); its records are written right then
    for cell, outcome in executor.run_many(
            runnable, run_dir.cell_dir, on_start=lambda c: emit("cell_start", {"cell": c}),
            progress=lambda c, d, t, w: emit("progress", {"cell": c, "done": d, "total": t, "what": w})):
        finish(cell, outcome)
    return todo, failed


def _finish_run(suite: Suite, run_dir: RunDir, info: dict, static: tuple[str, ...]):
    """The suite's gates, the finish time in run.json, then the report (a report failure is
    returned, not raised: the records are safe). Returns (gate results, report path, report error)."""
    gate_results = evaluate(suite.gates, run_dir.current_records())
    info["finished_at"] = utc_now()
    info["gates"] = [vars(g) for g in gate_results]
    run_dir.write_run_info(info)
    report, report_error = None, None
    try:
        from harness.reports.html import write_report

        report = write_report(run_dir.path, static=static)
    except Exception as exc:  # noqa: BLE001 - a report bug must not cost the measured results
        report_error = f"{type(exc).__name__}: {exc}"
    return gate_results, report, report_error
