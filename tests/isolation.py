"""Tests marked `native` run in a child pytest, so a crash in native code (a llama.cpp segfault on
a CPU whose AMX repack path is broken, a bitsandbytes or ONNX Runtime abort, the Triton
interpreter) fails that test with its signal instead of taking the whole run down.

Forking is not an option: once torch has used its OpenMP pool in this process, a forked child
hangs at its first parallel region (libgomp; seen here with torch 2.13). So the parent starts
`python -m pytest NODEIDS` for all the still-unrun native tests of a module at once (their module
fixtures are built once), the child writes each test's reports (pytest's own serialisable form)
as JSON lines, and the parent replays them as if the tests had run here. When the child dies,
the test it had started gets a failure naming the signal, and the module's remaining tests run in
a new child. `QHARNESS_NO_ISOLATION=1` runs them in-process (e.g. under a debugger)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from _pytest.reports import TestReport

REPORTS_ENV = "QHARNESS_ISOLATED_REPORTS"  # set in the child: where it writes its reports
CHILD_TIMEOUT_S = 3600
_results: dict[str, list[TestReport]] = {}
_config: list[pytest.Config] = []  # this process's config (the child serialises its reports with it)


def _in_child() -> bool:
    return bool(os.environ.get(REPORTS_ENV))


def _isolated(item: pytest.Item) -> bool:
    return (item.get_closest_marker("native") is not None and not _in_child()
            and not os.environ.get("QHARNESS_NO_ISOLATION"))


# -- child side ----------------------------------------------------------------------------------------

def _write(line: dict) -> None:
    with open(os.environ[REPORTS_ENV], "a") as f:
        f.write(json.dumps(line) + "\n")
        f.flush()
        os.fsync(f.fileno())


def pytest_runtest_logstart(nodeid: str, location) -> None:
    if _in_child():
        _write({"start": nodeid})


def pytest_runtest_logreport(report: TestReport) -> None:
    if _in_child():
        config = _config[0]
        _write({"report": config.hook.pytest_report_to_serializable(config=config, report=report)})


def pytest_configure(config: pytest.Config) -> None:
    _config[:] = [config]


# -- parent side ---------------------------------------------------------------------------------------

def _signal_name(returncode: int) -> str:
    try:
        return signal.Signals(-returncode).name
    except ValueError:
        return f"signal {-returncode}"


def _crash_report(item: pytest.Item, why: str, output: str) -> TestReport:
    tail = "\n".join(output.splitlines()[-40:])
    return TestReport(item.nodeid, item.location, {k: 1 for k in item.keywords}, "failed",
                      f"{why} (isolated run: tests/isolation.py)", "call",
                      sections=[("Captured output of the isolated run (last lines)", tail)] if tail else [])


def _run_child(item: pytest.Item, batch: list[pytest.Item]) -> None:
    """Run `batch` (item first) in one child pytest; fill _results for every test it finished,
    and a failure for the one it was running if it died."""
    config = item.config
    fd, path = tempfile.mkstemp(prefix="qharness-isolated-", suffix=".jsonl")
    os.close(fd)
    env = {**os.environ, REPORTS_ENV: path}
    ini = ["-c", str(config.inipath)] if config.inipath else []
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(config.rootpath), *ini,
           "-o", "addopts=", *[i.nodeid for i in batch]]
    why = None
    try:
        proc = subprocess.run(cmd, cwd=config.rootpath, env=env, capture_output=True, text=True,
                              timeout=CHILD_TIMEOUT_S, stdin=subprocess.DEVNULL)
        output = proc.stdout + proc.stderr
        if proc.returncode < 0:
            why = f"the test process died: {_signal_name(proc.returncode)}"
        elif proc.returncode not in (0, 1):  # 1: some test failed (its report says which)
            why = f"the test process exited with status {proc.returncode}"
    except subprocess.TimeoutExpired as exc:
        output = (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        why = f"the test process timed out after {CHILD_TIMEOUT_S} s"
    started = None
    reports: dict[str, list[TestReport]] = {}
    for line in Path(path).read_text().splitlines():
        try:
            data = json.loads(line)
        except json.JSONDecodeError:
            break  # torn by the crash
        if "start" in data:
            started = data["start"]
            reports.setdefault(started, [])
        else:
            rep = config.hook.pytest_report_from_serializable(config=config, data=data["report"])
            if isinstance(rep.longrepr, list):  # a skip's (path, line, reason): a tuple before JSON
                rep.longrepr = tuple(rep.longrepr)
            reports.setdefault(rep.nodeid, []).append(rep)
            if rep.when == "teardown":
                _results[rep.nodeid] = reports[rep.nodeid]
                started = None
    os.unlink(path)
    by_id = {i.nodeid: i for i in batch}
    if started is not None and started in by_id:  # it died inside this test
        _results[started] = [r for r in reports.get(started, []) if r.when == "setup"] + [
            _crash_report(by_id[started], why or "the test process ended inside this test", output)]
    elif item.nodeid not in _results:  # it died before reaching the first test (collection, import)
        _results[item.nodeid] = [_crash_report(item, why or "the isolated run did not run this test", output)]


def pytest_runtest_protocol(item: pytest.Item, nextitem) -> bool | None:
    if not _isolated(item):
        return None
    if item.nodeid not in _results:
        same_module = [i for i in item.session.items if i.path == item.path and _isolated(i)
                       and i.nodeid not in _results]
        batch = same_module[same_module.index(item):] if item in same_module else [item]
        _run_child(item, batch)
    item.ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
    for report in _results.pop(item.nodeid):
        item.ihook.pytest_runtest_logreport(report=report)
    item.ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)
    # what the skipped teardown phase would do here: collectors the next test does not share (the
    # previous test's folder, when this module is the last of its folder) are torn down
    item.session._setupstate.teardown_exact(nextitem)
    return True
