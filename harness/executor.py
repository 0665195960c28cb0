"""Executors run cells. `LocalExecutor` runs each cell in its own Python process with a timeout,
so a segfault, os._exit, hang, CUDA error or out-of-memory costs only that cell."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from harness import worker
from harness.suite import CellSpec

ProgressFn = Callable[[int, int, str], None]


@dataclass
class CellOutcome:
    status: str  # "ok" | "failed" | "skipped"
    values: list[dict] = field(default_factory=list)  # {"measurement": ..., **MetricValue}
    provenance: dict = field(default_factory=dict)
    error: str | None = None
    duration_s: float = 0.0


def _last_line(path: Path, limit: int = 400) -> str:
    try:
        lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    line = lines[-1] if lines else ""
    return line[:limit]


def _read_values(cell_dir: Path) -> list[dict]:
    path = cell_dir / worker.VALUES
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            break  # torn by a crash mid-write: keep what came before
    return out


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


class LocalExecutor:
    """Sequential process-per-cell execution on this machine."""

    name = "local"

    def __init__(self, python: str = sys.executable, env: dict[str, str] | None = None):
        self.python = python
        self.env = env

    def run(self, cell: CellSpec, cell_dir: Path, progress: ProgressFn | None = None) -> CellOutcome:
        for stale in (worker.VALUES, worker.DONE):
            (cell_dir / stale).unlink(missing_ok=True)
        (cell_dir / worker.CELL).write_text(cell.model_dump_json(indent=2))
        log_path = cell_dir / "worker.log"
        env = dict(os.environ if self.env is None else self.env)
        env.setdefault("PYTHONUNBUFFERED", "1")
        env["QHARNESS_DRIVER_PID"] = str(os.getpid())
        start = time.monotonic()
        with open(log_path, "w") as log:
            proc = subprocess.Popen(
                [self.python, "-m", "harness.worker", str(cell_dir)],
                stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL, text=True,
                env=env, start_new_session=True,  # its own process group: a timeout kills its children too
            )
            reader = threading.Thread(target=self._pump, args=(proc, progress), daemon=True)
            reader.start()
            timed_out = False
            try:
                proc.wait(timeout=cell.timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
                _kill_group(proc)
            except BaseException:  # Ctrl-C in the driver: take the worker down with it
                _kill_group(proc)
                raise
            reader.join(timeout=5)
        duration = time.monotonic() - start
        values = _read_values(cell_dir)
        done = cell_dir / worker.DONE
        if not timed_out and proc.returncode == 0 and done.exists():
            return CellOutcome("ok", values, json.loads(done.read_text()), None, duration)
        return CellOutcome("failed", values, {}, self._reason(proc.returncode, timed_out, cell, log_path), duration)

    @staticmethod
    def _pump(proc: subprocess.Popen, progress: ProgressFn | None) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            if progress is None:
                continue
            try:
                done, total, what = json.loads(line)["progress"]
            except (ValueError, KeyError, TypeError):
                continue  # a library printed to stdout: not ours
            progress(done, total, what)

    @staticmethod
    def _reason(returncode: int | None, timed_out: bool, cell: CellSpec, log_path: Path) -> str:
        if timed_out:
            return f"timed out after {cell.timeout_s:g} s (worker killed)"
        last = _last_line(log_path)
        if returncode is not None and returncode < 0:
            sig = signal.Signals(-returncode).name if -returncode in signal.Signals._value2member_map_ else str(-returncode)
            hint = " (likely out of memory: the kernel's OOM killer)" if sig == "SIGKILL" else ""
            return f"worker died: signal {sig}{hint}" + (f"; last log line: {last}" if last else "")
        if returncode == 0:
            return "worker exited without finishing its cell" + (f"; last log line: {last}" if last else "")
        if returncode == worker.EXIT_USER_ERROR and last.startswith("error: "):
            return last[len("error: "):]
        if returncode == 1 and last:  # the worker's own handler: the last line is the exception
            return last
        return f"worker exited with status {returncode}" + (f"; last log line: {last}" if last else "")
