"""Warm workers forked from one process that has imported everything a cell needs (Python's
multiprocessing fork server, preloading harness.run.warm_imports).

A worker started as `python -m harness.run.worker --wait` spends ~8 s of CPU importing torch,
transformers and the harness. On 2 cores that import ran at nice 19 beside the running cell and
was often not finished when the cell ended (llm-int4 on 2 cores: the next cell waited 2-4.5 s, 17
times a run). Forked from the server, a worker is ready at once, and each cell still runs in its
own process (its own session; a crash, hang or out-of-memory still costs only that cell).

Used on the CPU only, and only on Linux: the server never touches CUDA (a CUDA context does not
survive a fork), and GPU runs keep their interpreter-started workers, which create the CUDA
context while they wait. The server starts with the driver's environment; the worker applies the
environment and working directory of the moment it is forked, and a run whose environment differs
from the server's restarts the server, so what libraries read at import time is never stale.
The server holds no thread pool when it forks: it only imports, so torch has started no OpenMP
threads there (a test checks the server's threads)."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

PRELOAD = "harness.run.warm_imports"
_OWN_KEYS = ("QHARNESS_DRIVER_PID", "QHARNESS_WARM_CUDA", "PYTHONUNBUFFERED")  # set per worker by the executor
_server_env: dict[str, str] | None = None  # the environment the running server was started with


def usable(cuda: bool) -> bool:
    """Whether warm workers may be forked here: Linux, a CPU run, and the fork server available."""
    return (not cuda and sys.platform.startswith("linux") and "forkserver" in multiprocessing.get_all_start_methods()
            and not os.environ.get("QHARNESS_NO_FORK_SERVER"))


def start() -> None:
    """Have the fork server running with the driver's current environment (started in the
    background: its imports overlap the driver's planning; the first fork waits for them).
    Raises RuntimeError where a server with another environment cannot be restarted."""
    global _server_env
    from multiprocessing import forkserver

    env = _comparable(os.environ)
    if _server_env is not None and _server_env != env:
        stop = getattr(forkserver._forkserver, "_stop", None)  # noqa: SLF001 - the one way to restart it
        if stop is None:
            raise RuntimeError("the fork server runs with another environment and cannot be restarted")
        stop()
        _server_env = None
    multiprocessing.get_context("forkserver").set_forkserver_preload([PRELOAD])
    forkserver.ensure_running()
    _server_env = env


def _comparable(env) -> dict[str, str]:
    return {k: v for k, v in env.items() if k not in _OWN_KEYS}


class ForkedWorker:
    """A warm worker forked by the server, with the part of subprocess.Popen the executor uses:
    pid, stdin (text, for its cell folder), stdout (text, its progress lines), poll, wait, kill."""

    def __init__(self, env: dict[str, str], log: Path):
        from harness.run.worker import forked_main

        start()
        ctx = multiprocessing.get_context("forkserver")
        child_stdin, stdin = ctx.Pipe(duplex=False)
        stdout, child_stdout = ctx.Pipe(duplex=False)
        self._process = ctx.Process(target=forked_main, args=(child_stdin, child_stdout, str(log), dict(env), os.getcwd()),
                                    daemon=True)
        with _main_not_rerun():
            self._process.start()
        child_stdin.close()
        child_stdout.close()
        self.pid = self._process.pid
        self.stdin = os.fdopen(os.dup(stdin.fileno()), "w")
        self.stdout = os.fdopen(os.dup(stdout.fileno()), "r")
        stdin.close()
        stdout.close()

    @property
    def returncode(self) -> int | None:
        return self._process.exitcode

    def poll(self) -> int | None:
        return self._process.exitcode

    def wait(self, timeout: float | None = None) -> int:
        self._process.join(timeout)
        if self._process.exitcode is None:
            raise subprocess.TimeoutExpired(f"forked worker {self.pid}", timeout or 0)
        return self._process.exitcode

    def kill(self) -> None:
        self._process.kill()


@contextmanager
def _main_not_rerun():
    """multiprocessing re-runs the parent's __main__ script in every new process (as
    `__mp_main__`), for pickled functions defined there; a worker's target lives in
    harness.run.worker, and a user's script that calls run_suite without an
    `if __name__ == "__main__"` guard must not start runs in its workers. A main module named
    `__main__` is the one multiprocessing leaves alone, so it is named so while a worker starts."""
    main = sys.modules.get("__main__")
    if main is None:
        yield
        return
    had, spec = hasattr(main, "__spec__"), getattr(main, "__spec__", None)
    main.__spec__ = SimpleNamespace(name="__main__")
    try:
        yield
    finally:
        if had:
            main.__spec__ = spec
        else:
            del main.__spec__


def server_pid() -> int | None:
    """The fork server's pid while it runs (for checks and tests)."""
    from multiprocessing import forkserver

    return getattr(forkserver._forkserver, "_forkserver_pid", None)  # noqa: SLF001
