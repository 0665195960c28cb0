"""Mixed precision: a per-layer bit allocation applied through a backend's own per-module
quantizer, so the allocation lands on the frontier next to that backend's uniform-bit points.

An allocation maps glob patterns over module names (fnmatch, e.g. "*.down_proj",
"model.layers.0.*") to that backend's variant parameters, or to "float" to leave a layer
unquantized; the first pattern that matches a layer wins, "default" covers the rest:

    {base: rtn, allocation: {"*.down_proj": {bits: 8}, default: {bits: 4, group_size: 64}}}

`ranking` instead (or on top) promotes the most sensitive layers named by a layer-sensitivity
ranking JSON (the sensitivity probe's sensitivity.json, see `read_ranking`): its first `top`
layers get `high`, the rest fall through to `allocation`.

Per-module mechanisms (a table, one function per base): rtn builds one `RTNLinear` per layer with
that layer's `RTNVariant`; hqq one `HQQLinear` per layer with that layer's `BaseQuantizeConfig`
(compute_dtype must agree across the allocation); llamacpp quantizes with the default's qtype as
llama.cpp's file type and every other layer as a tensor-type override (llama-quantize's
--tensor-type, `llama_model_quantize_params.tt_overrides`), per-layer qtypes being single ggml
types (F16, Q8_0, Q6_K, Q4_0, Q2_K). Left for later: GPTQModel's `dynamic` per-module configs
(its adapter was not committed when this was written)."""

from __future__ import annotations

import fnmatch
import hashlib
import json
import re
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, model_validator

from harness.adapters import get_adapter
from harness.adapters.base import Adapter, Availability, CalibrationSet, ModelShapes, QuantizedModel, VariantConfig
from harness.adapters.hqq_backend import HQQQuantizedModel
from harness.adapters.linears import linear_names, replace_module
from harness.adapters.rtn import RTNLinear
from harness.errors import HarnessError

FLOAT = "float"
Params = dict[str, Any] | Literal["float"]


