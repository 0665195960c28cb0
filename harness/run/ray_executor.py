"""Run a suite's cells as Ray tasks on a cluster (or a local Ray instance), `--executor ray`.

Why this shape:
- Each cell is one Ray task that runs the very same `python -m harness.run.worker CELL_DIR` subprocess
  as the local executor (LocalExecutor.spawn: own process group, the cell's timeout, PDEATHSIG
  tied to the Ray worker process), in a scratch directory on the node. A crashing backend costs
  only its cell, and a killed Ray worker takes its cell's subprocess with it.
- The task ships the cell directory's files (values.jsonl, done.json, worker.log, per-token
  artifacts) back; the driver writes them into the run directory and reads the outcome from them
  with `collect_outcome`, exactly as for a local cell. The driver is the only writer: records,
  resume and reports do not know where a cell ran.
- Resources per cell: CPUs (`cpus_per_cell`), GPUs (the cell's `gpus` on cuda, all on one node),
  memory (estimated from the model's linear layers, or given), and `hw:<profile>` (a custom
  resource of 0.001) when the suite pins a hardware profile: start such nodes with
  `ray start --resources "$(python -m harness.run.ray_executor node-resources)"`.
- Worker loss (node died, worker process killed, Ray's OOM killer) is retried `max_retries` times
  by Ray; a cell that fails by itself (its worker exits non-zero, times out) is not retried: it is
  recorded as failed with its reason, like locally. A loss after the last retry is recorded as
  failed with Ray's reason.
- A reference cell runs before the cells that pair with it; its artifacts go to them through the
  object store (put once, small: per-token NLLs). Quantized artifacts are shared through the
  cache directory instead (QHARNESS_CACHE on a shared filesystem, forwarded to every task): see
  docs/RAY.md for why.
"""

from __future__ import annotations

import os
import socket
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness import hardware
from harness.run import worker
from harness.errors import HarnessError
from harness.metrics import get_measurement
from harness.run.executor import (CellDirFn, CellOutcome, CellProgressFn, Executor, LocalExecutor, StartFn,
                              WorkerExit, collect_outcome)
from harness.run.planner import resolve_device
from harness.run.suite import CellSpec

HW_PREFIX = "hw:"
HW_SHARE = 0.001  # of a node's hw:<profile> resource per cell: a label, not a limit
FORWARD_PREFIXES = ("QHARNESS_", "HF_")  # environment the driver passes on to every cell
GiB = 1024**3


def _ray():
    try:
        import ray
    except ImportError:
        raise HarnessError("the ray executor needs Ray: pip install 'qharness[ray]'") from None
    return ray


@dataclass
class ShippedCell:
    """What a task sends back: the cell directory's files and how its worker ended."""

    ended: WorkerExit
    files: dict[str, bytes]
    not_shipped: list[str] = field(default_factory=list)  # files over max_file_bytes (left on the node)
    node: dict[str, Any] = field(default_factory=dict)


def run_cell_on_node(cell_json: str, reference: dict[str, bytes] | None, env: dict[str, str],
                     max_file_bytes: int) -> ShippedCell:
    """The body of a Ray task: run the cell's worker in a scratch directory, return its files."""
    cell = CellSpec.model_validate_json(cell_json)
    with tempfile.TemporaryDirectory(prefix="qharness-cell-") as tmp:
        cells = Path(tmp) / "cells"
        if reference is not None and cell.reference_cell_id:
            ref_dir = cells / cell.reference_cell_id
            ref_dir.mkdir(parents=True)
            for name, data in reference.items():  # relative paths: the stored log-probabilities are a folder
                (ref_dir / name).parent.mkdir(parents=True, exist_ok=True)
                (ref_dir / name).write_bytes(data)
        cell_dir = cells / cell.cell_id
        cell_dir.mkdir(parents=True)
        # os.environ of the Ray worker carries CUDA_VISIBLE_DEVICES for the GPUs Ray assigned
        ended = LocalExecutor(env={**os.environ, **env}).spawn(cell, cell_dir)
        files, not_shipped = {}, []
        for path in sorted(cell_dir.rglob("*")):
            name = str(path.relative_to(cell_dir))
            if not path.is_file() or name == worker.CELL:
                continue
            if path.stat().st_size > max_file_bytes:
                not_shipped.append(name)
            else:
                files[name] = path.read_bytes()
    return ShippedCell(ended, files, not_shipped, _node_info(cell))


