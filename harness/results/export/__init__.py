"""`harness export RUN --to SINK`: a run's current records where people already look. One small
function per sink, registered by name in SINKS (no branching on sink names); a sink's heavy library
(mlflow) is imported inside it, so a missing one costs one line, only when chosen.

- mlflow: one parent MLflow run per harness run, one nested child run per cell (params, metrics,
  status); re-exporting replaces the earlier export (found by the tag qharness.run_id).
- sqlite: llama-bench's `-o sql` shape (one table, one row per value, run-wide build_commit,
  cpu_info, gpu_info columns); appendable, a run exported twice replaces its own rows.
- lm-eval-json: lm-eval's results schema, one results_<date>.json per cell (lm-eval results are per
  model), readable by lm-eval's own make_table.
- pytest-benchmark: pytest-benchmark's JSON (timed records only).

One module per sink (mlflow_sink, sqlite_sink, lm_eval_sink, benchmark_json); common.py holds what
they all read. Adding a sink: one module with a `to_<sink>(rd, out) -> Exported` function, one line
in SINKS.

The mapping tables are in docs/EXPORTS.md."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from harness.errors import HarnessError, unknown
from harness.results.export.benchmark_json import to_pytest_benchmark
from harness.results.export.common import Exported
from harness.results.export.lm_eval_sink import to_lm_eval_json
from harness.results.export.mlflow_sink import to_mlflow
from harness.results.export.sqlite_sink import to_sqlite
from harness.results.run_dir import RunDir

SINKS: dict[str, Callable[..., Exported]] = {
    "mlflow": to_mlflow,
    "sqlite": to_sqlite,
    "lm-eval-json": to_lm_eval_json,
    "pytest-benchmark": to_pytest_benchmark,
}


def export_run(run: str | Path, to: str, out: str | None = None, *, experiment: str | None = None) -> Exported:
    """Export the run in `run` to sink `to`; every failure is one HarnessError line."""
    if to not in SINKS:
        raise unknown("export target", to, SINKS)
    if experiment is not None and to != "mlflow":
        raise HarnessError("--experiment applies to --to mlflow only")
    rd = RunDir(run)
    rd.run_info()  # not a run directory: one line, before any sink starts writing
    try:
        return SINKS[to](rd, out, **({"experiment": experiment} if experiment is not None else {}))
    except OSError as exc:
        where = exc.filename or out or "its default place"
        raise HarnessError(f"cannot write the {to} export to '{where}': {exc.strerror or exc}") from None