class MixedVariant(VariantConfig):
    base: Literal["rtn", "hqq", "llamacpp"]
    allocation: dict[str, Params] = Field(default_factory=dict)  # glob -> base params | "float"; "default" last
    ranking: str | None = None  # path of a sensitivity ranking JSON (most sensitive first)
    ranking_scheme: str | None = None  # which scheme's ranking, when the file ranks several
    top: int = Field(0, ge=0)  # how many of the ranking's layers get `high`
    high: Params | None = None

    @model_validator(mode="after")
    def _complete(self) -> MixedVariant:
        if "default" not in self.allocation:
            raise ValueError("allocation needs a 'default' entry (the params of every layer no pattern matches)")
        if (self.ranking is None) != (self.high is None) or (self.ranking is not None and self.top == 0):
            raise ValueError("ranking, top (> 0) and high go together")
        return self

    def label(self) -> str:
        digest = hashlib.sha1(json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()[:6]
        return f"{self.base}-mixed-{digest}"


def read_ranking(path: str, scheme: str | None = None) -> list[str]:
    """Module names, most sensitive first, from a ranking JSON: a list of names or of objects with
    a "layer"/"module"/"name" key, bare or under "ranking"; or the sensitivity probe's
    sensitivity.json, {"ranking": {scheme: [{"layer": ..., "kld_mean": ...}, ...]}}, of which
    `scheme` picks one (needed when it ranked several)."""
    p = Path(path).expanduser()
    try:
        data = json.loads(p.read_text())
    except (OSError, ValueError) as exc:
        raise HarnessError(f"mixed: cannot read ranking '{path}': {type(exc).__name__}: {exc}") from None
    if isinstance(data, dict):
        data = data.get("ranking", data.get("layers"))
    if isinstance(data, dict):  # per scheme
        if scheme is None and len(data) == 1:
            scheme = next(iter(data))
        if scheme not in data:
            raise HarnessError(f"mixed: ranking '{path}' ranks schemes {sorted(data)}; "
                               f"set ranking_scheme to one of them (got {scheme!r})")
        data = data[scheme]
    if not isinstance(data, list):
        raise HarnessError(f"mixed: ranking '{path}' is not a list of module names (nor has one under 'ranking')")
    names = [d if isinstance(d, str) else (d.get("layer") or d.get("module") or d.get("name"))
             for d in data if isinstance(d, (str, dict))]
    if not names or not all(isinstance(n, str) for n in names):
        raise HarnessError(f"mixed: ranking '{path}' names no modules")
    return names


def resolve(variant: MixedVariant, names: list[str]) -> dict[str, Params]:
    """Each target layer's params: a ranked layer's `high`, else its first matching pattern."""
    promoted = set(read_ranking(variant.ranking, variant.ranking_scheme)[:variant.top]) if variant.ranking else set()
    patterns = [(p, v) for p, v in variant.allocation.items() if p != "default"]
    unused = [p for p, _ in patterns if not any(fnmatch.fnmatchcase(n, p) for n in names)]
    if unused:
        raise HarnessError(f"mixed: pattern '{unused[0]}' matches no quantizable layer "
                           f"(layers look like '{names[len(names) // 2]}')")
    out: dict[str, Params] = {}
    for n in names:
        if n in promoted:
            out[n] = variant.high  # type: ignore[assignment]
            continue
        out[n] = next((v for p, v in patterns if fnmatch.fnmatchcase(n, p)), variant.allocation["default"])
    return out


def _apply_rtn(model, plan, default, device) -> QuantizedModel:
    for name, v in plan.items():
        if v is not None:
            replace_module(model, name, RTNLinear.from_linear(model.get_submodule(name), v, device))
    return QuantizedModel(model.to(device), device, info={"kernel": "torch dequantize+F.linear (rtn per module)"})


def _apply_hqq(model, plan, default, device) -> QuantizedModel:
    from hqq.core.quantize import BaseQuantizeConfig, HQQBackend, HQQLinear

    dtypes = {v.compute_dtype for v in plan.values() if v is not None}
    if len(dtypes) > 1:
        raise HarnessError(f"mixed: hqq layers must share one compute_dtype (got {sorted(dtypes)})")
    compute_dtype = getattr(torch, dtypes.pop() if dtypes else "float32")
    HQQLinear.set_backend(HQQBackend.PYTORCH)
    model = model.to(dtype=compute_dtype)
    for name, v in plan.items():
        if v is None:
            continue
        config = BaseQuantizeConfig(nbits=v.bits, group_size=v.group_size, axis=v.axis)
        config["weight_quant_params"]["optimize"] = v.optimize
        replace_module(model, name, HQQLinear(model.get_submodule(name), quant_config=config, compute_dtype=compute_dtype,
                                        device=str(device), del_orig=True))
    return HQQQuantizedModel(model.to(device), device, info={"kernel": "hqq HQQLinear (per-module configs)"})


# llama.cpp: HF layer name -> GGUF tensor name (Llama-style blocks); per-layer qtype -> ggml type
_GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down"}
_TENSOR_TYPES = ("F16", "Q8_0", "Q6_K", "Q4_0", "Q2_K")  # qtypes that are one ggml type (Q4_K_M etc. are mixes)


def gguf_tensor_name(name: str) -> str:
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name)
    if not m or m.group(2) not in _GGUF_NAMES:
        raise HarnessError(f"mixed: no GGUF tensor name known for layer '{name}' (Llama-style layers only)")
    return f"blk.{m.group(1)}.{_GGUF_NAMES[m.group(2)]}.weight"


