"""KV-cache quantization as a variant orthogonal to weight quantization: any weight backend
(`base` + `base_params`) with its keys/values cached in fewer bits.

- transformers models: transformers' own `QuantizedCache` (KIVI-style: keys and values
  quantized per channel in groups of `q_group_size`; the newest `residual_length` tokens stay in
  float until they are flushed into the quantized store), backend `quanto` (2/4 bits) or `hqq`
  (1/2/3/4/8 bits); both run on CPU here. It travels as `generate_kwargs`
  (cache_implementation="quantized"), so every measurement that decodes uses it.
- llama.cpp models (base `llamacpp`): llama.cpp's cache types `type_k`/`type_v` (f16, q8_0,
  q4_0); a quantized V cache needs flash attention, which is switched on with it.

Teacher-forced quality sees a KV cache only if logits are computed through it: `logits` here
feeds each window in chunks of `chunk` tokens through the cache, so every chunk attends to the
cache of the chunks before it (a chunked prefill). `kv: none` is the same protocol with the
float `DynamicCache`: the 16/32-bit-KV control. llama.cpp always computes logits through its KV
cache. Cache bytes at a given context are measured by the `kv-cache` measurement
(harness/metrics/kvcache.py)."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, model_validator

from harness.adapters import get_adapter
from harness.adapters.base import Adapter, Availability, CalibrationSet, ModelShapes, QuantizedModel, VariantConfig
from harness.errors import HarnessError

_BITS = {"quanto": (2, 4), "hqq": (1, 2, 3, 4, 8)}
_KV_IMPORT = {"quanto": ("optimum.quanto", "optimum-quanto", "quanto"), "hqq": ("hqq.core.quantize", "hqq", "hqq")}
LlamaType = Literal["f16", "q8_0", "q4_0"]


class KVCacheVariant(VariantConfig):
    base: str = "fp"  # the weight backend
    base_params: dict[str, Any] = Field(default_factory=lambda: {"dtype": "float32"})
    kv: Literal["none", "quanto", "hqq", "llamacpp"]
    nbits: int | None = None  # quanto / hqq
    q_group_size: int = Field(64, gt=0)
    residual_length: int = Field(128, ge=0)
    type_k: LlamaType = "f16"  # llamacpp
    type_v: LlamaType = "f16"
    chunk: int = Field(32, gt=0)  # tokens per forward when logits go through the cache (transformers)

    @model_validator(mode="after")
    def _fits(self) -> KVCacheVariant:
        if self.kv in _BITS and self.nbits not in _BITS[self.kv]:
            raise ValueError(f"kv {self.kv} takes nbits in {_BITS[self.kv]}")
        if self.kv not in _BITS and self.nbits is not None:
            raise ValueError(f"nbits applies to kv quanto/hqq, not {self.kv}")
        if (self.kv == "llamacpp") != (self.base == "llamacpp"):
            raise ValueError("kv llamacpp goes with base llamacpp (and base llamacpp with kv llamacpp)")
        return self

    def label(self) -> str:
        kv = {"none": "kv-float", "llamacpp": f"kv-k{self.type_k}-v{self.type_v}"}.get(
            self.kv, f"kv-{self.kv}{self.nbits}-g{self.q_group_size}-r{self.residual_length}")
        return f"{self.base}-{_base_label(self)}+{kv}"


def _base_adapter(variant: KVCacheVariant):
    return get_adapter(variant.base)


def _base_variant(variant: KVCacheVariant):
    adapter = _base_adapter(variant)
    try:
        return adapter, adapter.parse_variant(variant.base_params)
    except Exception as exc:  # noqa: BLE001 - pydantic's message, one line
        raise HarnessError(f"kv-cache: base {variant.base} params {variant.base_params}: "
                           f"{str(exc).splitlines()[-1].strip()}") from None


def _base_label(variant: KVCacheVariant) -> str:
    try:
        return _base_variant(variant)[1].label()
    except HarnessError:
        return "?"


class KVQuantizedModel(QuantizedModel):
    """The base backend's model; logits go through the KV cache in chunks (see module doc).
    Bytes are the base model's (the cache is not weights)."""

    def __init__(self, inner: QuantizedModel, chunk: int, cache_config: dict[str, Any] | None):
        super().__init__(inner.module, inner.device, info=inner.info, generate_kwargs=inner.generate_kwargs)
        self.inner, self.chunk, self.cache_config = inner, chunk, cache_config

    def new_cache(self):
        from transformers.cache_utils import DynamicCache, QuantizedCache

        config = self.module.config
        if self.cache_config is None:
            return DynamicCache(config=config)
        return QuantizedCache(config=config, **self.cache_config)

    @torch.inference_mode()
    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        ids = input_ids.to(self.device)
        cache, out = self.new_cache(), []
        for lo in range(0, ids.shape[1], self.chunk):
            step = self.module(input_ids=ids[:, lo:lo + self.chunk], past_key_values=cache, use_cache=True)
            out.append(step.logits.float())
        return torch.cat(out, dim=1)

    def extra_tensors(self, module: torch.nn.Module) -> list[torch.Tensor]:
        return self.inner.extra_tensors(module)

    def weight_bytes(self) -> int:
        return self.inner.weight_bytes()

    def linear_stats(self) -> tuple[int, int]:
        return self.inner.linear_stats()


