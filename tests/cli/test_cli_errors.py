"""Bad input gets one clear line and a non-zero exit, never a traceback."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from conftest import tiny_suite, write_suite
from harness.cli.main import app

runner = CliRunner()


def one_line_error(args: list[str], *expected: str) -> str:
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    err = result.stderr.strip()
    assert "Traceback" not in result.output
    assert len(err.splitlines()) == 1, err
    for text in expected:
        assert text in err, err
    return err


def test_unknown_suite_suggests():
    one_line_error(["run", "--suite", "llm-smok"], "unknown suite 'llm-smok'", "did you mean 'llm-smoke'")


def test_missing_suite_file():
    one_line_error(["run", "--suite", "nope/suite.yaml"], "does not exist")


def test_malformed_yaml(tmp_path):
    bad = write_suite(tmp_path / "bad.yaml", "name: x\nmodels: [a\nbackends: {")
    one_line_error(["run", "--suite", str(bad)], "malformed YAML", "line")


def test_unknown_top_level_key(tmp_path):
    s = write_suite(tmp_path / "s.yaml", "name: x\nmodels: [tiny:llama]\nbackend:\n  - name: fp\n")
    one_line_error(["run", "--suite", str(s)], "unknown key 'backend'", "did you mean 'backends'")


def test_unknown_variant_key_and_bad_value(tmp_path, harness_env):
    s = tiny_suite(tmp_path / "s.yaml", extra_backends="""
        - name: rtn
          variants: [{bitz: 4}]
        """)
    one_line_error(["run", "--suite", str(s), "--out", str(tmp_path / "r")], "unknown key 'bitz'", "did you mean 'bits'")
    s = tiny_suite(tmp_path / "s2.yaml", extra_backends="""
        - name: rtn
          variants: [{bits: 9}]
        """)
    one_line_error(["run", "--suite", str(s), "--out", str(tmp_path / "r2")], "bad value for 'bits'", "9")


def test_unknown_backend_and_measurement(tmp_path, harness_env):
    s = tiny_suite(tmp_path / "s.yaml", extra_backends="""
        - name: rtm
        """)
    one_line_error(["run", "--suite", str(s), "--out", str(tmp_path / "r")], "unknown backend 'rtm'", "did you mean 'rtn'")
    s = write_suite(tmp_path / "m.yaml", """
        name: m
        models: [tiny:llama]
        backends: [{name: fp}]
        measurements: [{name: perplexty}]
        """)
    one_line_error(["run", "--suite", str(s), "--out", str(tmp_path / "r")], "unknown measurement", "did you mean 'perplexity'")


def test_unknown_model(tmp_path, harness_env):
    s = tiny_suite(tmp_path / "s.yaml")
    one_line_error(["run", "--suite", str(s), "--model", "builtin:smolm2-135m", "--out", str(tmp_path / "r")],
                   "unknown model", "did you mean 'builtin:smollm2-135m'")


def test_group_size_that_does_not_divide(tmp_path, harness_env):
    s = tiny_suite(tmp_path / "s.yaml", extra_backends="""
        - name: rtn
          variants: [{bits: 4, group_size: 48}]
        """)
    one_line_error(["run", "--suite", str(s), "--out", str(tmp_path / "r")], "group_size 48 does not divide in_features 64")


def test_unwritable_output_dir(tmp_path, harness_env):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    s = tiny_suite(tmp_path / "s.yaml")
    one_line_error(["run", "--suite", str(s), "--out", str(blocker / "run")], "not writable")


@pytest.fixture
def finished_run(tmp_path, harness_env):
    s = tiny_suite(tmp_path / "s.yaml")
    out = tmp_path / "run"
    result = runner.invoke(app, ["run", "--suite", str(s), "--out", str(out)])
    assert result.exit_code == 0, result.output
    return s, out


def test_existing_run_needs_resume_and_corruption_is_reported(finished_run):
    suite, out = finished_run
    one_line_error(["run", "--suite", str(suite), "--out", str(out)], "already holds a run", "--resume")
    records = (out / "records.jsonl").read_text()
    (out / "records.jsonl").write_text("{garbage\n" + records)
    one_line_error(["run", "--suite", str(suite), "--out", str(out), "--resume"], "corrupt run directory", "line 1")
    (out / "records.jsonl").write_text(records)  # finished results are untouched by the refusal
    (out / "run.json").write_text("{not json")
    one_line_error(["run", "--suite", str(suite), "--out", str(out), "--resume"], "corrupt run directory", "run.json")
    one_line_error(["report", str(out)], "corrupt run directory")
    assert (out / "records.jsonl").read_text() == records


def test_resume_of_finished_run_runs_nothing(finished_run):
    suite, out = finished_run
    before = (out / "records.jsonl").read_text()
    result = runner.invoke(app, ["run", "--suite", str(suite), "--out", str(out), "--resume"])
    assert result.exit_code == 0, result.output
    assert (out / "records.jsonl").read_text() == before


def test_report_on_non_run_dir(tmp_path):
    one_line_error(["report", str(tmp_path)], "is not a run directory")


def test_gates_pass_and_fail(tmp_path, harness_env):
    from conftest import TINY_SUITE

    body = TINY_SUITE.format(timeout=120, extra_backends="  - name: rtn\n    variants: [{bits: 8, sym: true}, {bits: 2, group_size: 32}]")
    passing = body + "gates:\n  - {metric: ppl, max_ratio: 1.02, cells: ['rtn:int8*']}\n  - {metric: bits_per_weight, max: 9}\n"
    (tmp_path / "pass.yaml").write_text(passing)
    result = runner.invoke(app, ["run", "--suite", str(tmp_path / "pass.yaml"), "--out", str(tmp_path / "p")])
    assert result.exit_code == 0, result.output
    assert "FAIL" not in result.output and "pass" in result.output
    failing = body + "gates:\n  - {metric: ppl, max_ratio: 1.0001}\n  - {metric: pplx, max: 1}\n"
    (tmp_path / "fail.yaml").write_text(failing)
    result = runner.invoke(app, ["run", "--suite", str(tmp_path / "fail.yaml"), "--out", str(tmp_path / "f")])
    assert result.exit_code == 1
    import json

    gates = json.loads((tmp_path / "f" / "run.json").read_text())["gates"]
    assert [g["passed"] for g in gates if g["gate"].startswith("pplx")] == [False]
    assert any("no successful records of metric 'pplx'" in g["detail"] for g in gates)
    assert any(not g["passed"] and "ratio" in g["detail"] for g in gates if g["gate"].startswith("ppl "))
    assert (tmp_path / "f" / "report.html").exists()  # a failed gate loses nothing


def test_gate_needs_a_bound(tmp_path):
    s = write_suite(tmp_path / "g.yaml", "name: g\nmodels: [tiny:llama]\nbackends: [{name: fp}]\ngates: [{metric: ppl}]\n")
    one_line_error(["run", "--suite", str(s)], "gates[0]", "at least one of max")


def test_current_records_keep_the_latest_attempt(tmp_path):
    from harness.results.records import Record
    from harness.results.run_dir import RunDir, load_records

    rd = RunDir(tmp_path / "r")
    ident = dict(run_id="r", suite="s", model="m", backend="b", device="cpu")
    rd.create({"run_id": "r", "cells": [{"cell_id": "c1"}, {"cell_id": "c2"}]})
    rd.append([Record(**ident, cell_id="c1", variant="v1", measurement="footprint", metric="weight_bytes", value=1),
               Record(**ident, cell_id="c1", variant="v1", measurement="cell", metric="duration_s", status="failed", error="x")])
    rd.append([Record(**ident, cell_id="old", variant="gone", measurement="cell", metric="duration_s")])
    rd.append([Record(**ident, cell_id="c1", variant="v1", attempt=2, measurement="footprint", metric="weight_bytes", value=2),
               Record(**ident, cell_id="c1", variant="v1", attempt=2, measurement="cell", metric="duration_s")])
    current = rd.current_records()
    assert [(r.metric, r.value, r.status) for r in current] == [("weight_bytes", 2, "ok"), ("duration_s", None, "ok")]
    assert len(load_records(rd.path, all_attempts=True)) == 5 and len(load_records(rd.path)) == 2


def test_gguf_original_refused_for_a_model_not_from_gguf(tmp_path, harness_env):
    pytest.importorskip("llama_cpp")
    s = tiny_suite(tmp_path / "s.yaml", extra_backends="""
        - name: llamacpp
          variants: [{qtype: original}]
        """)
    one_line_error(["run", "--suite", str(s), "--out", str(tmp_path / "r")], "original", "tiny:llama")
