"""`harness export RUN --to SINK`: a run's current records where people already look. One small
function per sink, registered by name in SINKS (no branching on sink names); a sink's heavy library
(mlflow) is imported inside it, so a missing one costs one line, only when chosen.

- mlflow: one parent MLflow run per harness run, one nested child run per cell (params, metrics,
  status); re-exporting replaces the earlier export (found by the tag qharness.run_id).
- sqlite: llama-bench's `-o sql` shape (one table, one row per value, run-wide build_commit,
  cpu_info, gpu_info columns); appendable, a run exported twice replaces its own rows.
- lm-eval-json: lm-eval's results schema, one results_<date>.json per cell (lm-eval results are per
  model), readable by lm-eval's own make_table.
- pytest-benchmark: harness.results.export.benchmark_json (timed records only).

The mapping tables are in docs/EXPORTS.md."""

from __future__ import annotations

import json
import logging
import math
import os
import re
import sqlite3
from collections import Counter
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from harness.errors import HarnessError, unknown
from harness.results.records import RECORD_COLUMNS, Record, measurement_instance
from harness.results.run_dir import RunDir


@dataclass(frozen=True)
class Exported:
    where: str  # the file, folder or tracking URI written
    summary: str  # one line for the CLI


# -- what every sink reads ------------------------------------------------------------------
def provenance(info: dict) -> dict:
    p = info.get("provenance")
    return p if isinstance(p, dict) else {}


def suite_name(info: dict) -> str:
    s = info.get("suite")
    return str(s.get("name") if isinstance(s, dict) else s or "qharness")


def by_cell(records: list[Record]) -> dict[str, list[Record]]:
    """Records grouped by cell, in the order the run wrote them."""
    out: dict[str, list[Record]] = {}
    for r in records:
        out.setdefault(r.cell_id, []).append(r)
    return out


def cell_status(recs: list[Record]) -> tuple[str, str | None]:
    """(status, error) of a cell: its `cell` record's (ok when it has none)."""
    cell = [r for r in recs if r.measurement == "cell"]
    return (cell[-1].status, cell[-1].error) if cell else ("ok", None)


def numeric(r: Record) -> bool:
    return r.status == "ok" and r.value is not None and math.isfinite(r.value)


def finite(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


def epoch_ms(iso: Any) -> int | None:
    try:
        return int(datetime.fromisoformat(str(iso)).timestamp() * 1000)
    except ValueError:
        return None


# -- mlflow -----------------------------------------------------------------------------------
def mlflow_key(name: str) -> str:
    """A name MLflow accepts on every OS: alphanumerics, _ - . space and /, no empty or dot-only
    path segments, at most 250 characters (mlflow.utils.validation)."""
    name = re.sub(r"[^/\w.\- ]", "_", name)
    parts = [p if p.strip(".") else "_" for p in name.split("/") if p]
    return "/".join(parts)[:250] or "_"


def instance_path(r: Record) -> str:
    """'gptq/lambada': the record's measurement instance (protocol|corpus) as name segments."""
    return "/".join(part for part in measurement_instance(r.protocol, r.params).split("|") if part)


def differing_params(group: list[Record]) -> list[str]:
    """Per record, the params in which the group's records differ: 'pos_lo 0 pos_hi 128'."""
    keys = [k for k in dict.fromkeys(k for r in group for k in r.params)
            if len({json.dumps(r.params.get(k), sort_keys=True, default=str) for r in group}) > 1]
    return [" ".join(f"{k} {r.params.get(k)}" for k in keys) for r in group]


def _refine(names: list[str], records: list[Record], labels: Callable[[list[Record]], list[str]]) -> list[str]:
    """Names shared by several records get `/label` appended, where the labels tell them apart."""
    groups: dict[str, list[int]] = {}
    for i, n in enumerate(names):
        groups.setdefault(n, []).append(i)
    out = list(names)
    for name, idx in groups.items():
        got = labels([records[i] for i in idx]) if len(idx) > 1 else []
        if len(set(got)) > 1:
            for i, label in zip(idx, got):
                out[i] = mlflow_key(f"{name}/{label}") if label else name
    return out


def metric_names(records: list[Record]) -> list[str]:
    """`measurement/metric` per record, unique within the cell. A name the cell has more than once
    gets, in turn, what tells its records apart: their instance (protocol/corpus, as
    harness.results.records.measurement_instance: perplexity on two corpora), then the params they differ
    in (drift's position buckets), then a number in record order."""
    names = [mlflow_key(f"{r.measurement}/{r.metric}") for r in records]
    for labels in (lambda g: [instance_path(r) for r in g], differing_params,
                   lambda g: [str(i + 1) for i in range(len(g))]):
        names = _refine(names, records, labels)
    return names


def tracking_uri(out: str | None) -> tuple[str, Path | None]:
    """(tracking URI, artifact folder for the experiments this export creates) from --out: a URI as
    given (default: $MLFLOW_TRACKING_URI); a local folder DIR as MLflow's own local layout there,
    DIR/mlflow.db + DIR/mlruns/ (default DIR: '.', where a bare `mlflow ui` looks). Not the plain
    file store: MLflow 3.18 refuses it ("maintenance mode") unless MLFLOW_ALLOW_FILE_STORE=true."""
    out = out or os.environ.get("MLFLOW_TRACKING_URI") or "."
    if out == "databricks" or re.match(r"^[A-Za-z][A-Za-z0-9+.\-]+:", out):  # a scheme, not a drive letter
        return out, None
    folder = Path(out).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / 'mlflow.db'}", folder / "mlruns"


