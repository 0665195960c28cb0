"""The float reference: the model cast to one floating dtype, no quantization.

Every quantized result is read against this row, so it does nothing clever: cast, move, measure.
float16 is allowed on CPU too (torch supports it there, only slowly)."""

from __future__ import annotations

from typing import ClassVar, Literal

import torch

from harness.adapters.base import Adapter, CalibrationSet, QuantizedModel, VariantConfig
from harness.adapters.vision_model import as_vision_model

_LABELS = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


class FloatVariant(VariantConfig):
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"

    def label(self) -> str:
        return _LABELS[self.dtype]


class FloatAdapter(Adapter):
    name: ClassVar[str] = "fp"
    description: ClassVar[str] = "unquantized float baseline (fp32 / bf16 / fp16)"
    Variant: ClassVar[type[VariantConfig]] = FloatVariant
    tasks: ClassVar[tuple[str, ...]] = ("causal-lm", "encoder", "vision")

    def quantize(
        self,
        model: torch.nn.Module,
        variant: VariantConfig,
        calibration: CalibrationSet | None,
        device: torch.device,
    ) -> QuantizedModel:
        assert isinstance(variant, FloatVariant)
        dtype = getattr(torch, variant.dtype)
        model = model.to(device=device, dtype=dtype)

        return as_vision_model(QuantizedModel(model, torch.device(device), info={"kernel": "torch F.linear", "dtype": variant.dtype}))
