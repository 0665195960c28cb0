"""Bad input gets one clear line and a non-zero exit, never a traceback."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from conftest import tiny_suite, write_suite
from harness.cli import app

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
