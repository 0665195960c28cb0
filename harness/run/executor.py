"""Executors run cells. `LocalExecutor` runs each cell in its own Python process with a timeout,
so a segfault, os._exit, hang, CUDA error or out-of-memory costs only that cell. Other executors
(`ray`: harness/run/ray_executor.py) run that same worker process elsewhere and hand its cell directory
back; the outcome is always read from the files by `collect_outcome`, and only the driver writes
records. Executors are chosen by name from EXECUTORS."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from harness.errors import HarnessError
from harness.metrics import get_measurement
from harness.run import worker, zygote
from harness.registry import Registry
from harness.run.suite import CellSpec

ProgressFn = Callable[[int, int, str], None]
CellDirFn = Callable[[str], Path]  # cell_id -> its directory in the run dir (created)
StartFn = Callable[[CellSpec], None]
CellProgressFn = Callable[[CellSpec, int, int, str], None]


@dataclass
class CellOutcome:
    status: str  # "ok" | "failed" | "skipped"
    values: list[dict] = field(default_factory=list)  # {"measurement": ..., **MetricValue}
    provenance: dict = field(default_factory=dict)
    error: str | None = None
    duration_s: float = 0.0
    hardware_profile: str | None = None  # where the cell ran, when not on the driver's hardware (Ray)


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


def _kill_group(proc) -> None:
    """Kill the worker's process group (it and what it started); the worker alone if it has no
    group of its own yet (a forked worker killed before its setsid)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        try:
            proc.kill()
        except (ProcessLookupError, OSError):
            pass
    proc.wait()


@dataclass
class WorkerExit:
    """How a worker process ended (what the cell directory cannot say by itself)."""

    returncode: int | None
    timed_out: bool
    duration_s: float


class Executor:
    """The executor interface. `run_many` runs cells (in any order, possibly at once) and yields
    each (cell, outcome) as it finishes; the runner writes its records right then, so the driver
    stays the only writer and a killed run keeps every cell it had received. Sequential by default."""

    name = "base"

    def prepare(self, cells: list[CellSpec], profile: str) -> None:
        """Check, before any cell runs, that these cells can run here (`profile`: the driver's
        hardware profile); raise HarnessError with one line if not."""

    def warm_up(self, device: str) -> None:
        """Called before planning (`device`: auto, cpu or cuda): start what can start early."""

    def run(self, cell: CellSpec, cell_dir: Path, progress: ProgressFn | None = None) -> CellOutcome:
        raise NotImplementedError

    def run_many(self, cells: list[CellSpec], cell_dir: CellDirFn, on_start: StartFn | None = None,
                 progress: CellProgressFn | None = None) -> Iterator[tuple[CellSpec, CellOutcome]]:
        for cell in cells:
            if on_start:
                on_start(cell)
            step = (lambda d, t, w, c=cell: progress(c, d, t, w)) if progress else None
            yield cell, self.run(cell, cell_dir(cell.cell_id), progress=step)

    def close(self) -> None:
        """Release what the executor holds (connections, tasks in flight)."""


def collect_outcome(cell: CellSpec, cell_dir: Path, ended: WorkerExit) -> CellOutcome:
    """The cell's outcome from its directory (values.jsonl, done.json, worker.log) and how its
    worker ended: the one place where files become an outcome, wherever the worker ran."""
    values = _read_values(cell_dir)
    done = cell_dir / worker.DONE
    if not ended.timed_out and ended.returncode == 0 and done.exists():
        return CellOutcome("ok", values, json.loads(done.read_text()), None, ended.duration_s)
    reason = LocalExecutor._reason(ended.returncode, ended.timed_out, cell, cell_dir / "worker.log")
    return CellOutcome("failed", values, {}, reason, ended.duration_s)


