"""`harness export --to mlflow|sqlite|lm-eval-json|pytest-benchmark` and `harness.load_run`, on
hand-made run directories (seconds): each export is read back with the sink's own library (MLflow's
client on a real local store, sqlite3, lm-eval's make_table) and must give the run's values."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

import harness
from harness.cli.main import app
from harness.errors import HarnessError
from harness.results.records import RECORD_COLUMNS, Record
from harness.results.run_dir import RunDir

runner = CliRunner()
MODEL = "builtin:smollm2-135m"
TASKS = "loglikelihood (lm-eval prompt formats)"


def _ident(run_id: str, cell: str, backend: str, variant: str, **kw) -> dict:
    return dict(cell_id=cell, suite="s", model=MODEL, backend=backend, variant=variant, device="cpu",
                hardware_profile="generic-x86-cpu", run_id=run_id, **kw)


def _task(ident: dict, metric: str, value: float, se: float | None, **params) -> Record:
    detail = {"task": metric.partition("@")[2], "num_fewshot": 0, "limit": 16, "items": 16, "subset": "all", **params}
    return Record(**ident, measurement="tasks", metric=metric, value=value, unit="fraction", n=16, uncertainty=se,
                  protocol=TASKS, params=detail, direction=-1 if metric.startswith(("ppl@", "flip_rate@")) else 1, kind="quality")


def cell_records(run_id: str, cell: str, variant: str, shift: float, ref: bool = False) -> list[Record]:
    """A cell with what the exports must tell apart: perplexity on two corpora (one metric name,
    two instances), two wall times of one instance, task results, and for a non-reference cell the
    qharness-only comparisons (recovery, flip rate) and one lm-eval bridge value."""
    ident = _ident(run_id, cell, "fp" if ref else "rtn", variant, is_reference=ref,
                   variant_params={"dtype": "float32"} if ref else {"bits": 4, "group_size": 64, "sym": False})
    ppl = dict(measurement="perplexity", metric="ppl", unit="ppl", n=4096, protocol="gptq", direction=-1, kind="quality")
    wall = dict(measurement="perplexity", metric="wall_s", unit="s", n=1, protocol="wall clock", direction=-1, kind="bookkeeping")
    recs = [Record(**ident, **ppl, value=12.5 + shift, uncertainty=0.25, params={"corpus": "boolq-wiki", "seq_len": 512}),
            Record(**ident, **ppl, value=30.0 + shift, uncertainty=0.5, params={"corpus": "lambada", "seq_len": 512}),
            Record(**ident, **wall, value=3.0, params={}), Record(**ident, **wall, value=4.0, params={}),
            *(Record(**ident, measurement="drift", metric="kld_mean@pos", value=0.1 * (lo // 128 + 1), unit="nats",
                     protocol="drift teacher-forced", params={"corpus": "boolq-wiki", "pos_lo": lo, "pos_hi": lo + 128},
                     direction=-1, kind="quality") for lo in (0, 128)),
            Record(**ident, measurement="footprint", metric="bits_per_weight", value=32.0 if ref else 4.3125, unit="bits",
                   direction=-1, kind="size"),
            _task(ident, "acc@boolq", 0.625 - shift / 100, 0.125),
            _task(ident, "acc@hellaswag", 0.5, 0.129),
            _task(ident, "acc_norm@hellaswag", 0.5625 - shift / 100, 0.128),
            _task(ident, "acc@lambada", 0.3125, None),
            _task(ident, "ppl@lambada", 40.0 + shift, 4.0)]
    if not ref:
        recs += [_task(ident, "recovery@hellaswag", 97.5, 1.5, of="acc_norm", reference_cell="c-ref"),
                 _task(ident, "flip_rate@hellaswag", 0.0625, 0.06, of="acc_norm", reference_cell="c-ref"),
                 Record(**ident, measurement="lm-eval", metric="lmeval_arc_easy_acc", value=0.55, unit="acc", n=20,
                        uncertainty=0.11, protocol="lm-eval 0.4.13", direction=1, kind="quality",
                        params={"tasks": ["arc_easy"], "num_fewshot": None, "limit": 20, "task": "arc_easy", "filter": "none"})]
    return recs + [Record(**ident, measurement="cell", metric="duration_s", value=50.0, unit="s", n=1, direction=0,
                          kind="bookkeeping", provenance={"versions": {"torch": "2.13.0"}})]


def make_run(path: Path, shift: float = 0.0, sha: str = "abc1234", started: str = "2026-12-02T08:57:41+00:00") -> RunDir:
    """A finished run: reference, one quantized cell, one failed and one skipped cell, a report."""
    rd = RunDir(path)
    run_id = path.name
    rd.create({"run_id": run_id, "suite": {"name": "s"}, "hardware_profile": "generic-x86-cpu", "device_name": "test cpu",
               "provenance": {"git_sha": sha, "cpu": "Test CPU 9000", "gpu": None, "device": "cpu", "harness_version": "0.1.0",
                              "python": "3.11", "platform": "Linux-6"},
               "started_at": started, "finished_at": "2026-12-02T09:12:00+00:00"})
    rd.append(cell_records(run_id, "c-ref", "fp32", shift, ref=True))
    rd.append(cell_records(run_id, "c-int4", "int4-g64", shift))
    for cell, variant, status, error in (("c-int2", "int2-g32", "failed", "worker died: signal SIGSEGV"),
                                         ("c-skip", "nf4", "skipped", "unavailable: bitsandbytes is not installed")):
        rd.append([Record(**_ident(run_id, cell, "rtn", variant), measurement="cell", metric="duration_s", value=0.0,
                          unit="s", n=1, direction=0, kind="bookkeeping", status=status, error=error)])
    rd.report_path.write_text("<html>report</html>")
    return rd


def export(*args: str) -> str:
    res = runner.invoke(app, ["export", *args])
    assert res.exit_code == 0, res.output
    return res.output


def one_line_error(args: list[str], *expected: str) -> str:
    res = runner.invoke(app, args)
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output and isinstance(res.exception, SystemExit)
    err = res.stderr.strip()
    assert len(err.splitlines()) == 1, err
    for text in expected:
        assert text in err, err
    return err


# -- mlflow -----------------------------------------------------------------------------------
def test_mlflow_round_trip_on_a_local_store(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)  # MLflow's default artifact root for a URI's store is the cwd's ./mlruns
    rd = make_run(tmp_path / "run-a")
    store = tmp_path / "mlruns"
    assert "4 cell run(s)" in export(str(rd.path), "--to", "mlflow", "--out", str(store))
    client = MlflowClient(tracking_uri=f"sqlite:///{store.resolve()}/mlflow.db")  # MLflow's local layout in --out
    exp = client.get_experiment_by_name("s")  # the suite's name
    runs = client.search_runs([exp.experiment_id], filter_string="tags.`qharness.run_id` = 'run-a'")
    parents = [r for r in runs if r.data.tags["qharness.role"] == "run"]
    assert len(parents) == 1 and len(runs) == 5
    parent = parents[0]
    assert parent.data.tags["mlflow.source.git.commit"] == "abc1234" and parent.data.tags["qharness.suite"] == "s"
    assert parent.data.tags["qharness.hardware_profile"] == "generic-x86-cpu" and parent.data.tags["qharness.device"] == "cpu"
    assert parent.info.status == "FAILED"  # a cell failed
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} == {"run.json", "report.html"}

    cells = {r.data.tags["qharness.cell_id"]: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert set(cells) == {"c-ref", "c-int4", "c-int2", "c-skip"}
    q = client.get_run(cells["c-int4"].info.run_id).data
    assert q.params == {"model": MODEL, "backend": "rtn", "variant": "int4-g64", "suite": "s", "is_reference": "False",
                        "variant.bits": "4", "variant.group_size": "64", "variant.sym": "false"}
    expected = {r: v for r, v in [("perplexity/ppl/gptq/boolq-wiki", 12.5), ("perplexity/ppl/gptq/lambada", 30.0),
                                  ("perplexity/wall_s/1", 3.0), ("perplexity/wall_s/2", 4.0),
                                  ("drift/kld_mean_pos/pos_lo 0 pos_hi 128", 0.1),
                                  ("drift/kld_mean_pos/pos_lo 128 pos_hi 256", 0.2),
                                  ("footprint/bits_per_weight", 4.3125), ("tasks/acc_boolq", 0.625),
                                  ("tasks/acc_norm_hellaswag", 0.5625), ("tasks/recovery_hellaswag", 97.5),
                                  ("lm-eval/lmeval_arc_easy_acc", 0.55), ("cell/duration_s", 50.0)]}
    assert {k: q.metrics[k] for k in expected} == expected
    assert q.metrics["perplexity/ppl/gptq/lambada.uncertainty"] == 0.5 and "tasks/acc_lambada.uncertainty" not in q.metrics
    failed = cells["c-int2"]
    assert failed.info.status == "FAILED" and failed.data.tags["qharness.error"] == "worker died: signal SIGSEGV"
    assert cells["c-skip"].data.tags["qharness.status"] == "skipped"
    assert client.get_run(cells["c-ref"].info.run_id).data.params["is_reference"] == "True"

    # again (e.g. after a resume): the earlier export is replaced, not duplicated
    assert "replacing 5 run(s)" in export(str(rd.path), "--to", "mlflow", "--out", str(store))
    again = client.search_runs([exp.experiment_id], filter_string="tags.`qharness.run_id` = 'run-a'")
    assert len(again) == 5 and parent.info.run_id not in {r.info.run_id for r in again}
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store.resolve()}/mlflow.db")  # no --out: MLflow's variable
    export(str(make_run(tmp_path / "run-b").path), "--to", "mlflow", "--experiment", "mine")
    assert len(client.search_runs([client.get_experiment_by_name("mine").experiment_id])) == 5


def test_mlflow_missing_or_bad_uri_is_one_line(tmp_path, monkeypatch):
    rd = make_run(tmp_path / "run-a")
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "mlflow", None)  # as if not installed
        one_line_error(["export", str(rd.path), "--to", "mlflow", "--out", str(tmp_path / "m")],
                       "needs mlflow", "pip install 'qharness[mlflow]'")
    pytest.importorskip("mlflow")
    one_line_error(["export", str(rd.path), "--to", "mlflow", "--out", "nosuchscheme://x"], "MLflow at nosuchscheme://x")
    (tmp_path / "file").write_text("")
    one_line_error(["export", str(rd.path), "--to", "mlflow", "--out", str(tmp_path / "file" / "mlruns")], "cannot write")


# -- sqlite -----------------------------------------------------------------------------------
def test_sqlite_appends_runs_and_replaces_a_run_exported_again(tmp_path):
    a, b = make_run(tmp_path / "run-a"), make_run(tmp_path / "run-b", shift=1.0, sha="def5678")
    db = tmp_path / "bench.sqlite"
    n = len(a.current_records())
    assert f"{n} record(s) of run-a" in export(str(a.path), "--to", "sqlite", "--out", str(db))
    export(str(b.path), "--to", "sqlite", "--out", str(db))
    assert f"{2 * n} rows, 2 run(s)" in export(str(a.path), "--to", "sqlite", "--out", str(db))
    con = sqlite3.connect(db)
    con.row_factory = sqlite3.Row
    rows = con.execute("SELECT * FROM records WHERE metric = 'ppl' ORDER BY run_id, cell_id, seq").fetchall()
    got = [(r["run_id"], r["cell_id"], json.loads(r["params"])["corpus"], r["value"], r["uncertainty"], r["build_commit"])
           for r in rows]
    assert got == [("run-a", "c-int4", "boolq-wiki", 12.5, 0.25, "abc1234"), ("run-a", "c-int4", "lambada", 30.0, 0.5, "abc1234"),
                   ("run-a", "c-ref", "boolq-wiki", 12.5, 0.25, "abc1234"), ("run-a", "c-ref", "lambada", 30.0, 0.5, "abc1234"),
                   ("run-b", "c-int4", "boolq-wiki", 13.5, 0.25, "def5678"), ("run-b", "c-int4", "lambada", 31.0, 0.5, "def5678"),
                   ("run-b", "c-ref", "boolq-wiki", 13.5, 0.25, "def5678"), ("run-b", "c-ref", "lambada", 31.0, 0.5, "def5678")]
    row = rows[0]
    assert (row["cpu_info"], row["gpu_info"], row["device"], row["hardware_profile"], row["suite"], row["started_at"]) == \
        ("Test CPU 9000", None, "cpu", "generic-x86-cpu", "s", "2026-12-02T08:57:41+00:00")
    assert json.loads(row["variant_params"]) == {"bits": 4, "group_size": 64, "sym": False} and row["is_reference"] == 0
    failed = con.execute("SELECT status, error, value FROM records WHERE run_id = 'run-b' AND cell_id = 'c-int2'").fetchall()
    assert [tuple(f) for f in failed] == [("failed", "worker died: signal SIGSEGV", 0.0)]
    with pytest.raises(sqlite3.IntegrityError):  # the key that keeps a run from being counted twice
        con.execute("INSERT INTO records (run_id, cell_id, attempt, seq) "
                    "SELECT run_id, cell_id, attempt, seq FROM records LIMIT 1")
    assert set(RECORD_COLUMNS) <= {c[1] for c in con.execute("PRAGMA table_info(records)")}


def test_sqlite_refuses_a_foreign_table_or_an_unwritable_path(tmp_path):
    rd = make_run(tmp_path / "run-a")
    other = tmp_path / "other.sqlite"
    with sqlite3.connect(other) as con:
        con.execute("CREATE TABLE records (x TEXT)")
    one_line_error(["export", str(rd.path), "--to", "sqlite", "--out", str(other)], "not a qharness export")
    (tmp_path / "file").write_text("")
    one_line_error(["export", str(rd.path), "--to", "sqlite", "--out", str(tmp_path / "file" / "x.sqlite")], "cannot write")
    (tmp_path / "junk.sqlite").write_text("not a database, just text that is long enough to be read as a header" * 20)
    one_line_error(["export", str(rd.path), "--to", "sqlite", "--out", str(tmp_path / "junk.sqlite")], "cannot write")


# -- lm-eval results JSON ------------------------------------------------------------------------
def test_lm_eval_json_is_rendered_by_lm_evals_make_table(tmp_path):
    rd = make_run(tmp_path / "run-a")
    out = tmp_path / "lm"
    for _ in range(2):  # again: the same files, overwritten
        assert "2 results file(s)" in export(str(rd.path), "--to", "lm-eval-json", "--out", str(out))
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.json"))
    assert files == ["builtin__smollm2-135m__fp__fp32/results_2026-12-02T08-57-41.json",
                     "builtin__smollm2-135m__rtn__int4-g64/results_2026-12-02T08-57-41.json"]
    doc = json.loads((out / files[1]).read_text())
    assert doc["results"]["hellaswag"] == {"alias": "hellaswag", "acc,none": 0.5, "acc_stderr,none": 0.129,
                                           "acc_norm,none": 0.5625, "acc_norm_stderr,none": 0.128}
    assert doc["results"]["lambada"] == {"alias": "lambada", "acc,none": 0.3125, "acc_stderr,none": "N/A",
                                         "perplexity,none": 40.0, "perplexity_stderr,none": 4.0}
    assert doc["results"]["arc_easy"] == {"alias": "arc_easy", "acc,none": 0.55, "acc_stderr,none": 0.11}
    assert not any("recovery" in k or "flip" in k for res in doc["results"].values() for k in res)
    assert doc["qharness"]["comparisons"]["hellaswag"] == {"reference_cell": "c-ref", "of": "acc_norm", "recovery": 97.5,
                                                           "recovery_stderr": 1.5, "flip_rate": 0.0625, "flip_rate_stderr": 0.06}
    assert doc["higher_is_better"]["lambada"] == {"acc": True, "perplexity": False}
    assert doc["n-shot"] == {"boolq": 0, "hellaswag": 0, "lambada": 0}  # lm-eval's own default for arc_easy: not known
    assert doc["n-samples"]["boolq"] == {"original": 16, "effective": 16}
    assert doc["config"]["model"] == "qharness" and doc["config"]["model_args"] == f"model={MODEL},backend=rtn,variant=int4-g64"
    assert doc["git_hash"] == "abc1234" and doc["date"] == 1796201861.0

    pytest.importorskip("pytablewriter")
    make_table = pytest.importorskip("lm_eval.utils").make_table
    rows, task = set(), ""
    for line in make_table(doc).splitlines()[2:]:  # | Tasks | Version | Filter | n-shot | Metric | | Value | | Stderr |
        cells = [c.strip() for c in line.strip("|").split("|")]
        task = cells[0] or task  # a task's further metrics leave the name blank
        se = cells[8] if cells[8] == "N/A" else float(cells[8])
        rows.add((task, cells[1] or "same", cells[2], cells[3], cells[4], cells[5], float(cells[6]), se))
    assert rows == {("arc_easy", "N/A", "none", "", "acc", "↑", 0.55, 0.11),
                    ("boolq", "qharness-0.1.0", "none", "0", "acc", "↑", 0.625, 0.125),
                    ("hellaswag", "qharness-0.1.0", "none", "0", "acc", "↑", 0.5, 0.129),
                    ("hellaswag", "same", "none", "0", "acc_norm", "↑", 0.5625, 0.128),
                    ("lambada", "qharness-0.1.0", "none", "0", "acc", "↑", 0.3125, "N/A"),
                    ("lambada", "same", "none", "0", "perplexity", "↓", 40.0, 4.0)}


def test_lm_eval_json_names_a_task_measured_twice_apart(tmp_path):
    rd = RunDir(tmp_path / "r")
    rd.create({"run_id": "r", "suite": {"name": "s"}, "started_at": "2026-12-02T08:57:41+00:00"})
    ident = _ident("r", "c", "fp", "fp32")
    rd.append([_task(ident, "acc@mmlu", 0.30, 0.01), _task(ident, "acc@mmlu", 0.35, 0.01, num_fewshot=5),
               Record(**ident, measurement="lm-eval", metric="lmeval_mmlu_acc", value=0.33, n=100, direction=1, kind="quality",
                      params={"task": "mmlu", "filter": "none", "num_fewshot": 5})])
    out = tmp_path / "lm"
    export(str(rd.path), "--to", "lm-eval-json", "--out", str(out))
    doc = json.loads(next(out.rglob("results_*.json")).read_text())
    assert {k: v["acc,none"] for k, v in doc["results"].items()} == {"mmlu_tasks_0shot": 0.30, "mmlu_tasks_5shot": 0.35,
                                                                      "mmlu_lm-eval_5shot": 0.33}
    assert doc["n-shot"] == {"mmlu_tasks_0shot": 0, "mmlu_tasks_5shot": 5, "mmlu_lm-eval_5shot": 5}


# -- pytest-benchmark, load_run, CLI errors ------------------------------------------------------
def test_pytest_benchmark_through_export(tmp_path):
    pytest.importorskip("pytest_benchmark")
    rd = make_run(tmp_path / "run-a")
    ident = _ident("run-a", "c-int4", "rtn", "int4-g64")
    rd.append([Record(**ident, attempt=2, measurement="speed", metric="decode_tokens_per_s", value=100.0, unit="tok/s",
                      params={"samples_s": [0.01, 0.011, 0.0105]}, direction=1, kind="speed")])
    out = tmp_path / "b.json"
    assert "1 benchmark(s)" in export(str(rd.path), "--to", "pytest-benchmark", "--out", str(out))
    assert json.loads(out.read_text())["benchmarks"][0]["stats"]["rounds"] == 3


def test_load_run_is_the_pandas_entry_point(tmp_path):
    rd = make_run(tmp_path / "run-a")
    rd.append([Record(**_ident("run-a", "c-int2", "rtn", "int2-g32"), attempt=2, measurement="cell", metric="duration_s",
                      value=40.0, direction=0, kind="bookkeeping")])  # the failed cell, resumed: ok now
    df = harness.load_run(rd.path)
    assert list(df.columns) == RECORD_COLUMNS
    assert df.loc[df.cell_id == "c-int2", "status"].tolist() == ["ok"]
    assert len(harness.load_run(rd.path, all_attempts=True)) == len(df) + 1
    ppl = df[(df.cell_id == "c-ref") & (df.metric == "ppl")]
    assert sorted(ppl.value) == [12.5, 30.0] and ppl.params.iloc[0]["corpus"] == "boolq-wiki"
    with pytest.raises(HarnessError, match="not a run directory"):
        harness.load_run(tmp_path / "nope")
    code = "import sys, harness; harness.load_run; assert 'pandas' not in sys.modules, 'pandas imported eagerly'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_export_cli_errors_are_one_line(tmp_path):
    rd = make_run(tmp_path / "run-a")
    one_line_error(["export", str(tmp_path / "nope"), "--to", "sqlite"], "is not a run directory")
    one_line_error(["export", str(rd.path), "--to", "mlfow"], "unknown export target 'mlfow'", "did you mean 'mlflow'")
    one_line_error(["export", str(rd.path), "--to", "sqlite", "--experiment", "x"], "--experiment applies to --to mlflow only")
    one_line_error(["export", str(rd.path), "--to", "pytest-benchmark", "--out", str(tmp_path / "b.json")], "no timed records")
    bare = RunDir(tmp_path / "bare")
    bare.create({"run_id": "bare", "suite": {"name": "s"}})
    one_line_error(["export", str(bare.path), "--to", "lm-eval-json", "--out", str(tmp_path / "lm")], "no task results")
    (tmp_path / "file").write_text("")
    one_line_error(["export", str(rd.path), "--to", "lm-eval-json", "--out", str(tmp_path / "file" / "lm")], "cannot write")
