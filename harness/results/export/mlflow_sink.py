"""`--to mlflow`: one parent MLflow run per harness run, one nested child run per cell (params,
metrics, status); re-exporting replaces the earlier export (found by the tag qharness.run_id).
MLflow is imported inside the sink: a missing one costs one line, only when chosen."""

from __future__ import annotations

import json
import logging
import os
import re
from collections import Counter
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

from harness.errors import HarnessError
from harness.results.export.common import Exported, by_cell, cell_status, epoch_ms, finite, numeric, provenance, suite_name
from harness.results.records import Record, measurement_instance
from harness.results.run_dir import RunDir


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
