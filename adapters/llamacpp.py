"""GGUF quantization and inference through llama.cpp (llama-cpp-python): llama.cpp's own
quantizer (`llama_model_quantize`) and llama.cpp's own logits, on the token ids the harness
gives every backend (the HF tokenizer's; llama.cpp's tokenizer is never used).

Pipeline, each step cached under `harness.models.zoo.cache_root()`:

1. `ensure_converter()`: llama.cpp's `convert_hf_to_gguf.py` is in neither the `gguf` wheel nor
   the llama-cpp-python wheel, only in the llama-cpp-python sdist (vendor/llama.cpp/). The sdist of
   the *installed* version is fetched once with `pip download` and only the converter, its
   `conversion/` package, `gguf-py/` and `models/templates/` are extracted to
   `llama.cpp-<version>/`. Offline, point QHARNESS_CONVERT_HF_TO_GGUF at a converter instead.
2. The model's HF folder is converted to an F16 GGUF (a subprocess with this interpreter), under
   `gguf/<model-key>/`. The installed `gguf` package is used unless the converter uses names it
   lacks; then the converter's bundled gguf-py (llama-cpp-python 0.3.36's converter needs
   `gguf.LazyChunkedTensor`, absent from PyPI's gguf 0.19.0 despite the same version number).
   The converter imports `sentencepiece` for Llama vocabularies (in the `gguf` extra).
3. `llama_model_quantize` writes the requested type next to it (llama.cpp's quantization mixes:
   Q4_K_M keeps some tensors at Q6_K, and tensors whose width is not a multiple of 256 - SmolLM2's
   576 - fall back to a legacy type; `info["tensor_types"]` shows what was really written).

Quantizing source: by default from the F16 conversion of the HF weights, the same float weights
every other backend starts from, so the comparison is fair. `source: original` instead requantizes
the GGUF file the model was shipped as (allow_requantize): a double-quantization that only models
what a user holding nothing but that file would get.

No importance matrix: llama-cpp-python exposes no imatrix computation (llama.cpp's is the
`llama-imatrix` tool, not part of libllama's API), so the knob is not offered; the quantize
parameters do accept precomputed imatrix data, a possible later addition.

Bytes: `weight_bytes` sums the GGUF tensors' data (not the file, which also holds the
vocabulary); `linear_stats` counts the seven projection tensors of every block (the embedding and
the output head are left out, as lm_head is for every backend).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import json
import logging
import os
import re
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch

from harness.adapters.base import Adapter, Availability, CalibrationSet, ModelShapes, QuantizedModel, VariantConfig
from harness.adapters.gguf_convert import CONVERTER_ENV, llama_cpp_version, convert_to_f16, ensure_converter  # noqa: F401 (re-exported)
from harness.adapters.llamacpp_cpu import choose_buffers, system_info
from harness.errors import HarnessError
from harness.models.zoo import cache_root

_LINEAR_TENSOR = re.compile(r"^blk\.\d+\.(attn_q|attn_k|attn_v|attn_output|ffn_gate|ffn_up|ffn_down)\.weight$")

QType = Literal["F16", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_0", "Q3_K_M", "Q2_K", "original"]
_FTYPES = {
    "F16": "LLAMA_FTYPE_MOSTLY_F16", "Q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "Q6_K": "LLAMA_FTYPE_MOSTLY_Q6_K",
    "Q5_K_M": "LLAMA_FTYPE_MOSTLY_Q5_K_M", "Q4_K_M": "LLAMA_FTYPE_MOSTLY_Q4_K_M", "Q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
    "Q3_K_M": "LLAMA_FTYPE_MOSTLY_Q3_K_M", "Q2_K": "LLAMA_FTYPE_MOSTLY_Q2_K",
}


class LlamaCppVariant(VariantConfig):
    qtype: QType
    # what to quantize from: the F16 conversion of the HF weights (default: the same float weights
    # every backend starts from) or the GGUF file the model shipped as (requantization)
    source: Literal["f16", "original"] = "f16"

    def label(self) -> str:
        if self.qtype == "original" or self.source == "f16":
            return self.qtype
        return f"{self.qtype}-from-original"


# --- files -------------------------------------------------------------------------------------------

def _hf_dir(source: Any) -> Path:
    path = Path(source.path)
    if path.is_dir():
        return path
    try:  # a hub id: transformers has already downloaded it to the hub cache
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(source.path, local_files_only=True))
    except Exception as exc:  # noqa: BLE001
        raise HarnessError(f"llamacpp: no local folder for model '{source.name}' ({type(exc).__name__})") from None


def model_dir(source: Any) -> Path:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", source.name).strip("-")[:60]
    key = [str(source.path)]
    folder = Path(source.path)
    if folder.is_dir():  # weights rewritten in place get a new key
        for f in sorted(folder.glob("*")):
            if f.suffix in (".safetensors", ".bin", ".json") and f.is_file():
                st = f.stat()
                key.append(f"{f.name}:{st.st_size}:{st.st_mtime_ns}")
    digest = hashlib.sha1("\n".join(key).encode()).hexdigest()[:10]
    return cache_root() / "gguf" / f"{slug}-{digest}"


def _quiet_llama_cpp() -> None:
    """llama.cpp logs through llama-cpp-python's callback, which prints what its logger allows."""
    import llama_cpp  # noqa: F401 - installs the log callback

    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)


