"""bitsandbytes: LLM.int8() (`Linear8bitLt`) and 4-bit NF4 / FP4 (`Linear4bit`, QLoRA).

Every target nn.Linear (all but the head) is replaced by bitsandbytes' own layer holding the float
weight in an `Int8Params` / `Params4bit`; moving that layer `.to(device)` is what makes
bitsandbytes quantize it with its own code (`int8_vectorwise_quant` / `quantize_4bit`), and the
forward runs bitsandbytes' own matmul (`bnb.matmul` / `bnb.matmul_4bit`).

Storage. LLM.int8 keeps int8 codes (CB) in `weight.data` and one float32 absmax per output row
(SCB) next to it. 4-bit keeps packed codes in `weight.data` and the block statistics in
`weight.quant_state` (absmax per 64 weights; with double quantization the absmax are themselves
8-bit with a nested absmax + code table), which are neither parameters nor buffers: this adapter
adds them to the counts.

CPU note (bitsandbytes 0.50): on a CPU with AVX512-BF16 the first 4-bit forward repacks the
weight for bitsandbytes' CPU kernel, turns the absmax into bfloat16 and *undoes double
quantization* (the nested absmax are dequantized). `quantize` runs one token through the model so
that the counted bytes are those of the layout the kernel really uses; `info["cpu_packed"]` says
whether that happened."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from pydantic import model_validator

from harness.adapters.base import (
    Adapter,
    Availability,
    CalibrationSet,
    ModelShapes,
    QuantizedModel,
    VariantConfig,
)
from harness.adapters.linears import replace_linears
from harness.errors import HarnessError


_DTYPE_LABELS = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
BLOCKSIZE = 64  # bitsandbytes' default 4-bit block size (Params4bit)


class BnbVariant(VariantConfig):
    mode: Literal["int8", "nf4", "fp4"]
    threshold: float = 6.0  # LLM.int8 activation outlier threshold (int8 only; 0 disables)
    double_quant: bool = False  # 4-bit only: quantize the absmax themselves (8-bit, nested)
    compute_dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # 4-bit only

    @model_validator(mode="after")
    def _fields_fit_mode(self) -> BnbVariant:
        if self.mode == "int8":
            if self.double_quant:
                raise ValueError("bnb: double_quant applies to 4-bit modes (nf4, fp4), not int8")
            if self.compute_dtype != "float32":
                raise ValueError("bnb: compute_dtype applies to 4-bit modes (nf4, fp4), not int8")
        # compare with the default, not with fields_set: a variant must survive a dump/parse round
        # trip (cells carry their full parameters to the worker process)
        elif self.threshold != type(self).model_fields["threshold"].default:
            raise ValueError("bnb: threshold (the LLM.int8 outlier threshold) applies to mode int8 only")
        if self.threshold < 0:
            raise ValueError("bnb: threshold must be >= 0")
        return self

    def label(self) -> str:
        if self.mode == "int8":
            return f"llm.int8-t{self.threshold:g}"
        return f"{self.mode}{'-dq' if self.double_quant else ''}-{_DTYPE_LABELS[self.compute_dtype]}"


def _extra_tensors(module: torch.nn.Module) -> list[torch.Tensor]:
    """Tensors a bitsandbytes layer stores outside its parameters and buffers."""
    out: list[torch.Tensor] = []
    weight = getattr(module, "weight", None)
    qs = getattr(weight, "quant_state", None)
    if qs is not None:  # 4-bit
        for name in ("absmax", "code", "offset"):
            t = getattr(qs, name, None)
            if isinstance(t, torch.Tensor):
                out.append(t)
        state2 = qs.__dict__.get("state2")  # QuantState.__getattr__ is not plain: read the dict
        if state2 is not None:
            for name in ("absmax", "code"):
                t = getattr(state2, name, None)
                if isinstance(t, torch.Tensor):
                    out.append(t)
    state = getattr(module, "state", None)
    for holder in (weight, state):  # int8: SCB on the weight before the first forward, then on state
        for name in ("CB", "SCB"):
            t = getattr(holder, name, None) if holder is not None else None
            if isinstance(t, torch.Tensor):
                out.append(t)
    return out


class BnbQuantizedModel(QuantizedModel):
    def extra_tensors(self, module: torch.nn.Module) -> list[torch.Tensor]:
        return _extra_tensors(module)


class BitsAndBytesAdapter(Adapter):
    name: ClassVar[str] = "bnb"
    description: ClassVar[str] = "bitsandbytes LLM.int8() and 4-bit NF4/FP4 (QLoRA) linear layers"
    extra: ClassVar[str | None] = "bnb"
    Variant: ClassVar[type[VariantConfig]] = BnbVariant
    packages: ClassVar[tuple[str, ...]] = ("bitsandbytes",)

    def availability(self, device: str = "cpu") -> Availability:
        return Availability.of_import("bitsandbytes", "bitsandbytes", self.extra)

    def check(self, variant: VariantConfig, shapes: ModelShapes, device: str) -> None:
        assert isinstance(variant, BnbVariant)
        if variant.mode == "int8" or not str(device).startswith("cpu"):
            return
        # bitsandbytes' CPU 4-bit kernel reshapes absmax to (out, in // 64) and packs 32 rows at a time
        for s in shapes.targets():
            if s.in_features % BLOCKSIZE:
                raise HarnessError(
                    f"bnb: blocksize {BLOCKSIZE} does not divide in_features {s.in_features} of {s.name} "
                    f"(bitsandbytes' CPU 4-bit kernel needs it)"
                )
            if s.out_features % 32:
                raise HarnessError(
                    f"bnb: out_features {s.out_features} of {s.name} is not a multiple of 32 "
                    f"(bitsandbytes' CPU 4-bit kernel needs it)"
                )

    @staticmethod
    def _layer(linear: torch.nn.Linear, variant: BnbVariant) -> torch.nn.Module:
        import bitsandbytes as bnb

        bias = linear.bias is not None
        if variant.mode == "int8":
            layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=bias,
                                        has_fp16_weights=False, threshold=variant.threshold, device="meta")
            layer.weight = bnb.nn.Int8Params(linear.weight.data.detach().cpu(), requires_grad=False,
                                             has_fp16_weights=False)
        else:
            layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=bias,
                                      compute_dtype=getattr(torch, variant.compute_dtype),
                                      compress_statistics=variant.double_quant, quant_type=variant.mode,
                                      device="meta")
            layer.weight = bnb.nn.Params4bit(linear.weight.data.detach().cpu(), requires_grad=False,
                                             blocksize=BLOCKSIZE, compress_statistics=variant.double_quant,
                                             quant_type=variant.mode, module=layer)
        if bias:
            layer.bias = torch.nn.Parameter(linear.bias.data.detach().clone(), requires_grad=False)
        return layer

    @torch.no_grad()
    def quantize(
        self,
        model: torch.nn.Module,
        variant: VariantConfig,
        calibration: CalibrationSet | None,
        device: torch.device,
    ) -> QuantizedModel:
        assert isinstance(variant, BnbVariant)
        device = torch.device(device)
        # .to(device) on a not-yet-quantized bnb layer is where bitsandbytes quantizes it
        names = replace_linears(model, lambda _name, linear: self._layer(linear, variant).to(device))
        model = model.to(device)
        info: dict[str, Any] = {"quantized_layers": len(names), "mode": variant.mode,
                                "kernel": "bnb.matmul (LLM.int8)" if variant.mode == "int8" else "bnb.matmul_4bit"}
        if variant.mode != "int8" and names:
            # one token through the model: bitsandbytes settles its CPU weight layout on the first forward
            model(input_ids=torch.zeros(1, 1, dtype=torch.long, device=device), use_cache=False)
            first = model.get_submodule(names[0])
            info["cpu_packed"] = bool(getattr(first.weight.quant_state, "packing_format_for_cpu", False))
        return BnbQuantizedModel(model, device, info=info)