class KVCacheAdapter(Adapter):
    name: ClassVar[str] = "kv-cache"
    description: ClassVar[str] = ("KV-cache quantization on top of any weight backend: transformers QuantizedCache "
                                  "(quanto/hqq int2-int8) or llama.cpp cache types (q8_0/q4_0)")
    Variant: ClassVar[type[VariantConfig]] = KVCacheVariant
    packages: ClassVar[tuple[str, ...]] = ("transformers", "optimum-quanto", "hqq", "llama-cpp-python")

    def variant_availability(self, variant: VariantConfig, device: str) -> Availability:
        assert isinstance(variant, KVCacheVariant)
        adapter, parsed = _base_variant(variant)
        for availability in (adapter.availability(device), adapter.variant_availability(parsed, device)):
            if not availability.ok:
                return availability
        if variant.kv in _KV_IMPORT:
            module, package, extra = _KV_IMPORT[variant.kv]
            return Availability.of_import(module, package, extra)
        return Availability(True)

    def check(self, variant: VariantConfig, shapes: ModelShapes, device: str) -> None:
        assert isinstance(variant, KVCacheVariant)
        adapter, parsed = _base_variant(variant)
        if adapter.variant_needs_calibration(parsed):
            raise HarnessError(f"kv-cache: base {variant.base} needs calibration, which this wrapper does not pass on; "
                               "pick a calibration-free base")
        adapter.check(parsed, shapes, device)

    def quantize(self, model: torch.nn.Module, variant: VariantConfig, calibration: CalibrationSet | None,
                 device: torch.device) -> QuantizedModel:
        assert isinstance(variant, KVCacheVariant)
        adapter, parsed = _base_variant(variant)
        qmodel = adapter.quantize(model, parsed, None, device)
        if variant.kv == "llamacpp":
            import llama_cpp

            kw: dict[str, Any] = {"type_k": getattr(llama_cpp, f"GGML_TYPE_{variant.type_k.upper()}"),
                                  "type_v": getattr(llama_cpp, f"GGML_TYPE_{variant.type_v.upper()}")}
            if variant.type_v != "f16":
                kw["flash_attn"] = True  # llama.cpp quantizes the V cache only with flash attention
            qmodel.context_kwargs = kw  # type: ignore[attr-defined] - LlamaCppModel passes them to Llama()
            qmodel.info["kv_cache"] = {"kind": "llama.cpp", "type_k": variant.type_k, "type_v": variant.type_v,
                                       "flash_attn": bool(kw.get("flash_attn"))}
            return qmodel
        if not hasattr(qmodel.module, "config"):
            raise HarnessError(f"kv-cache: base {variant.base} gives no transformers model to attach a KV cache to")
        cache_config = None
        if variant.kv != "none":
            cache_config = {"backend": variant.kv, "nbits": variant.nbits, "q_group_size": variant.q_group_size,
                            "residual_length": variant.residual_length}
            qmodel.generate_kwargs.update({"cache_implementation": "quantized", "cache_config": dict(cache_config)})
        qmodel.info["kv_cache"] = {"kind": "transformers " + ("DynamicCache" if cache_config is None else "QuantizedCache"),
                                   **(cache_config or {}), "logits_chunk": variant.chunk}
        return KVQuantizedModel(qmodel, variant.chunk, cache_config)