def _mlflow():
    try:
        from mlflow import entities
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient
    except ImportError:
        raise HarnessError("exporting to MLflow needs mlflow: pip install 'qharness[mlflow]' (mlflow-skinny)") from None
    return MlflowClient, MlflowException, entities


def _batched(client, run_id: str, metrics: list, params: list, tags: list) -> None:
    """log_batch within MLflow's limits (1000 metrics, 100 params, 100 tags a request)."""
    for i in range(0, len(metrics), 1000):
        client.log_batch(run_id, metrics=metrics[i:i + 1000])
    for i in range(0, max(len(params), len(tags)), 100):
        client.log_batch(run_id, params=params[i:i + 100], tags=tags[i:i + 100])


def _experiment(client, name: str, artifacts: Path | None) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is None:  # in a local store, artifacts go beside its database (MLflow's default: the cwd's ./mlruns)
        where = str(artifacts / mlflow_key(name).replace("/", "_")) if artifacts else None
        return client.create_experiment(name, artifact_location=where)
    if exp.lifecycle_stage == "deleted":
        client.restore_experiment(exp.experiment_id)
    return exp.experiment_id


def _earlier(client, exp_id: str, run_id: str) -> list[str]:
    """The MLflow run ids an earlier export of this run made (parent and cells)."""
    quote = "'" if "'" not in run_id else '"'
    if quote in run_id:
        raise HarnessError(f"run id {run_id!r} has both quote characters: MLflow cannot search for it")
    found, token = [], None
    while True:
        page = client.search_runs([exp_id], filter_string=f"tags.`qharness.run_id` = {quote}{run_id}{quote}",
                                  max_results=1000, page_token=token)
        found += list(page)
        token = page.token
        if not token:
            return [run.info.run_id for run in found]


def _parent_tags(rd: RunDir, info: dict, cells: dict[str, list[Record]]) -> dict[str, str]:
    prov = provenance(info)
    statuses = Counter(cell_status(recs)[0] for recs in cells.values())
    sha = str(prov.get("git_sha") or "unknown")
    counts = ", ".join(f"{n} {s}" for s, n in sorted(statuses.items()))
    return {"qharness.run_id": str(info["run_id"]), "qharness.role": "run", "qharness.suite": suite_name(info),
            "qharness.git_sha": sha, "mlflow.source.git.commit": sha.removesuffix("-dirty"),
            "qharness.hardware_profile": str(info.get("hardware_profile", "unknown")),
            "qharness.device": str(prov.get("device") or ""), "qharness.device_name": str(info.get("device_name") or ""),
            "qharness.cpu": str(prov.get("cpu") or ""), "qharness.gpu": str(prov.get("gpu") or ""),
            "qharness.harness_version": str(prov.get("harness_version") or ""), "qharness.run_dir": str(rd.path.resolve()),
            "mlflow.note.content": f"qharness run `{info['run_id']}` (suite {suite_name(info)}): {counts or 'no cells'}"}