class LocalExecutor(Executor):
    """Sequential process-per-cell execution on this machine.

    The next cells' workers are started ahead ("warm": their interpreter up and torch,
    transformers and the harness imported, ~5-10 s on 2 cores; with a CUDA context where cells use
    CUDA) while the driver plans and while the current cell runs, then handed their cell: one
    process per cell still, without the start-up on the critical path. One ahead on a small
    machine; three where there are 8 or more cores (on the lent H200 machine a worker took ~14 s
    to start, while most llm-int4 cells ran in 6-10 s: with one ahead, every other cell waited for
    it). Never beside a cell whose measurements are timings (`Measurement.timed`): in a run with
    such cells only one is started ahead, and not while a timed cell runs."""

    name = "local"

    def __init__(self, python: str = sys.executable, env: dict[str, str] | None = None, warm: bool = True,
                 ahead: int | None = None):
        self.python = python
        self.env = env
        self.warm = warm
        self.ahead = ahead if ahead is not None else (3 if (os.cpu_count() or 1) >= 8 else 1)
        self._spares: list[tuple[subprocess.Popen, Path]] = []
        self._no_forks = False  # set when the fork server failed: interpreters instead

    def prepare(self, cells: list[CellSpec], profile: str) -> None:
        pinned = {c.hardware for c in cells if c.hardware} - {profile}
        if pinned:
            raise HarnessError(f"the suite pins hardware '{sorted(pinned)[0]}' but this machine is '{profile}' "
                               "(run it where that hardware is, e.g. --executor ray on a cluster that has it)")
        many = max((c.gpus for c in cells), default=1)
        if many > 1:
            import torch

            if torch.cuda.device_count() < many:
                raise HarnessError(f"a cell needs {many} GPUs but this machine has {torch.cuda.device_count()}")

    def run(self, cell: CellSpec, cell_dir: Path, progress: ProgressFn | None = None) -> CellOutcome:
        return collect_outcome(cell, cell_dir, self.spawn(cell, cell_dir, progress))

    def warm_up(self, device: str) -> None:
        """The first worker starts while the driver plans: on a CPU, the fork server's imports
        (workers are forked once the plan says which models they load); else an interpreter."""
        on_gpu = device == "cuda" or (device == "auto" and os.path.exists("/dev/nvidiactl"))
        if not on_gpu and self._forks(cuda=False):
            try:
                zygote.start()
                return
            except (OSError, RuntimeError):
                self._no_forks = True
        self._start_spares(cuda=device != "cpu", count=1)

    def _forks(self, cuda: bool) -> bool:
        """Whether warm workers are forked from harness.run.zygote's server (CPU runs on Linux
        with this interpreter) instead of started as interpreters."""
        return self.warm and self.python == sys.executable and not self._no_forks and zygote.usable(cuda)

    def _new_worker(self, cuda: bool, log: Path, err):
        """A waiting worker: forked where it can be (an interpreter if the fork server fails)."""
        if self._forks(cuda):
            try:
                return zygote.ForkedWorker(self._env(cuda), log)
            except (OSError, RuntimeError, EOFError):
                self._no_forks = True  # e.g. the server died in its imports: interpreters from now on
        return subprocess.Popen([self.python, "-m", "harness.run.worker", worker.WAIT], stdout=subprocess.PIPE,
                                stderr=err, stdin=subprocess.PIPE, text=True, env=self._env(cuda), start_new_session=True)

    def run_many(self, cells, cell_dir, on_start=None, progress=None):
        """As Executor.run_many, with the next cell's worker warming up beside the current cell
        (unless the current cell is timed) and the first one beside the driver's planning."""
        cuda = any(c.device == "cuda" for c in cells)
        timed = [any(get_measurement(m["name"]).timed for m in c.measurements) for c in cells]
        ahead = 1 if any(timed) else self.ahead
        if not cells:
            self.close()
        for position, (proc, _) in enumerate(self._spares[:len(cells)]):  # started before the plan was known
            self._tell_model(proc, cells[position].model)
        if cells:
            self._start_spares(cuda, 1, [c.model for c in cells])
        for k, cell in enumerate(cells):
            if on_start:
                on_start(cell)
            step = (lambda d, t, w, c=cell: progress(c, d, t, w)) if progress else None
            left = len(cells) - k - 1
            upcoming = [c.model for c in cells[k + 1:]]
            outcome = self.run_cell(cell, cell_dir(cell.cell_id), step, warm_next=0 if timed[k] else min(ahead, left),
                                    cuda=cuda, upcoming=upcoming)
            if timed[k] and left:
                self._start_spares(cuda, 1, upcoming)
            yield cell, outcome

    def run_cell(self, cell: CellSpec, cell_dir: Path, progress: ProgressFn | None = None, warm_next: int = 0,
                 cuda: bool = False, upcoming: list[str] | None = None) -> CellOutcome:
        return collect_outcome(cell, cell_dir, self.spawn(cell, cell_dir, progress, warm_next, cuda, upcoming))

    def _env(self, cuda: bool = False) -> dict[str, str]:
        env = dict(os.environ if self.env is None else self.env)
        env.setdefault("PYTHONUNBUFFERED", "1")
        env["QHARNESS_DRIVER_PID"] = str(os.getpid())
        if cuda:
            env["QHARNESS_WARM_CUDA"] = "1"
        return env

    def _start_spares(self, cuda: bool, count: int, upcoming: list[str] | None = None) -> None:
        """Workers that import everything and wait on stdin for their cell folder, until `count`
        are waiting. `upcoming`: the models of the cells they will take, in order (each is told
        its own, to load while it waits)."""
        import tempfile

        while self.warm and len(self._spares) < count:
            fd, log = tempfile.mkstemp(prefix="qharness-warm-", suffix=".log")
            with os.fdopen(fd, "w") as err:
                proc = self._new_worker(cuda, Path(log), err)
            if upcoming and len(self._spares) < len(upcoming):
                self._tell_model(proc, upcoming[len(self._spares)])
            self._spares.append((proc, Path(log)))

    @staticmethod
    def _tell_model(proc: subprocess.Popen, model: str) -> None:
        """Tell a waiting worker the model of the cell it will take (harness.run.worker._preload)."""
        try:
            assert proc.stdin is not None
            proc.stdin.write(f"{worker.PRELOAD}{model}\n")
            proc.stdin.flush()
        except OSError:
            pass  # it died: _take_spare finds out

    def _take_spare(self, cell_dir: Path) -> subprocess.Popen | None:
        """The oldest warm worker, told its cell (its start-up log goes first into the cell's
        worker.log); None if there is none or it died while waiting."""
        if not self._spares:
            return None
        proc, log = self._spares.pop(0)
        early = log.read_text(errors="replace") if log.exists() else ""
        log.unlink(missing_ok=True)
        (cell_dir / "worker.log").write_text(early)
        if proc.poll() is not None:
            return None
        try:
            assert proc.stdin is not None
            proc.stdin.write(str(cell_dir) + "\n")
            proc.stdin.close()
        except OSError:
            _kill_group(proc)
            return None
        return proc

    def spawn(self, cell: CellSpec, cell_dir: Path, progress: ProgressFn | None = None, warm_next: int = 0,
              cuda: bool = False, upcoming: list[str] | None = None) -> WorkerExit:
        """Run the cell in a worker process (the warm one if there is one, else
        `python -m harness.run.worker CELL_DIR`) in its own process group, with the cell's timeout."""
        for stale in (worker.VALUES, worker.DONE):
            (cell_dir / stale).unlink(missing_ok=True)
        (cell_dir / worker.CELL).write_text(cell.model_dump_json(indent=2))
        start = time.monotonic()
        proc = self._take_spare(cell_dir)
        if proc is None:
            with open(cell_dir / "worker.log", "w") as log:
                proc = subprocess.Popen([self.python, "-m", "harness.run.worker", str(cell_dir)], stdout=subprocess.PIPE,
                                        stderr=log, stdin=subprocess.DEVNULL, text=True, env=self._env(cuda),
                                        start_new_session=True)  # its own process group: a timeout kills its children too
        if warm_next:
            self._start_spares(cuda, warm_next, upcoming)
        reader = threading.Thread(target=self._pump, args=(proc, progress), daemon=True)
        reader.start()
        timed_out = False
        try:
            proc.wait(timeout=cell.timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(proc)
        except BaseException:  # Ctrl-C in the driver: take the worker (and a warm one) down with it
            _kill_group(proc)
            self.close()
            raise
        reader.join(timeout=5)
        return WorkerExit(proc.returncode, timed_out, time.monotonic() - start)

    def close(self) -> None:
        while self._spares:
            proc, log = self._spares.pop()
            _kill_group(proc)
            log.unlink(missing_ok=True)

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


EXECUTORS: Registry[type[Executor]] = Registry("executor", {
    "local": "harness.run.executor:LocalExecutor",
    "ray": "harness.run.ray_executor:RayExecutor",  # pip install 'qharness[ray]'
})