_LOG: list[str] = []


def _collect_log(level: int, text: bytes, user_data: Any) -> None:
    _LOG.append((text or b"").decode("utf-8", errors="replace"))


_COLLECTOR: Any = None  # the ctypes callback object; must stay alive while installed


@contextmanager
def _collected_llama_log():
    """Collect llama.cpp's log instead of printing it. Needed for the quantizer: llama-cpp-python
    0.3.36 maps ggml's log levels off by one (WARN reads as ERROR), so `verbose=False` still
    prints one fallback warning per tensor. Restores llama-cpp-python's own callback after."""
    global _COLLECTOR
    import llama_cpp
    from llama_cpp import _logger

    if _COLLECTOR is None:
        _COLLECTOR = llama_cpp.llama_log_callback(_collect_log)
    _LOG.clear()
    llama_cpp.llama_log_set(_COLLECTOR, ctypes.c_void_p(0))
    try:
        yield _LOG
    finally:
        llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))


def quantize_gguf(src: Path, dst: Path, qtype: str, allow_requantize: bool = False,
                  tensor_types: dict[str, int] | None = None) -> dict[str, Any]:
    """llama.cpp's quantizer, src -> dst (atomic); returns provenance (also kept next to dst).
    `tensor_types`: regex over tensor names -> ggml type, llama-quantize's --tensor-type overrides
    (`tt_overrides`; used by adapters/mixed.py)."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, _FTYPES[qtype])
    params.nthread = os.cpu_count() or 1
    params.allow_requantize = allow_requantize
    if tensor_types:  # a NULL-pattern-terminated array; the buffers must outlive the call
        overrides = (llama_cpp.llama_model_tensor_override * (len(tensor_types) + 1))()
        patterns = [ctypes.create_string_buffer(p.encode()) for p in tensor_types]
        for entry, pattern, ggml_type in zip(overrides, patterns, tensor_types.values()):
            entry.pattern, entry.type = ctypes.cast(pattern, ctypes.c_char_p), ggml_type
        params.tt_overrides = ctypes.cast(overrides, type(params.tt_overrides))
    tmp = dst.with_name(f"{dst.name}.{os.getpid()}.tmp")
    t0 = time.perf_counter()
    with _collected_llama_log() as log:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
    text = "".join(log)
    if rc != 0 or not tmp.is_file():
        tmp.unlink(missing_ok=True)
        errors = [ln.strip() for ln in text.splitlines() if "error" in ln.lower() or "failed" in ln.lower()]
        why = f": {errors[-1]}" if errors else ""
        raise HarnessError(f"llamacpp: llama_model_quantize {src.name} -> {qtype} failed (return code {rc}){why}")
    os.replace(tmp, dst)
    m = re.search(r"(\d+) of (\d+) tensor\(s\) required fallback quantization", text)
    meta = {"seconds": round(time.perf_counter() - t0, 1), "from": src.name, "allow_requantize": allow_requantize,
            # tensors whose width the requested block size does not divide get a legacy type instead
            "fallback_tensors": f"{m.group(1)} of {m.group(2)}" if m else "0"}
    dst.with_suffix(".json").write_text(json.dumps(meta))
    return meta


def gguf_tensor_stats(path: str | Path) -> dict[str, Any]:
    """Tensor data bytes, decoder-linear (weights, bytes) and counts per ggml type of a GGUF file.
    Read once per version of the file (path, size, modification time) and kept in the cache root:
    gguf's reader walks every metadata field on the way to the tensor table, the 49k-token
    vocabulary too (~3.5 s on 2 cores, twice per llama.cpp cell before this cache)."""
    path = Path(path).resolve()
    stat = path.stat()
    return json.loads(_cached_tensor_stats(str(path), stat.st_size, stat.st_mtime_ns))


@functools.lru_cache(maxsize=16)
def _cached_tensor_stats(path: str, size: int, mtime_ns: int) -> str:
    key = hashlib.sha256(json.dumps([path, size, mtime_ns]).encode()).hexdigest()[:16]
    cached = cache_root() / "gguf-stats" / f"{key}.json"
    try:
        text = cached.read_text()
        json.loads(text)  # a torn or foreign file: read the GGUF again
        return text
    except (OSError, ValueError):
        pass  # not there yet (or unreadable): read the file
    text = json.dumps(_read_tensor_stats(path))
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_name(f"{cached.name}.{os.getpid()}.tmp")
        tmp.write_text(text)
        os.replace(tmp, cached)
    except OSError:
        pass  # a read-only cache costs only the time
    return text


def _read_tensor_stats(path: str) -> dict[str, Any]:
    from gguf import GGUFReader

    reader = GGUFReader(path)
    total = lin_w = lin_b = 0
    types: Counter = Counter()
    for t in reader.tensors:
        total += int(t.n_bytes)
        types[t.tensor_type.name] += 1
        if _LINEAR_TENSOR.match(t.name):
            lin_w += int(t.n_elements)
            lin_b += int(t.n_bytes)
    return {"tensor_bytes": total, "linear_weights": lin_w, "linear_bytes": lin_b, "tensor_types": dict(sorted(types.items()))}


# --- the model --------------------------------------------------------------------------------------

class LlamaCppModel(QuantizedModel):
    """A GGUF file run by llama.cpp. `module` is an empty placeholder: nothing lives in torch."""

    def __init__(self, path: Path, device: torch.device, info: dict[str, Any]):
        stats = gguf_tensor_stats(path)
        super().__init__(torch.nn.Module(), device, info={**info, "tensor_types": stats["tensor_types"]})
        self.path = Path(path)
        self._stats = stats
        self._llm = None
        self._n_ctx = 0
        # extra llama.cpp context settings, e.g. KV-cache types (type_k/type_v, set by adapters/kvcache.py)
        self.context_kwargs: dict[str, Any] = {}
        # CPU weights: llama.cpp's repack/AMX buffers only where a probe showed they do not crash
        # (adapters/llamacpp_cpu.py); with every layer on the GPU they hold no weights
        if self.device.type == "cpu":
            from harness.adapters.llamacpp_cpu import choose_buffers

            self.buffers = choose_buffers(self.path)
            self.info["buffers"] = self.buffers.describe()
            self.info["kernel"] = f"{self.info.get('kernel', 'llama.cpp (cpu)')}, {self.buffers.short().split(':')[0]}"
        else:
            self.buffers = None

    def greedy_continuations(self, prompts: torch.Tensor, new_tokens: int, eos: int | None) -> list[list[int]]:
        """llama.cpp decoding token by token on its KV cache (the argmax of its own logits)."""
        llm = self._llama(prompts.shape[1] + new_tokens)
        out = []
        for prompt in prompts.tolist():
            llm.reset()
            llm.eval(prompt)
            tokens: list[int] = []
            for _ in range(new_tokens):
                nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
                tokens.append(nxt)
                if nxt == eos:
                    break
                llm.eval([nxt])
            out.append(tokens)
        return out

    def native_kv_cache_bytes(self, input_ids: torch.Tensor) -> int | None:
        import llama_cpp

        llm = self._llama(input_ids.shape[1])
        llm.reset()
        llm.eval(input_ids[0].tolist())
        return int(llama_cpp.llama_state_seq_get_size(llm._ctx.ctx, 0))

    def _llama(self, n_tokens: int):
        if self._llm is None or n_tokens > self._n_ctx:
            from llama_cpp import Llama

            _quiet_llama_cpp()
            self._llm = None  # free the old context first
            from harness.adapters.llamacpp_cpu import model_params

            threads = os.cpu_count() or 1
            fields = {} if self.buffers is None else {"use_extra_bufts": self.buffers.extra_bufts}
            with model_params(**fields):
                self._llm = Llama(model_path=str(self.path), n_ctx=n_tokens, n_batch=min(n_tokens, 512),
                                  logits_all=True, n_threads=threads, n_threads_batch=threads,
                                  n_gpu_layers=-1 if self.device.type == "cuda" else 0, verbose=False,
                                  **self.context_kwargs)
            self._n_ctx = n_tokens
        return self._llm

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        ids = input_ids.detach().cpu().to(torch.int64)
        if ids.dim() == 1:
            ids = ids[None]
        llm = self._llama(ids.shape[1])
        out = torch.empty(ids.shape[0], ids.shape[1], llm.n_vocab(), dtype=torch.float32)
        for b, row in enumerate(ids.tolist()):
            llm.reset()
            llm.eval(row)
            out[b].numpy()[:] = llm.scores[: len(row)]  # one copy out of llama.cpp's buffer (49k floats a token)
        return out

    def weight_bytes(self) -> int:
        return self._stats["tensor_bytes"]

    def linear_stats(self) -> tuple[int, int]:
        return self._stats["linear_weights"], self._stats["linear_bytes"]


class LlamaCppAdapter(Adapter):
    name: ClassVar[str] = "llamacpp"
    description: ClassVar[str] = "GGUF quantization and inference through llama.cpp (llama-cpp-python)"
    extra: ClassVar[str | None] = "gguf"
    Variant: ClassVar[type[VariantConfig]] = LlamaCppVariant
    packages: ClassVar[tuple[str, ...]] = ("llama-cpp-python", "gguf")

    def availability(self, device: str = "cpu") -> Availability:
        try:
            import llama_cpp
        except ImportError:
            return Availability.missing("llama-cpp-python", self.extra)
        except Exception as exc:  # noqa: BLE001 - e.g. the shared library fails to load
            return Availability(False, f"llama-cpp-python does not load: {type(exc).__name__}: {exc}".splitlines()[0])
        if str(device).startswith("cuda") and not llama_cpp.llama_supports_gpu_offload():
            return Availability(False, "this llama-cpp-python build has no GPU offload (built without CUDA)")
        return Availability(True)

    def environment_notes(self, device: str) -> list[str]:
        """llama.cpp's CPU features and its weight-buffer decision for the embedded GGUF (probed
        now if this machine has not decided yet; other files are decided at first use)."""
        lines = [f"llamacpp: {system_info()}"]
        if str(device).startswith("cuda"):
            return lines + ["llamacpp: weights on the GPU (every layer offloaded): no CPU buffer decision"]
        try:
            from harness.models.zoo import resolve_model

            gguf = resolve_model("builtin:smollm2-135m", prepare=False).meta["gguf_file"]
        except HarnessError:
            return lines + ["llamacpp: weight buffers are decided per GGUF file at first use (probe in a child process)"]
        choice = choose_buffers(gguf)
        return lines + [f"llamacpp: weight buffers for {Path(gguf).name} ({choice.decided_by}): {choice.short()}"]

    def check(self, variant: VariantConfig, shapes: ModelShapes, device: str) -> None:
        """Refuses `original` (qtype or source) for a model that did not come from a GGUF file
        (the planner's ModelShapes carry the model's source; quantize checks again)."""
        assert isinstance(variant, LlamaCppVariant)
        if "original" not in (variant.qtype, variant.source):
            return
        source = shapes.source
        if source is not None and not (getattr(source, "meta", None) or {}).get("gguf_file"):
            raise HarnessError(self._no_original(variant, getattr(source, "name", "?")))

    @staticmethod
    def _no_original(variant: LlamaCppVariant, model: str) -> str:
        if variant.qtype == "original":
            what, hint = "qtype 'original'", "pick a qtype such as Q4_K_M"
        else:
            what, hint = "source 'original'", "use source: f16"
        return (f"llamacpp: {what} needs a model shipped as a GGUF file (e.g. builtin:smollm2-135m); "
                f"model '{model}' is not one ({hint})")

    def quantize(
        self,
        model: torch.nn.Module,
        variant: VariantConfig,
        calibration: CalibrationSet | None,
        device: torch.device,
    ) -> QuantizedModel:
        """Convert (cached), quantize with llama.cpp (cached) and open the file with llama.cpp.
        The torch model is only asked where its weights came from (`model.qharness_source`)."""
        assert isinstance(variant, LlamaCppVariant)
        device = torch.device(device)
        source = getattr(model, "qharness_source", None)
        if source is None:
            raise HarnessError("llamacpp: the model has no qharness_source (load it with harness.models.zoo.load_model)")
        original = (source.meta or {}).get("gguf_file")
        if "original" in (variant.qtype, variant.source) and not original:
            raise HarnessError(self._no_original(variant, source.name))
        info: dict[str, Any] = {"kernel": f"llama.cpp ({'cuda' if device.type == 'cuda' else 'cpu'})"}
        folder = model_dir(source)
        folder.mkdir(parents=True, exist_ok=True)
        version = llama_cpp_version()

        if variant.qtype == "original":
            path = Path(original)
        else:
            if variant.source == "original":
                base, requantize = Path(original), True
            else:
                base, requantize = folder / f"f16-llama.cpp-{version}.gguf", False
                if base.is_file():
                    meta = json.loads(base.with_suffix(".json").read_text()) if base.with_suffix(".json").is_file() else {}
                    info["conversion"] = {**meta, "cached": True}
                else:
                    info["conversion"] = {**convert_to_f16(_hf_dir(source), base), "cached": False}
            if variant.qtype == "F16" and not requantize:
                path = base
            else:
                path = folder / f"{variant.label()}-llama.cpp-{version}.gguf"
                if path.is_file():
                    sidecar = path.with_suffix(".json")
                    info["quantize"] = {**(json.loads(sidecar.read_text()) if sidecar.is_file() else {}), "cached": True}
                else:
                    info["quantize"] = {**quantize_gguf(base, path, variant.qtype, allow_requantize=requantize),
                                        "cached": False}
        info["gguf_file"] = str(path)
        return LlamaCppModel(path, device, info)
