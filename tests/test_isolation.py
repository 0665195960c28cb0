"""tests/isolation.py: a native crash in a `native` test fails that test with its signal; the
module's other tests still run and report (pass, fail, skip) as usual."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

TESTS = Path(__file__).parent

CRASHY = '''
import os, signal
import pytest

pytestmark = pytest.mark.native


@pytest.fixture(scope="module")
def pid():
    return os.getpid()


def test_before(pid):
    assert os.environ.get("QHARNESS_ISOLATED_REPORTS")  # ran in the child pytest


def test_segfault():
    os.kill(os.getpid(), signal.SIGSEGV)


def test_after_the_crash(pid):
    assert os.environ.get("QHARNESS_ISOLATED_REPORTS")


def test_fails():
    assert 1 == 2, "an ordinary failure"


def test_skips():
    pytest.skip("not here")


def test_plain_in_child():
    pass
'''


def test_a_native_crash_fails_one_test(tmp_path: Path) -> None:
    shutil.copy(TESTS / "isolation.py", tmp_path / "isolation.py")
    (tmp_path / "conftest.py").write_text(textwrap.dedent("""
        from isolation import pytest_configure as configure, pytest_runtest_logreport, pytest_runtest_logstart, pytest_runtest_protocol  # noqa


        def pytest_configure(config):
            configure(config)
            config.addinivalue_line("markers", "native: in a child pytest")
        """))
    (tmp_path / "test_crashy.py").write_text(textwrap.dedent(CRASHY))
    (tmp_path / "test_plain.py").write_text(
        "import os\n\ndef test_in_parent():\n    assert not os.environ.get('QHARNESS_ISOLATED_REPORTS')\n")
    env = dict(os.environ)
    env.pop("QHARNESS_ISOLATED_REPORTS", None)
    env.pop("QHARNESS_NO_ISOLATION", None)
    proc = subprocess.run([sys.executable, "-m", "pytest", "-rA", "-p", "no:cacheprovider", "--rootdir", str(tmp_path),
                           "-o", "addopts=", str(tmp_path)], cwd=tmp_path, capture_output=True, text=True, env=env,
                          timeout=300)
    out = proc.stdout
    assert proc.returncode == 1, out
    assert "PASSED test_crashy.py::test_before" in out
    assert "FAILED test_crashy.py::test_segfault" in out and "SIGSEGV" in out
    assert "PASSED test_crashy.py::test_after_the_crash" in out  # a new child took the rest
    assert "FAILED test_crashy.py::test_fails" in out and "an ordinary failure" in out
    assert "SKIPPED" in out and "not here" in out
    assert "PASSED test_plain.py::test_in_parent" in out
    assert "2 failed, 4 passed, 1 skipped" in out