def _cell_run(entities, client, exp_id: str, parent: str, info: dict, recs: list[Record], run_name: str) -> str:
    first = recs[0]
    status, error = cell_status(recs)
    tags = {"mlflow.parentRunId": parent, "qharness.run_id": str(info["run_id"]), "qharness.role": "cell",
            "qharness.cell_id": first.cell_id, "qharness.status": status, "qharness.device": first.device,
            "qharness.hardware_profile": first.hardware_profile, **({"qharness.error": error} if error else {})}
    run = client.create_run(exp_id, start_time=epoch_ms(first.time), tags=tags, run_name=run_name)
    params = {"model": first.model, "backend": first.backend, "variant": first.variant, "suite": first.suite,
              "is_reference": str(first.is_reference)}
    params |= {mlflow_key(f"variant.{k}"): v if isinstance(v, str) else json.dumps(v, sort_keys=True)
               for k, v in first.variant_params.items()}
    ok = [r for r in recs if numeric(r)]
    metrics = []
    for name, r in zip(metric_names(ok), ok):
        ms = epoch_ms(r.time) or 0
        metrics.append(entities.Metric(name, float(r.value), ms, 0))
        if finite(r.uncertainty) is not None:
            metrics.append(entities.Metric(f"{name}.uncertainty", float(r.uncertainty), ms, 0))
    _batched(client, run.info.run_id, metrics, [entities.Param(k, str(v)) for k, v in params.items()], [])
    client.set_terminated(run.info.run_id, status="FAILED" if status == "failed" else "FINISHED",
                          end_time=max((epoch_ms(r.time) or 0) for r in recs) or None)
    return run.info.run_id


def _write_mlflow(client, entities, rd: RunDir, info: dict, cells: dict[str, list[Record]], exp_id: str) -> tuple[str, int]:
    """The parent run, its artifacts and one child run per cell; then the runs of an earlier export
    are deleted (MLflow's soft delete: a failure half way leaves the earlier export whole, and the
    next export removes both). Returns (parent id, runs replaced)."""
    earlier = _earlier(client, exp_id, str(info["run_id"]))
    parent = client.create_run(exp_id, start_time=epoch_ms(info.get("started_at")), run_name=str(info["run_id"]),
                               tags=_parent_tags(rd, info, cells)).info.run_id
    for path in (rd.run_json, rd.report_path):
        if path.is_file():
            client.log_artifact(parent, str(path))
    one_model = len({recs[0].model for recs in cells.values()}) == 1
    for recs in cells.values():
        label = f"{recs[0].backend}:{recs[0].variant}"
        _cell_run(entities, client, exp_id, parent, info, recs, label if one_model else f"{recs[0].model} {label}")
    failed = any(cell_status(recs)[0] == "failed" for recs in cells.values())
    client.set_terminated(parent, status="FAILED" if failed else "FINISHED" if info.get("finished_at") else "KILLED",
                          end_time=epoch_ms(info.get("finished_at")))
    for run_id in earlier:
        client.delete_run(run_id)
    return parent, len(earlier)


@contextmanager
def quiet(*loggers: str):
    """MLflow's INFO lines (creating database tables, migrations) off while the export runs."""
    saved = [(lg, lg.level) for lg in map(logging.getLogger, loggers)]
    for lg, _ in saved:
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, level in saved:
            lg.setLevel(level)


def to_mlflow(rd: RunDir, out: str | None, experiment: str | None = None) -> Exported:
    MlflowClient, MlflowException, entities = _mlflow()
    info, cells = rd.run_info(), by_cell(rd.current_records())
    (uri, artifacts), name = tracking_uri(out), experiment or suite_name(info)
    try:
        with quiet("mlflow", "alembic"):
            client = MlflowClient(tracking_uri=uri)
            parent, replaced = _write_mlflow(client, entities, rd, info, cells, _experiment(client, name, artifacts))
    except MlflowException as exc:
        raise HarnessError(f"MLflow at {uri}: {str(exc.message).strip().splitlines()[0]}") from None
    except ImportError as exc:  # a database URI without its driver (sqlalchemy and alembic come with the extra)
        raise HarnessError(f"MLflow at {uri}: {exc} (pip install 'qharness[mlflow]'; databases other than "
                           "sqlite need their driver)") from None
    again = f", replacing {replaced} run(s) of an earlier export" if replaced else ""
    return Exported(uri, f"{len(cells)} cell run(s) under MLflow run {parent} in experiment '{name}' at {uri}{again}")