def _apply_llamacpp(model, plan, default, device) -> QuantizedModel:
    """The default qtype as llama.cpp's ftype, every other layer as a tensor-type override
    (`tt_overrides`, exact tensor names), quantized from the adapter's cached F16 conversion."""
    import llama_cpp

    # lazy: `import harness.adapters.mixed` stays free of numpy
    from harness.adapters.llamacpp import (LlamaCppAdapter, LlamaCppModel, LlamaCppVariant, llama_cpp_version,
                                           model_dir, quantize_gguf)

    if default is None or default.qtype in ("original", "F16") or default.source != "f16":
        raise HarnessError("mixed: llamacpp needs a default qtype other than F16/original, from source f16")
    types = {}
    for name, v in plan.items():
        qtype = "F16" if v is None else v.qtype
        if qtype == default.qtype:
            continue
        if qtype not in _TENSOR_TYPES:
            raise HarnessError(f"mixed: llamacpp layer '{name}' asks for {qtype}, a mix; per-layer qtypes: {_TENSOR_TYPES}")
        types["^" + re.escape(gguf_tensor_name(name)) + "$"] = getattr(llama_cpp, f"GGML_TYPE_{qtype}")
    f16 = LlamaCppAdapter().quantize(model, LlamaCppVariant(qtype="F16"), None, device)
    digest = hashlib.sha1(json.dumps(sorted(types.items())).encode()).hexdigest()[:8]
    path = model_dir(model.qharness_source) / f"mixed-{default.qtype}-{digest}-llama.cpp-{llama_cpp_version()}.gguf"
    meta = {"cached": True} if path.is_file() else quantize_gguf(f16.path, path, default.qtype, tensor_types=types)
    return LlamaCppModel(path, device, {"kernel": f"llama.cpp ({device.type})", "quantize": meta,
                                        "tensor_type_overrides": len(types), "gguf_file": str(path)})


# base backend -> its per-module quantizer (model, {layer: variant | None}, default variant | None, device)
APPLY: dict[str, Callable[..., QuantizedModel]] = {"rtn": _apply_rtn, "hqq": _apply_hqq, "llamacpp": _apply_llamacpp}


class MixedPrecisionAdapter(Adapter):
    name: ClassVar[str] = "mixed"
    description: ClassVar[str] = ("per-layer bit allocation (globs or a sensitivity ranking) through rtn / hqq "
                                  "per-module configs or llama.cpp tensor-type overrides")
    Variant: ClassVar[type[VariantConfig]] = MixedVariant
    packages: ClassVar[tuple[str, ...]] = ("hqq", "llama-cpp-python")

    def _base(self, variant: MixedVariant):
        return get_adapter(variant.base)

    def _parse(self, variant: MixedVariant, params: Params):
        if params == FLOAT:
            return None
        try:
            return self._base(variant).parse_variant(params)
        except Exception as exc:  # noqa: BLE001 - pydantic's message, one line
            raise HarnessError(f"mixed: {variant.base} params {params}: {str(exc).splitlines()[-1].strip()}") from None

    def variant_availability(self, variant: VariantConfig, device: str) -> Availability:
        assert isinstance(variant, MixedVariant)
        return self._base(variant).availability(device)

    def check(self, variant: VariantConfig, shapes: ModelShapes, device: str) -> None:
        assert isinstance(variant, MixedVariant)
        names = [s.name for s in shapes.targets()]
        plan = resolve(variant, names)
        base = self._base(variant)
        by_shape = {s.name: s for s in shapes.targets()}
        for params in {json.dumps(p, sort_keys=True) for p in plan.values()}:
            parsed = self._parse(variant, json.loads(params))
            if parsed is not None:
                layers = tuple(by_shape[n] for n, p in plan.items() if json.dumps(p, sort_keys=True) == params)
                base.check(parsed, ModelShapes(linears=layers), device)

    @torch.no_grad()
    def quantize(self, model: torch.nn.Module, variant: VariantConfig, calibration: CalibrationSet | None,
                 device: torch.device) -> QuantizedModel:
        assert isinstance(variant, MixedVariant)
        device = torch.device(device)
        plan = resolve(variant, linear_names(model))
        parsed = {n: self._parse(variant, p) for n, p in plan.items()}
        default = self._parse(variant, variant.allocation["default"])
        qmodel = APPLY[variant.base](model, parsed, default, device)
        counts = Counter(v.label() if v is not None else FLOAT for v in parsed.values())
        qmodel.info.update({"quantized_layers": sum(v is not None for v in parsed.values()),
                            "allocation_counts": dict(counts),
                            "allocation": {n: (v.label() if v is not None else FLOAT) for n, v in parsed.items()}})
        return qmodel
