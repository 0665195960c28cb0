"""Which weight buffers llama.cpp may use on this CPU: decided once per machine by a probe in a
child process, cached, and recorded with every llama.cpp cell.

llama.cpp repacks quantized weights at load into "extra" CPU buffer types: AMX tiles where the CPU
reports AMX_INT8, x86/ARM repack layouts elsewhere (`REPACK = 1` in its system line). On some
machines that path crashes the process: llama-cpp-python 0.3.36 built from source on a CPU that
reports AMX_INT8 / AVX512_BF16 logs "amx repack tensor blk.N... of type q4_1" and the first
`llama_decode` segfaults, with the shipped Q4_1 file and converted files alike; loading the same
file with `llama_model_params.use_extra_bufts = False` decodes correctly there
(shared/BACKEND-NOTES.md). Other machines of the same kind never take that path, so a green run
on one proves nothing on another.

A segfault cannot be caught, so the question is asked of a child process: load the file with
extra buffers and decode a batch and a single token; if the child dies (signal, error, timeout),
ask again with plain buffers. The answer is cached under the cache root keyed by the
llama-cpp-python version, llama.cpp's CPU feature line, the CPU's /proc/cpuinfo flags and the
file's tensor types (the repack path depends on the type), so each machine pays once (~2-5 s).

`QHARNESS_LLAMACPP_PROBE_FAULT=extra` makes the child die with SIGSEGV when it tries extra
buffers: the tests simulate a crashing machine with it (no AMX CPU needed)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from harness.adapters.gguf_convert import llama_cpp_version
from harness.errors import HarnessError
from harness.models.zoo import cache_root
from harness.results.provenance import cpu_flags

PROBE_TIMEOUT_S = 180
FAULT_ENV = "QHARNESS_LLAMACPP_PROBE_FAULT"


@dataclass(frozen=True)
class BufferChoice:
    """How llama.cpp loads weights on this machine, and why."""

    extra_bufts: bool  # llama_model_params.use_extra_bufts
    decided_by: str  # "probe", "cache" or "not probed (...)"
    reason: str
    cpu_features: str  # llama.cpp's system line (which kernels it was built with and found)
    key: str = ""

    def describe(self) -> dict[str, Any]:
        return asdict(self)

    def short(self) -> str:
        return ("extra buffers (repack/AMX)" if self.extra_bufts else "plain buffers") + f": {self.reason}"


def system_info() -> str:
    """llama.cpp's own CPU feature line, e.g. 'CPU : SSE3 = 1 | ... | AMX_INT8 = 1 | REPACK = 1 |'."""
    import llama_cpp

    return llama_cpp.llama_print_system_info().decode(errors="replace").strip()


@contextmanager
def model_params(**fields: Any):
    """Have llama-cpp-python's `Llama(...)` load with these `llama_model_params` fields set (its
    constructor takes no `use_extra_bufts`; it starts from `llama_model_default_params()`)."""
    import llama_cpp.llama_cpp as lib

    original = lib.llama_model_default_params

    def patched():
        params = original()
        for name, value in fields.items():
            setattr(params, name, value)
        return params

    lib.llama_model_default_params = patched
    try:
        yield
    finally:
        lib.llama_model_default_params = original


def _key(path: Path, features: str, version: str) -> str:
    # lazy: `import harness.adapters.llamacpp_cpu` stays free of numpy, pydantic, torch
    from harness.adapters.llamacpp import gguf_tensor_stats

    types = sorted(gguf_tensor_stats(path)["tensor_types"])
    blob = json.dumps([version, features, cpu_flags(), types, os.environ.get(FAULT_ENV, "")])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _probe(path: Path, extra: bool) -> str | None:
    """None if a child loads `path` and decodes with (extra) buffers; else why not, in one line."""
    cmd = [sys.executable, "-m", "harness.adapters.llamacpp_cpu", str(path), "1" if extra else "0"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=PROBE_TIMEOUT_S, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return f"probe hung (killed after {PROBE_TIMEOUT_S} s)"
    if proc.returncode == 0:
        return None
    if proc.returncode < 0:
        try:
            return f"probe died: signal {signal.Signals(-proc.returncode).name}"
        except ValueError:
            return f"probe died: signal {-proc.returncode}"
    lines = [ln.strip() for ln in (proc.stderr or "").splitlines() if ln.strip()]
    return f"probe failed: {lines[-1][:200] if lines else f'exit status {proc.returncode}'}"


def choose_buffers(path: str | Path) -> BufferChoice:
    """Whether llama.cpp may use its extra (repack/AMX) weight buffers for this file on this CPU:
    from the cache, else probed in child processes. Raises HarnessError when llama.cpp cannot
    decode the file here with either kind of buffer."""
    path = Path(path)
    features = system_info()
    key = _key(path, features, llama_cpp_version())
    cached = cache_root() / "llama.cpp-buffers" / f"{key}.json"
    if cached.is_file():
        try:
            data = json.loads(cached.read_text())
            return BufferChoice(bool(data["extra_bufts"]), "cache", str(data["reason"]), features, key)
        except (ValueError, KeyError):
            pass  # unreadable: probe again
    crash = _probe(path, extra=True)
    if crash is None:
        choice = BufferChoice(True, "probe", "extra buffers decode correctly here", features, key)
    else:
        plain = _probe(path, extra=False)
        if plain is not None:
            raise HarnessError(f"llamacpp: llama.cpp cannot decode {path.name} on this CPU "
                               f"(extra buffers: {crash}; plain buffers: {plain})")
        choice = BufferChoice(False, "probe", f"extra buffers crashed ({crash}); plain buffers work", features, key)
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_name(f"{cached.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"extra_bufts": choice.extra_bufts, "reason": choice.reason, "file": str(path),
                               "cpu_features": features, "cpu_flags": cpu_flags()}))
    os.replace(tmp, cached)
    return choice


def _child(path: str, extra: bool) -> int:
    """The probe itself: load, decode a 64-token batch (the matrix-matrix kernels) and one more
    token (matrix-vector), check the logits are finite."""
    import math

    from llama_cpp import Llama

    if extra and os.environ.get(FAULT_ENV) == "extra":
        os.kill(os.getpid(), signal.SIGSEGV)  # a simulated crashing repack path (tests)
    with model_params(use_extra_bufts=extra):
        llm = Llama(model_path=path, n_ctx=128, n_batch=64, n_ubatch=64, logits_all=True,
                    n_threads=os.cpu_count() or 1, n_gpu_layers=0, verbose=False)
    n = min(llm.n_vocab(), 64)
    llm.eval([(i % (n - 1)) + 1 for i in range(64)])
    llm.eval([1])
    if not all(math.isfinite(x) for x in llm.scores[64][:n]):
        print("non-finite logits", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1], sys.argv[2] == "1"))
