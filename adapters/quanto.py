"""optimum-quanto: weight (int8 / int4 / int2 / float8) and optional activation (int8 / float8)
quantization through quanto's own `quantize` + `freeze`, running on quanto's QLinear kernels.

Weights: int8 and float8 are per output channel (one scale per row); int4 / int2 are group-wise
with a group size quanto picks itself per layer (128, else 96, 64 or 32 when that divides
in_features; per channel when none does) and a scale + shift per group. `info["group_sizes"]`
records what it picked. Frozen weights are tensor subclasses (WeightQBytesTensor,
WeightQBitsTensor over a PackedTensor); the generic storage walk opens them through
`__tensor_flatten__` and counts the packed data, scales and shifts.

Activations: quantized activations need static scales, calibrated with `optimum.quanto.Calibration`
over the calibration windows (evaluation never sees them). Weight-only variants ignore the
calibration set."""

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
)
from harness.errors import HarnessError

class QuantoQuantizedModel(QuantizedModel):
    """quanto's packed int4/int2 weights fail under torch.inference_mode ("Cannot set version_counter
    for inference tensor", optimum-quanto 0.2.7 with torch 2.13): run the forward under no_grad."""

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = self.module(input_ids=input_ids.to(self.device), use_cache=False)
        return out.logits.float()


_QTYPES = {"int8": "qint8", "int4": "qint4", "int2": "qint2", "float8": "qfloat8"}


class QuantoVariant(VariantConfig):
    weights: Literal["int8", "int4", "int2", "float8"] = "int8"
    activations: Literal["none", "int8", "float8"] = "none"
    calibration_batches: int = Field(4, gt=0)  # windows run under Calibration (activation variants)

    def label(self) -> str:
        label = f"w{self.weights}"
        if self.activations != "none":
            label += f"-a{self.activations}-cal{self.calibration_batches}"
        return label


class QuantoAdapter(Adapter):
    name: ClassVar[str] = "quanto"
    description: ClassVar[str] = "optimum-quanto weight int8/int4/int2/float8 (+ calibrated int8/float8 activations)"
    extra: ClassVar[str | None] = "quanto"
    Variant: ClassVar[type[VariantConfig]] = QuantoVariant
    packages: ClassVar[tuple[str, ...]] = ("optimum-quanto",)
    # only activation variants use it; weight-only variants ignore the set they are given
    needs_calibration: ClassVar[bool] = True

    def availability(self, device: str = "cpu") -> Availability:
        return Availability.of_import("optimum.quanto", "optimum-quanto", self.extra)

    def variant_needs_calibration(self, variant: VariantConfig) -> bool:
        assert isinstance(variant, QuantoVariant)
        return variant.activations != "none"  # weight-only variants need no text (they run on shape: models)

    def check(self, variant: VariantConfig, shapes: ModelShapes, device: str) -> None:
        assert isinstance(variant, QuantoVariant)
        # quanto chooses int4/int2 group sizes itself (falling back to per channel), so shapes cannot
        # make a variant fail; packed int4/int2 codes need an even number of weights per row
        if variant.weights in ("int4", "int2"):
            per_byte = 8 // int(variant.weights[-1])
            for s in shapes.targets():
                if (s.in_features * s.out_features) % per_byte:
                    raise HarnessError(
                        f"quanto: {variant.weights} packs {per_byte} weights per byte; "
                        f"{s.name} has {s.in_features}x{s.out_features}"
                    )

    @torch.no_grad()
    def quantize(
        self,
        model: torch.nn.Module,
        variant: VariantConfig,
        calibration: CalibrationSet | None,
        device: torch.device,
    ) -> QuantizedModel:
        from optimum import quanto
        from optimum.quanto.nn import QModuleMixin

        assert isinstance(variant, QuantoVariant)
        device = torch.device(device)
        model = model.to(device)
        weights = getattr(quanto, _QTYPES[variant.weights])
        activations = None if variant.activations == "none" else getattr(quanto, _QTYPES[variant.activations])
        if activations is not None and calibration is None:
            raise HarnessError("quanto: activation quantization needs calibration data (none was given)")
        quanto.quantize(model, weights=weights, activations=activations, exclude=["lm_head", "*.lm_head"])
        calibrated = 0
        if activations is not None:
            assert calibration is not None
            batches = calibration.input_ids[: variant.calibration_batches]
            with quanto.Calibration(momentum=0.9):
                for row in batches:
                    model(input_ids=row[None].to(device), use_cache=False)
                    calibrated += 1
        quanto.freeze(model)
        qmods = [m for m in model.modules() if isinstance(m, QModuleMixin)]
        group_sizes = sorted({m.weight_group_size or 0 for m in qmods})  # 0: per channel
        info = {
            "kernel": "optimum.quanto QLinear",
            "quantized_layers": len(qmods),
            "weights": variant.weights,
            "activations": variant.activations,
            "group_sizes": group_sizes,
            "weight_types": sorted({type(m.weight).__name__ for m in qmods}),
        }
        if activations is not None:
            info["calibration"] = {**calibration.describe(), "batches_used": calibrated}
        return QuantoQuantizedModel(model, device, info=info)