# -- sqlite (llama-bench style) -----------------------------------------------------------------
RUN_COLUMNS = ("build_commit", "cpu_info", "gpu_info", "device_name", "started_at", "finished_at", "harness_version")
SQL_COLUMNS = (*RECORD_COLUMNS, "seq", *RUN_COLUMNS)
SQL_TYPES = {"value": "REAL", "uncertainty": "REAL", "n": "INTEGER", "attempt": "INTEGER", "direction": "INTEGER",
             "is_reference": "INTEGER", "seq": "INTEGER"}
JSON_COLUMNS = ("variant_params", "params", "provenance")
CREATE_SQL = ("CREATE TABLE IF NOT EXISTS records ("
              + ", ".join(f'"{c}" {SQL_TYPES.get(c, "TEXT")}' for c in SQL_COLUMNS)
              + ", PRIMARY KEY (run_id, cell_id, attempt, seq))")


def sql_rows(info: dict, records: list[Record]) -> list[tuple]:
    """One row per record; seq = its place among its cell attempt's records (records.jsonl order)."""
    prov = provenance(info)
    run_cols = (prov.get("git_sha"), prov.get("cpu"), prov.get("gpu"), info.get("device_name"),
                info.get("started_at"), info.get("finished_at"), prov.get("harness_version"))
    seq: Counter = Counter()
    rows = []
    for r in records:
        d = r.model_dump()
        for c in JSON_COLUMNS:
            d[c] = json.dumps(d[c], sort_keys=True, default=str)
        d["is_reference"] = int(r.is_reference)
        rows.append((*(d[c] for c in RECORD_COLUMNS), seq[(r.cell_id, r.attempt)], *run_cols))
        seq[(r.cell_id, r.attempt)] += 1
    return rows


def to_sqlite(rd: RunDir, out: str | None) -> Exported:
    info, records = rd.run_info(), rd.current_records()
    db = Path(out or "qharness.sqlite")
    db.parent.mkdir(parents=True, exist_ok=True)
    try:
        con = sqlite3.connect(db)
        try:
            with con:
                con.execute(CREATE_SQL)
                have = {row[1] for row in con.execute("PRAGMA table_info(records)")}
                if missing := [c for c in SQL_COLUMNS if c not in have]:
                    raise HarnessError(f"'{db}' has a table 'records' that is not a qharness export "
                                       f"(no column {', '.join(missing[:3])}); export to another file")
                con.execute("DELETE FROM records WHERE run_id = ?", (str(info["run_id"]),))
                marks = ", ".join("?" * len(SQL_COLUMNS))
                names = ", ".join(f'"{c}"' for c in SQL_COLUMNS)
                con.executemany(f"INSERT INTO records ({names}) VALUES ({marks})", sql_rows(info, records))
                total = con.execute("SELECT COUNT(*), COUNT(DISTINCT run_id) FROM records").fetchone()
        finally:
            con.close()
    except sqlite3.Error as exc:
        raise HarnessError(f"cannot write '{db}': {exc}") from None
    return Exported(str(db), f"{len(records)} record(s) of {info['run_id']} -> {db} (table records: {total[0]} rows, "
                             f"{total[1]} run(s))")


# -- lm-eval results JSON --------------------------------------------------------------------
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


# -- pytest-benchmark ------------------------------------------------------------------------
def to_pytest_benchmark(rd: RunDir, out: str | None) -> Exported:
    from harness.results.export.benchmark_json import export_benchmarks

    path, n = export_benchmarks(rd.path, out or f"{rd.run_info()['run_id']}.benchmark.json")
    return Exported(str(path), f"{n} benchmark(s) -> {path} (read with: pytest-benchmark compare {path})")


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
