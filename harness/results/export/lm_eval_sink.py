"""`--to lm-eval-json`: lm-eval's results schema, one results_<date>.json per cell (lm-eval results
are per model), readable by lm-eval's own make_table."""

from __future__ import annotations

import json
import re
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from harness.errors import HarnessError
from harness.results.export.common import Exported, by_cell, epoch_ms, finite, numeric, provenance
from harness.results.records import Record
from harness.results.run_dir import RunDir

TASK_METRICS = {"acc": "acc", "acc_norm": "acc_norm", "ppl": "perplexity"}  # tasks' name -> lm-eval's name
COMPARISONS = ("recovery", "flip_rate")  # qharness-only: against the reference cell, not task results


def task_result(r: Record) -> tuple[str, str, str] | None:
    """(task, lm-eval metric, filter) of an ok per-task result: the `tasks` measurement's acc,
    acc_norm and ppl (lm-eval's `perplexity`), and whatever the `lm-eval` measurement relayed."""
    if not numeric(r):
        return None
    if r.measurement == "tasks":
        metric, _, task = r.metric.partition("@")
        return (task, TASK_METRICS[metric], "none") if task and metric in TASK_METRICS else None
    task = r.params.get("task")
    if r.measurement == "lm-eval" and isinstance(task, str) and r.metric.startswith(f"lmeval_{task}_"):
        return task, r.metric[len(f"lmeval_{task}_"):], str(r.params.get("filter") or "none")
    return None


def sanitize_model_name(name: str) -> str:
    """lm_eval.utils.sanitize_model_name (the folder lm-eval writes a model's results in)."""
    return re.sub(r"[\"<>:/|\\?*\[\]]+", "__", name)


def higher_is_better(r: Record) -> bool | None:
    """From the record's direction; a run written before directions were stamped asks the
    measurement's declaration (which imports the measurement's module)."""
    direction = r.direction
    if direction is None:
        from harness.metrics.meaning import record_spec

        spec = record_spec(r)
        direction = spec.direction if spec else 0
    return None if direction == 0 else direction > 0


def _task_keys(instances: list[tuple]) -> dict[tuple, str]:
    """Result key per task instance (task, measurement, shots, limit): the task's name, or when a
    cell has that task twice, `<task>_<measurement>_<shots>shot` (then numbered if still shared)."""
    per_task = Counter(i[0] for i in instances)
    keys = {i: i[0] if per_task[i[0]] == 1 else f"{i[0]}_{i[1]}_{i[2] or 0}shot" for i in instances}
    count, seen = Counter(keys.values()), Counter()
    for i in instances:
        if count[keys[i]] > 1:
            seen[keys[i]] += 1
            keys[i] = f"{keys[i]}_{seen[keys[i]]}"
    return keys


def lm_eval_doc(info: dict, recs: list[Record]) -> dict | None:
    """One cell's task results in lm-eval's results schema (None: the cell has none)."""
    found = [(r, t, (t[0], r.measurement, r.params.get("num_fewshot"), r.params.get("limit")))
             for r in recs if (t := task_result(r))]
    if not found:
        return None
    keys = _task_keys(list(dict.fromkeys(i for _, _, i in found)))
    doc: dict[str, Any] = {k: {} for k in ("results", "group_subtasks", "configs", "versions", "n-shot",
                                            "higher_is_better", "n-samples")}
    version = f"qharness-{provenance(info).get('harness_version') or ''}".rstrip("-")
    for r, (task, metric, flt), i in found:
        key = keys[i]
        res = doc["results"].setdefault(key, {"alias": key})
        res[f"{metric},{flt}"] = r.value
        res[f"{metric}_stderr,{flt}"] = finite(r.uncertainty) if finite(r.uncertainty) is not None else "N/A"
        doc["group_subtasks"][key] = []
        meta = {"source": r.params.get("source"), "protocol": r.protocol, "measurement": r.measurement}
        doc["configs"][key] = {"task": task, "num_fewshot": i[2], "metadata": meta}
        doc["versions"][key] = version if r.measurement == "tasks" else "N/A"
        if i[2] is not None:
            doc["n-shot"][key] = i[2]
        if (hib := higher_is_better(r)) is not None:
            doc["higher_is_better"].setdefault(key, {})[metric] = hib
        if r.n is not None:
            everything = r.params.get("subset") == "all"
            doc["n-samples"][key] = {"original": r.n if everything else None, "effective": r.n}
    return {**doc, **_lm_eval_meta(info, recs, keys)}


def _lm_eval_meta(info: dict, recs: list[Record], keys: dict[tuple, str]) -> dict:
    first, prov = recs[0], provenance(info)
    comparisons: dict[str, dict] = {}
    for r in recs:
        name, _, task = r.metric.partition("@")
        if r.measurement == "tasks" and name in COMPARISONS and numeric(r):
            c = comparisons.setdefault(task, {"reference_cell": r.params.get("reference_cell"), "of": r.params.get("of")})
            c[name], c[f"{name}_stderr"] = r.value, finite(r.uncertainty)
    limits = {i[3] for i in keys}
    model_args = f"model={first.model},backend={first.backend},variant={first.variant}"
    return {
        "config": {"model": "qharness", "model_args": model_args, "batch_size": None, "batch_sizes": [],
                   "device": first.device, "limit": limits.pop() if len(limits) == 1 else None},
        "git_hash": prov.get("git_sha"), "date": (epoch_ms(info.get("started_at")) or 0) / 1000,
        "model_source": "qharness", "model_name": first.model, "model_name_sanitized": sanitize_model_name(first.model),
        "task_hashes": {},
        "qharness": {"run_id": info.get("run_id"), "cell_id": first.cell_id, "suite": first.suite, "backend": first.backend,
                     "variant": first.variant, "variant_params": first.variant_params, "is_reference": first.is_reference,
                     "hardware_profile": first.hardware_profile, "harness_version": prov.get("harness_version"),
                     "comparisons": comparisons},
    }


def date_id(started_at: Any) -> str:
    """lm-eval's results file stamp (isoformat, ':' -> '-'), of the run's start in UTC: a run
    exported again overwrites its own files."""
    try:
        t = datetime.fromisoformat(str(started_at)).astimezone(timezone.utc).replace(tzinfo=None)
    except ValueError:
        return "unknown"
    return t.isoformat().replace(":", "-")


def to_lm_eval_json(rd: RunDir, out: str | None) -> Exported:
    info = rd.run_info()
    root = Path(out or "lm-eval-results")
    written: list[Path] = []
    for cell_id, recs in by_cell(rd.current_records()).items():
        doc = lm_eval_doc(info, recs)
        if doc is None:
            continue
        folder = root / "__".join(sanitize_model_name(x) for x in (recs[0].model, recs[0].backend, recs[0].variant))
        if any(p.parent == folder for p in written):
            folder = folder.with_name(f"{folder.name}__{cell_id}")
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"results_{date_id(info.get('started_at'))}.json"
        path.write_text(json.dumps(doc, indent=2, default=str, ensure_ascii=False))
        written.append(path)
    if not written:
        raise HarnessError(f"run '{rd.path}' has no task results (the tasks or lm-eval measurement) to export")
    return Exported(str(root), f"{len(written)} results file(s), one per cell with task results -> {root}")
