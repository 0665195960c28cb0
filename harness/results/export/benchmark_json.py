"""Export a run's timed records in pytest-benchmark's JSON format, so `pytest-benchmark compare`
and the dashboards that read its files (codspeed-style uploaders, github-action-benchmark,
Jenkins/Bencher importers) take qharness perf cells as they are.

Generic over the perf contract, not over a measurement: every ok record whose params carry
`samples_s` (raw per-repeat seconds) becomes one benchmark; its statistics are computed by
pytest-benchmark's own Stats class (imported lazily: it is the format's definition, so the export
needs pytest-benchmark installed). Machine and commit info come from the run's provenance — the
machine that measured, not the one exporting."""

from __future__ import annotations

import json
from pathlib import Path

from harness.errors import HarnessError
from harness.results.export.common import Exported
from harness.results.records import Record
from harness.results.run_dir import RunDir


def _stats_class():
    try:
        from pytest_benchmark.stats import Stats
    except ImportError:
        raise HarnessError("exporting in pytest-benchmark's format needs pytest-benchmark: "
                           "pip install pytest-benchmark (or the 'test' extra)") from None
    return Stats


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("pytest-benchmark")
    except PackageNotFoundError:
        return "unknown"


def timed_records(records: list[Record]) -> list[Record]:
    out = []
    for r in records:
        samples = r.params.get("samples_s") if isinstance(r.params, dict) else None
        if r.status == "ok" and isinstance(samples, list) and samples and all(isinstance(s, (int, float)) for s in samples):
            out.append(r)
    return out


def benchmark_entry(r: Record, Stats) -> dict:
    stats = Stats()
    for s in r.params["samples_s"]:
        stats.update(float(s))
    name = f"{r.measurement}/{r.metric}[{r.backend}:{r.variant}]"
    extra = {"value": r.value, "unit": r.unit, "n": r.n, "uncertainty": r.uncertainty, "protocol": r.protocol,
             "model": r.model, "backend": r.backend, "variant": r.variant, "device": r.device,
             "hardware_profile": r.hardware_profile, "cell_id": r.cell_id, "run_id": r.run_id}
    knobs = {k: v for k, v in r.params.items() if k != "samples_s" and (v is None or isinstance(v, (str, int, float, bool)))}
    return {
        "group": f"{r.model} {r.measurement}/{r.metric}",
        "name": name,
        "fullname": f"qharness::{r.suite}::{r.model}::{name}",
        "params": {"backend": r.backend, "variant": r.variant, **r.variant_params},
        "param": f"{r.backend}:{r.variant}",
        "extra_info": {**extra, "params": knobs},
        "options": {"disable_gc": False, "timer": "qharness (per-repeat seconds in params.samples_s)",
                    "min_rounds": len(r.params["samples_s"]), "max_time": None, "min_time": None,
                    "precision": None, "confidence": None, "warmup": r.params.get("warmup", False)},
        "stats": {**stats.as_dict(), "data": list(stats.data), "iterations": 1},
    }


def _machine_info(info: dict) -> dict:
    prov = info.get("provenance") if isinstance(info.get("provenance"), dict) else {}
    platform = str(prov.get("platform") or "")
    return {
        "node": prov.get("hostname") or "unknown",
        "processor": prov.get("cpu") or "",
        "machine": info.get("device_name") or prov.get("device") or "",
        "python_implementation": "CPython",
        "python_version": prov.get("python") or "",
        "release": platform,
        "system": platform.split("-", 1)[0] or "unknown",
        "cpu": {"brand_raw": prov.get("cpu") or "", "count": prov.get("cpu_count")},
        "gpu": prov.get("gpu"),
        "hardware_profile": info.get("hardware_profile", "unknown"),
    }


def _commit_info(info: dict) -> dict:
    prov = info.get("provenance") if isinstance(info.get("provenance"), dict) else {}
    sha = str(prov.get("git_sha") or "unknown")
    return {"id": sha.removesuffix("-dirty"), "time": info.get("started_at"), "author_time": None,
            "dirty": sha.endswith("-dirty"), "project": "qharness", "branch": info.get("git_branch") or "(unknown)"}


def export_benchmarks(run: str | Path, out: str | Path) -> tuple[Path, int]:
    """Write the run's timed records to `out` (pytest-benchmark JSON); returns (path, count).
    A run without timed records is an error: an empty export would silently pass a dashboard."""
    rd = RunDir(run)
    info = rd.run_info()
    recs = timed_records(rd.current_records())
    if not recs:
        raise HarnessError(f"run '{rd.path}' has no timed records (ok records with params.samples_s) to export")
    Stats = _stats_class()
    doc = {
        "machine_info": _machine_info(info),
        "commit_info": _commit_info(info),
        "benchmarks": [benchmark_entry(r, Stats) for r in recs],
        "datetime": info.get("finished_at") or info.get("started_at") or "",
        "version": _version(),
    }
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2, default=str))
    return out, len(recs)


def to_pytest_benchmark(rd: RunDir, out: str | None) -> Exported:
    path, n = export_benchmarks(rd.path, out or f"{rd.run_info()['run_id']}.benchmark.json")
    return Exported(str(path), f"{n} benchmark(s) -> {path} (read with: pytest-benchmark compare {path})")