def _node_info(cell: CellSpec) -> dict[str, Any]:
    ray = _ray()
    info: dict[str, Any] = {"host": socket.gethostname()}
    try:
        info["node_id"] = ray.get_runtime_context().get_node_id()
        info["gpu_ids"] = [str(g) for g in ray.get_gpu_ids()]
    except Exception:  # noqa: BLE001 - provenance only
        pass
    try:
        from harness import hardware

        info["hardware_profile"], info["device_name"] = hardware.detect(cell.device)
    except Exception:  # noqa: BLE001 - provenance only: the driver's profile stands in
        pass
    return info


def node_resources(device: str = "auto") -> dict[str, float]:
    """This machine's hardware-profile label for `ray start --resources` (one unit per node)."""
    profile, _ = hardware.detect(resolve_device(device))
    return {f"{HW_PREFIX}{profile}": 1.0}


class RayExecutor(Executor):
    """Cells as Ray tasks, run at once as the cluster's resources allow; see the module docstring."""

    name = "ray"

    def __init__(self, address: str | None = None, max_retries: int = 2, cpus_per_cell: float = 1.0,
                 memory_per_cell: float | None = None, env: dict[str, str] | None = None,
                 init_kwargs: dict[str, Any] | None = None, max_file_bytes: int = 256 * 1024**2):
        """address: None starts a local Ray instance (this machine's CPUs and GPUs); 'auto' or
        'ray://host:port' joins a running cluster. memory_per_cell (bytes): None estimates it
        from the model. env: extra environment for every cell (QHARNESS_* and HF_* are passed on)."""
        import importlib.util

        if importlib.util.find_spec("ray") is None:
            _ray()  # the one-line "pip install 'qharness[ray]'" error, before any planning
        self.address = address
        self.max_retries = max_retries
        self.cpus_per_cell = cpus_per_cell
        self.memory_per_cell = memory_per_cell
        self.env = {k: v for k, v in os.environ.items() if k.startswith(FORWARD_PREFIXES)} | dict(env or {})
        self.env.pop("QHARNESS_DRIVER_PID", None)
        self.init_kwargs = dict(init_kwargs or {})
        self.max_file_bytes = max_file_bytes
        self._started_ray = False
        self._infeasible: dict[str, str] = {}
        self._pending: dict[Any, tuple[CellSpec, float]] = {}
        self._model_bytes: dict[str, int] = {}

    # -- connection and resources ---------------------------------------------------------------
    def connect(self) -> None:
        ray = _ray()
        if ray.is_initialized():
            return
        kwargs: dict[str, Any] = {"log_to_driver": False, **self.init_kwargs}
        if self.address is None:
            kwargs.setdefault("include_dashboard", False)
            # Ray's memory monitor retries the tasks it kills forever by default: a cell that
            # really needs more memory than the node has would never end
            kwargs.setdefault("_system_config", {"task_oom_retries": self.max_retries})
        try:
            ray.init(address=self.address, **kwargs)
        except Exception as exc:  # noqa: BLE001 - connection problems of every kind: one line
            where = self.address or "a new local instance"
            raise HarnessError(f"cannot start Ray ({where}): {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
        self._started_ray = True

    def options(self, cell: CellSpec) -> dict[str, Any]:
        """Ray task options for one cell: what it needs, and how often worker loss is retried."""
        resources = {f"{HW_PREFIX}{cell.hardware}": HW_SHARE} if cell.hardware else {}
        return {
            "num_cpus": self.cpus_per_cell,
            "num_gpus": cell.gpus if cell.device.startswith("cuda") else 0,
            "memory": int(self.memory_per_cell if self.memory_per_cell is not None else self.estimate_memory(cell)),
            "resources": resources,
            "max_retries": self.max_retries,
            "retry_exceptions": False,  # the task body never raises for a failing cell
            "name": f"qharness {cell.backend}:{cell.variant} {cell.cell_id}",
        }

    def estimate_memory(self, cell: CellSpec) -> int:
        """Host memory a cell needs: its model in float32 (the loader's dtype), twice when a
        measurement loads the reference model beside it (outliers, sensitivity), plus 1 GiB for the
        interpreter and libraries.
        0 (nothing reserved) when the model's shapes cannot be read here."""
        if cell.model not in self._model_bytes:
            from harness.models.zoo import model_shapes, resolve_model

            try:
                shapes = model_shapes(resolve_model(cell.model, prepare=True))
                self._model_bytes[cell.model] = 4 * sum(s.in_features * s.out_features for s in shapes.linears)
            except HarnessError:
                self._model_bytes[cell.model] = -1
        if self._model_bytes[cell.model] < 0:
            return 0

        both = cell.reference and any(get_measurement(m["name"]).needs_reference_model for m in cell.measurements)
        copies = 2 if both else 1
        return int(1.2 * copies * self._model_bytes[cell.model] + GiB)

    def prepare(self, cells: list[CellSpec], profile: str) -> None:
        if not cells:
            return
        self.connect()
        nodes = [n.get("Resources", {}) for n in _ray().nodes() if n.get("Alive")]
        self._infeasible = {}
        for cell in cells:
            reason = _infeasible(self.options(cell), nodes)
            if reason:
                self._infeasible[cell.cell_id] = reason
        if len(self._infeasible) == len(cells):
            raise HarnessError(f"no node of the Ray cluster can run these cells: {next(iter(self._infeasible.values()))}")

    # -- running --------------------------------------------------------------------------------
    def run(self, cell: CellSpec, cell_dir: Path, progress=None) -> CellOutcome:
        for _, outcome in self.run_many([cell], lambda cell_id: cell_dir.parent / cell_id):
            return outcome
        raise AssertionError("unreachable")

    def run_many(self, cells: list[CellSpec], cell_dir: CellDirFn, on_start: StartFn | None = None,
                 progress: CellProgressFn | None = None) -> Iterator[tuple[CellSpec, CellOutcome]]:
        """Submit every cell whose reference (if it runs in this batch) has finished; yield each
        cell as it finishes, writing its files first; submit its dependents."""
        if not cells:
            return
        self.connect()
        ray = _ray()
        remote = ray.remote(run_cell_on_node)
        batch = {c.cell_id for c in cells}
        waiting: dict[str, list[CellSpec]] = {}
        shared_refs: dict[str, Any] = {}

        def submit(cell: CellSpec) -> None:
            if on_start:
                on_start(cell)
            payload = None
            if cell.reference_cell_id:
                if cell.reference_cell_id not in shared_refs:
                    shared_refs[cell.reference_cell_id] = ray.put(_reference_files(cell_dir(cell.reference_cell_id)))
                payload = shared_refs[cell.reference_cell_id]
            ref = remote.options(**self.options(cell)).remote(cell.model_dump_json(), payload, self.env, self.max_file_bytes)
            self._pending[ref] = (cell, time.monotonic())

        try:
            for cell in cells:
                if cell.cell_id in self._infeasible:
                    continue
                if cell.reference_cell_id in batch and cell.reference_cell_id not in self._infeasible:
                    waiting.setdefault(cell.reference_cell_id, []).append(cell)
                else:
                    submit(cell)
            for cell in cells:
                if cell.cell_id in self._infeasible:
                    yield cell, CellOutcome("failed", error=f"not run: {self._infeasible[cell.cell_id]}",
                                            provenance={"executor": self._provenance(cell)})
            while self._pending:
                ready, _ = ray.wait(list(self._pending), num_returns=1)
                cell, started = self._pending.pop(ready[0])
                outcome = self._outcome(cell, ready[0], cell_dir(cell.cell_id), started)
                for dependent in waiting.pop(cell.cell_id, []):
                    submit(dependent)  # after its reference's files are in the run directory
                yield cell, outcome
        finally:
            self._cancel_pending()

    def _outcome(self, cell: CellSpec, ref, cell_dir: Path, started: float) -> CellOutcome:
        ray = _ray()
        from ray.exceptions import RayError, RayTaskError

        executor_info = self._provenance(cell)
        try:
            shipped: ShippedCell = ray.get(ref)
        except RayTaskError as exc:  # our task body raised: e.g. harness missing on that node
            cause = exc.cause if getattr(exc, "cause", None) is not None else exc
            return CellOutcome("failed", error=f"Ray task failed on its node: {type(cause).__name__}: {_first_line(cause)}",
                               provenance={"executor": executor_info}, duration_s=time.monotonic() - started)
        except RayError as exc:  # worker or node lost, out of memory, cancelled: after max_retries
            tries = f"{self.max_retries + 1} attempt{'s' * bool(self.max_retries)}"
            return CellOutcome("failed", error=f"Ray worker lost ({tries}): {type(exc).__name__}: {_first_line(exc)}",
                               provenance={"executor": executor_info}, duration_s=time.monotonic() - started)
        for stale in (worker.VALUES, worker.DONE):
            (cell_dir / stale).unlink(missing_ok=True)
        (cell_dir / worker.CELL).write_text(cell.model_dump_json(indent=2))
        for name, data in shipped.files.items():
            target = cell_dir / Path(name)
            if ".." in Path(name).parts:
                continue  # only the cell's own folder
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        outcome = collect_outcome(cell, cell_dir, shipped.ended)
        executor_info.update({k: v for k, v in shipped.node.items() if k not in ("hardware_profile",)})
        if shipped.not_shipped:
            executor_info["not_shipped"] = shipped.not_shipped
        outcome.provenance = {**outcome.provenance, "executor": executor_info}
        outcome.hardware_profile = shipped.node.get("hardware_profile")
        return outcome

    def _provenance(self, cell: CellSpec) -> dict[str, Any]:
        opts = self.options(cell)
        return {"name": self.name, "address": self.address or "local", "gpus": opts["num_gpus"],
                "cpus": opts["num_cpus"], "memory_bytes": opts["memory"], "resources": opts["resources"],
                "max_retries": self.max_retries}

    def _cancel_pending(self) -> None:
        if not self._pending:
            return
        ray = _ray()
        for ref in list(self._pending):
            try:
                ray.cancel(ref, force=True)  # kills the Ray worker; PDEATHSIG takes the cell's process
            except Exception:  # noqa: BLE001 - best effort on the way out
                pass
        self._pending.clear()

    def close(self) -> None:
        self._cancel_pending()
        if self._started_ray:
            _ray().shutdown()
            self._started_ray = False


def _reference_files(ref_dir: Path) -> dict[str, bytes]:
    """The reference cell's artifacts that paired measurements read (not its log or spec)."""
    skip = {"worker.log", worker.CELL}
    if not ref_dir.is_dir():
        return {}
    return {str(p.relative_to(ref_dir)): p.read_bytes() for p in sorted(ref_dir.rglob("*"))
            if p.is_file() and str(p.relative_to(ref_dir)) not in skip}


def _infeasible(options: dict[str, Any], nodes: list[dict[str, float]]) -> str | None:
    """Why no node could ever run a task with these options (None if one can)."""
    need = {"CPU": options["num_cpus"], "GPU": options["num_gpus"], "memory": options["memory"], **options["resources"]}
    need = {k: v for k, v in need.items() if v}
    for node in nodes:
        if all(node.get(k, 0) >= v for k, v in need.items()):
            return None
    missing = [k for k in need if not any(node.get(k, 0) >= need[k] for node in nodes)]
    what = ", ".join(f"{k}={need[k] / GiB:.1f} GiB" if k == "memory" else f"{k}={need[k]:g}" for k in missing or need)
    return f"needs {what} on one node; the cluster's {len(nodes)} node(s) have {_summary(nodes)}"


def _summary(nodes: list[dict[str, float]]) -> str:
    parts = []
    for node in nodes[:4]:
        hw = [k for k in node if k.startswith(HW_PREFIX)]
        parts.append(f"CPU={node.get('CPU', 0):g} GPU={node.get('GPU', 0):g} memory={node.get('memory', 0) / GiB:.0f} GiB"
                     + (f" {','.join(hw)}" if hw else ""))
    return "; ".join(parts) + (" ..." if len(nodes) > 4 else "")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else ""


def main(argv: list[str] | None = None) -> int:
    """`python -m harness.run.ray_executor node-resources [DEVICE]`: JSON for `ray start --resources`."""
    import json
    import sys

    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] != "node-resources":
        print("usage: python -m harness.run.ray_executor node-resources [auto|cpu|cuda]", file=sys.stderr)
        return 2
    print(json.dumps(node_resources(argv[1] if len(argv) > 1 else "auto")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
