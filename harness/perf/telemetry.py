"""Energy and memory telemetry as context managers returning small result objects.

Energy comes from NVML's total-energy counter (millijoules since driver load, Volta and newer):
the difference across a region, divided by the tokens produced in it, is J/token. Memory: the
allocator's peak (torch.cuda.max_memory_allocated), this process's memory as NVML sees it, and on
CPU the resident set size (psutil). pynvml (nvidia-ml-py, the `gpu` extra) is imported lazily;
where it is missing or the counter is unsupported, the result says why instead of a number."""

from __future__ import annotations

import os
from dataclasses import dataclass


def _nvml_handle(index: int = 0):
    import pynvml

    pynvml.nvmlInit()
    return pynvml, pynvml.nvmlDeviceGetHandleByIndex(index)


@dataclass
class Energy:
    joules: float | None = None
    note: str = ""


class EnergyMeter:
    """`with EnergyMeter(device) as e: work(); e.joules` (None and `e.note` when unavailable).
    The caller synchronises the device before leaving the block."""

    def __init__(self, device: str = "cpu"):
        self.device = str(device)
        self.result = Energy()
        self._start = None

    def __enter__(self) -> Energy:
        if not self.device.startswith("cuda"):
            self.result.note = "no energy counter on CPU here (NVML covers NVIDIA GPUs only)"
            return self.result
        try:
            import torch

            self._nvml, self._h = _nvml_handle(torch.cuda.current_device())
            self._start = self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._h)
        except Exception as exc:  # noqa: BLE001 - missing pynvml, old GPU, no permission
            self.result.note = f"NVML energy counter unavailable: {type(exc).__name__}: {exc}"
        return self.result

    def __exit__(self, *_) -> None:
        if self._start is None:
            return
        try:
            end = self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._h)
            self.result.joules = (end - self._start) / 1e3
            self.result.note = "NVML total energy consumption (whole GPU, not this process alone)"
        except Exception as exc:  # noqa: BLE001
            self.result.note = f"NVML energy read failed: {exc}"


@dataclass
class Memory:
    peak_allocated_bytes: int | None = None  # torch allocator peak inside the block (CUDA)
    process_bytes: int | None = None  # NVML per-process memory (CUDA) or RSS (CPU), at the end
    note: str = ""


class MemoryTracker:
    """`with MemoryTracker(device) as m: work(); m.peak_allocated_bytes, m.process_bytes`."""

    def __init__(self, device: str = "cpu"):
        self.device = str(device)
        self.result = Memory()

    def __enter__(self) -> Memory:
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        return self.result

    def __exit__(self, *exc) -> None:
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize()
            self.result.peak_allocated_bytes = int(torch.cuda.max_memory_allocated())
            self.result.process_bytes, self.result.note = nvml_process_bytes()
        else:
            import psutil

            self.result.process_bytes = int(psutil.Process().memory_info().rss)
            self.result.note = "resident set size (psutil)"


def nvml_process_bytes() -> tuple[int | None, str]:
    """This process's GPU memory per NVML; in containers PIDs may not match, then say so."""
    try:
        import torch

        nvml, h = _nvml_handle(torch.cuda.current_device())
        procs = nvml.nvmlDeviceGetComputeRunningProcesses(h)
    except Exception as exc:  # noqa: BLE001
        return None, f"NVML per-process memory unavailable: {type(exc).__name__}: {exc}"
    for p in procs:
        if p.pid == os.getpid() and p.usedGpuMemory is not None:
            return int(p.usedGpuMemory), "NVML per-process used memory"
    if len(procs) == 1 and procs[0].usedGpuMemory is not None:
        return int(procs[0].usedGpuMemory), "NVML used memory of the only compute process (PID namespaces differ)"
    return None, f"NVML lists {len(procs)} compute processes, none with this PID"
