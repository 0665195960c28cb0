"""Isolation and resume: a crashing, exiting, hanging or raising backend costs only its cell;
a run killed with SIGKILL resumes without recomputing finished cells."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import tiny_suite
from harness.run.runner import run_suite
from harness.results.run_dir import RunDir, load_records
from harness.run.suite import load_suite

CHAOS = "chaos_adapter:ChaosAdapter"


def _cells(run_dir):
    df = load_records(run_dir)
    cells = df[df.measurement == "cell"].set_index("variant")
    return df, cells


def test_misbehaving_cells_fail_alone(tmp_path, harness_env):
    suite = tiny_suite(tmp_path / "s.yaml", extra_backends=f"""
        - name: "{CHAOS}"
          variants:
            - {{mode: segfault}}
            - {{mode: exit}}
            - {{mode: raise}}
            - {{mode: segfault, when: measure}}
        - name: "{CHAOS}"
          timeout_s: 15
          variants: [{{mode: hang}}]
        """)
    result = run_suite(load_suite(str(suite)), out=tmp_path / "run")
    df, cells = _cells(tmp_path / "run")
    assert cells.loc["fp32", "status"] == "ok"
    assert "SIGSEGV" in cells.loc["segfault@quantize", "error"]
    assert "status 7" in cells.loc["exit@quantize", "error"]
    assert "timed out after 15 s" in cells.loc["hang@quantize", "error"]
    assert cells.loc["raise@quantize", "error"] == "RuntimeError: chaos adapter raised on purpose"
    assert "SIGSEGV" in cells.loc["segfault@measure", "error"]
    # values finished before the crash survive it
    measured = df[(df.variant == "segfault@measure") & (df.metric == "weight_bytes")]
    assert len(measured) == 1 and measured.value.iloc[0] > 0
    ppl = df[(df.variant == "fp32") & (df.metric == "ppl")]
    assert len(ppl) == 1 and ppl.value.iloc[0] > 1
    assert result.failed == 5
    assert result.report is not None and result.report.exists()


def test_resume_after_sigkill_recomputes_no_finished_cell(tmp_path, harness_env):
    counter = tmp_path / "quantize-calls.txt"
    suite = tiny_suite(tmp_path / "s.yaml", extra_backends=f"""
        - name: "{CHAOS}"
          variants:
            - {{mode: ok}}
            - {{mode: slow, seconds: 60}}
            - {{mode: ok, when: measure}}
        """)
    out = tmp_path / "run"
    env = {**os.environ, "CHAOS_COUNTER": str(counter)}
    cmd = [sys.executable, "-m", "harness.cli", "run", "--suite", str(suite), "--out", str(out)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if counter.exists() and "slow@quantize" in counter.read_text():
                break
            assert proc.poll() is None, "driver ended early"
            time.sleep(0.5)
        else:
            pytest.fail("the slow cell never started")
        proc.send_signal(signal.SIGKILL)  # the driver only: its worker must die with it
        proc.wait()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    finished_before = {r.variant for r in RunDir(out).records() if r.measurement == "cell"}
    assert finished_before == {"fp32", "ok@quantize"}

    # Shorten the unfinished slow cell to keep the test quick (its identity changes; it had no
    # records, so nothing is lost); the finished cells keep theirs and must not run again.
    suite.write_text(suite.read_text().replace("seconds: 60", "seconds: 0.1"))
    result = subprocess.run(cmd + ["--resume"], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    calls = counter.read_text().split()
    assert calls.count("ok@quantize") == 1  # finished before the kill: not recomputed
    assert calls.count("ok@measure") == 1
    records = RunDir(out).records()
    cell_records = [r for r in records if r.measurement == "cell"]
    assert sorted(r.variant for r in cell_records) == sorted(["fp32", "ok@quantize", "slow@quantize", "ok@measure"])
    assert all(r.status == "ok" for r in cell_records)
    assert (out / "report.html").exists()


def test_a_failing_fork_server_falls_back_to_interpreters(tmp_path, harness_env, monkeypatch):
    """If the fork server cannot fork a worker (it died in its imports, say), the run goes on
    with interpreter-started workers: no cell is lost to it."""
    from harness.run import zygote
    from harness.run.executor import LocalExecutor

    def broken(*args, **kwargs):
        raise EOFError("the fork server went away")

    monkeypatch.setattr(zygote, "ForkedWorker", broken)
    executor = LocalExecutor()
    result = run_suite(load_suite(str(tiny_suite(tmp_path / "s.yaml"))), out=tmp_path / "run", executor=executor)
    assert result.failed == 0 and executor._no_forks
    cells = [r for r in RunDir(tmp_path / "run").current_records() if r.measurement == "cell"]
    assert cells and all(r.status == "ok" for r in cells)


@pytest.mark.parametrize("forked", [True, False], ids=["forked", "interpreters"])
def test_warm_workers_run_every_cell_and_leave_nothing_behind(tmp_path, harness_env, monkeypatch, forked):
    """Workers started ahead (LocalExecutor.ahead) are handed their cells, forked from the fork
    server (harness.run.zygote) or started as interpreters; each cell still has its own process
    (its pid in provenance); no waiting worker outlives the run; the fork server holds no thread
    pool a fork would copy half of."""
    import psutil

    from harness.run import zygote
    from harness.run.executor import LocalExecutor
    from harness.run.runner import run_suite
    from harness.results.run_dir import RunDir
    from harness.run.suite import load_suite

    if not forked:
        monkeypatch.setenv("QHARNESS_NO_FORK_SERVER", "1")

    suite = load_suite(str(tiny_suite(tmp_path / "s.yaml", extra_backends="""
        - name: rtn
          variants: [{bits: 8}, {bits: 4, group_size: 32}]
        """)))
    result = run_suite(suite, out=tmp_path / "run", executor=LocalExecutor(ahead=2))
    assert result.failed == 0
    records = RunDir(tmp_path / "run").current_records()
    cells = [r for r in records if r.measurement == "cell"]
    assert len(cells) == 3 and len({r.provenance["pid"] for r in cells}) == 3
    loads = [r for r in records if r.measurement == "timing" and r.metric == "load_s"]
    assert [r.params["warm_worker"] for r in loads] == [True, True, True]
    # each waiting worker was told its cell's model and had loaded it before the cell came
    assert all(r.params.get("preloaded_while_waiting_s", 0) > 0 for r in loads)
    leftovers = [p for p in psutil.Process().children(recursive=True) if "harness.run.worker" in " ".join(p.cmdline())]
    assert leftovers == []
    server = zygote.server_pid()
    if forked:
        assert server is not None and psutil.Process(server).children() == []
        threads = [psutil.Process(t.id).name() for t in psutil.Process(server).threads()]
        assert threads.count(psutil.Process(server).name()) == 1, threads  # no OpenMP / torch pool threads
