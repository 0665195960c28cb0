"""HQQ (Half-Quadratic Quantization): calibration-free affine weight quantization, 1-8 bits,
group-wise, through hqq's own `HQQLinear` (quantize, bit-pack, dequantize + matmul on its PYTORCH
backend).

`optimize` switches HQQ's half-quadratic solver for scale/zero (hqq's default). It is off by
default here because on a 2-core CPU the solver takes 2-5 s per layer (211 layers in
SmolLM2-135M, i.e. ~10-15 minutes per variant) against 0.03-0.2 s per layer without it; with it
off HQQ is plain asymmetric min-max round-to-nearest with float zero points (hqq rounds the zero
point for 4 bits). Turn it on to measure HQQ proper.

Storage: `HQQLinear` keeps the packed codes in the parameter `W_q` and the scale and zero per
group (compute dtype, float32 on CPU) in the plain dict `meta`, which parameters/buffers do not
see: this adapter adds them to the counts. 3-bit codes are packed 10 to an int32 (3.2 bits)."""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import Field

from harness.adapters.base import (
    Adapter,
    Availability,
    CalibrationSet,
    ModelShapes,
    QuantizedModel,
    VariantConfig,
    check_group_size,
)
from harness.adapters.linears import replace_linears
from harness.errors import HarnessError
from harness.weights.footprint import tensor_bytes


class HQQVariant(VariantConfig):
    bits: Literal[8, 4, 3, 2, 1]
    group_size: int = Field(64, gt=0)
    axis: Literal[0, 1] = 1
    optimize: bool = False  # HQQ's half-quadratic solver (slow on CPU: see the module docstring)
    compute_dtype: Literal["float32", "float16", "bfloat16"] = "float32"  # the whole model runs in it

    def label(self) -> str:
        dtype = "" if self.compute_dtype == "float32" else f"-{self.compute_dtype.replace('float', 'fp').replace('bfp', 'bf')}"
        return f"int{self.bits}-g{self.group_size}-ax{self.axis}{'-opt' if self.optimize else ''}{dtype}"


def _meta_tensors(module: torch.nn.Module) -> list[torch.Tensor]:
    """Tensors an HQQLinear keeps in its meta dict (scale, zero, and any quantized meta-data)."""
    out: list[torch.Tensor] = []
    stack = [getattr(module, "meta", None)]
    while stack:
        item = stack.pop()
        if isinstance(item, torch.Tensor):
            out.append(item)
        elif isinstance(item, dict):
            stack.extend(item.values())
    return out


def _bias(module: torch.nn.Module) -> list[torch.Tensor]:
    b = getattr(module, "bias", None)
    return [b] if isinstance(b, torch.Tensor) else []


class HQQQuantizedModel(QuantizedModel):
    def extra_tensors(self, module: torch.nn.Module) -> list[torch.Tensor]:
        return _meta_tensors(module)

    def weight_bytes(self) -> int:
        # HQQLinear's bias is a plain attribute, not a parameter: add it to the footprint
        return super().weight_bytes() + tensor_bytes([b for m in self.module.modules() for b in _bias(m)])


class HQQAdapter(Adapter):
    name: ClassVar[str] = "hqq"
    description: ClassVar[str] = "HQQ half-quadratic weight-only 1/2/3/4/8-bit (HQQLinear), calibration-free"
    extra: ClassVar[str | None] = "hqq"
    Variant: ClassVar[type[VariantConfig]] = HQQVariant
    packages: ClassVar[tuple[str, ...]] = ("hqq",)

    def availability(self, device: str = "cpu") -> Availability:
        return Availability.of_import("hqq.core.quantize", "hqq", self.extra)

    def check(self, variant: VariantConfig, shapes: ModelShapes, device: str) -> None:
        assert isinstance(variant, HQQVariant)
        gs = variant.group_size
        if gs % 8:  # hqq's BaseQuantizeConfig asserts this
            raise HarnessError(f"hqq: group_size {gs} is not a multiple of 8 (hqq requires it)")
        check_group_size("hqq", gs, shapes)

    @torch.no_grad()
    def quantize(
        self,
        model: torch.nn.Module,
        variant: VariantConfig,
        calibration: CalibrationSet | None,
        device: torch.device,
    ) -> QuantizedModel:
        from hqq.core.quantize import BaseQuantizeConfig, HQQBackend, HQQLinear

        assert isinstance(variant, HQQVariant)
        device = torch.device(device)
        HQQLinear.set_backend(HQQBackend.PYTORCH)  # the portable backend (CPU and GPU)
        config = BaseQuantizeConfig(nbits=variant.bits, group_size=variant.group_size, axis=variant.axis)
        config["weight_quant_params"]["optimize"] = variant.optimize
        compute_dtype = getattr(torch, variant.compute_dtype)
        model = model.to(dtype=compute_dtype)  # HQQLinear computes in compute_dtype: so must its neighbours
        names = replace_linears(model, lambda _name, linear: HQQLinear(linear, quant_config=config, compute_dtype=compute_dtype,
                                                                        device=str(device), del_orig=True))
        model = model.to(device)
        info = {"kernel": f"hqq HQQLinear ({HQQLinear.backend.value})", "quantized_layers": len(names),
                "optimize": variant.optimize, "compute_dtype": str(compute_dtype).removeprefix("torch.")}
        return HQQQuantizedModel(model, device, info=info)
