"""qharness: which quantization backend and bit-width gives the best quality per byte and per
second on this hardware. Importing the package never imports an optional backend (nor pandas)."""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["__version__", "load_run"]


def load_run(path, all_attempts: bool = False):
    """A run directory's records as a pandas DataFrame, one row per metric value: the documented
    entry point for notebooks (`harness.load_run("runs/llm-int4-...")`).

    By default the run's current records (for each cell of the current plan, its latest attempt:
    what reports and gates read); `all_attempts=True` gives every line of records.jsonl, earlier
    attempts of resumed cells included. Columns (harness.results.records.Record, in this order):

    - cell identity: cell_id, suite, model, backend, variant, variant_params (dict), device,
      hardware_profile, is_reference; run_id, attempt;
    - the value: measurement, metric (e.g. perplexity / ppl, tasks / acc@boolq), value (float, NaN
      where none), unit, n (samples behind it), uncertainty, uncertainty_kind ("stderr" unless
      stated), protocol, params (dict: corpus, seq_len, task, ...);
    - its meaning: direction (+1 higher is better, -1 lower, 0 neither), kind (quality, size, speed,
      cost, diagnostic, bookkeeping);
    - status ("ok", "failed", "skipped"), error, provenance (dict, on the `cell` record), time (ISO).

    Raises harness.errors.HarnessError when `path` is not a run directory (no run.json) or its
    records are corrupt. pandas is imported here, not by `import harness`."""
    # lazy: `import harness` stays free of pydantic
    from harness.results.run_dir import RunDir, load_records

    RunDir(path).run_info()
    return load_records(path, all_attempts=all_attempts)
