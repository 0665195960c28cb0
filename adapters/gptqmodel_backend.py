"""GPTQ and AWQ through GPTQModel (the maintained successor of auto-gptq): its own quantizer
(`GPTQModel.load(path, QuantizeConfig).quantize(...)`), its own checkpoint format and its own
kernels on load (CPU: `TorchAtenLinear` int4 for GPTQ 4-bit, the generic torch kernel otherwise,
`AwqTorchLinear` for AWQ).

Notes from this machine (2 cores): the CPU extension JIT-compiles ~30 s on the first quantize;
`GPTQMODEL_CPU_WORKERS` must not exceed the cores (we set it to the core count when unset);
AWQ on CPU needs `BACKEND.AWQ_TORCH` at load (the automatic choice says "CUDA is not available")
and calibrates slowly (~500 s for 8 x 512 tokens on SmolLM2-135M). Group sizes are checked
against every target layer before any work: SmolLM2's 576-wide layers refuse g128."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, model_validator

from harness.adapters.base import (
    Availability,
    CalibrationSet,
    QuantizedModel,
    VariantConfig,
)
from harness.adapters.calibrated import CalibratedAdapter, calibration_rows, installed
from harness.errors import HarnessError


class GPTQModelVariant(VariantConfig):
    method: Literal["gptq", "awq"] = "gptq"
    bits: Literal[2, 3, 4, 8] = 4
    group_size: int = Field(64, gt=0)
    desc_act: bool = False  # act-order: quantize columns by decreasing activation magnitude
    sym: bool = True  # False: asymmetric with zero points (AWQ's "zero_point")
    damp_percent: float = Field(0.05, gt=0, lt=1)  # Hessian dampening (GPTQ)
    kernel: Literal["auto", "torch"] = "auto"  # load-time kernel; "torch" = the portable one

    @model_validator(mode="after")
    def _awq_limits(self):
        if self.method == "awq" and (self.bits != 4 or self.desc_act):
            raise ValueError("gptqmodel AWQ is 4-bit without act-order (bits: 4, desc_act: false)")
        return self

    def label(self) -> str:
        label = f"{self.method}-int{self.bits}-g{self.group_size}-{'sym' if self.sym else 'asym'}"
        if self.desc_act:
            label += "-act"
        if self.damp_percent != 0.05:
            label += f"-damp{self.damp_percent:g}"
        if self.kernel != "auto":
            label += f"-{self.kernel}"
        return label


def _cpu_workers() -> None:
    """GPTQModel's CPU worker pool crashed on 2 cores with its default size: at most the cores."""
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(min(os.cpu_count() or 1, 4)))


def keep_logs_in(folder: Path) -> None:
    """GPTQModel 7.x writes per-layer quantization logs to a relative `logs/` folder, i.e. into
    whatever directory the user ran `harness` from; point it at the artifact being built instead."""
    try:
        from gptqmodel.looper import loop_processor
    except ImportError:
        return
    if hasattr(loop_processor, "_PROJECT_LOG_DIR"):
        loop_processor._PROJECT_LOG_DIR = folder / "gptqmodel-logs"


def _backend(variant: GPTQModelVariant, device: torch.device):
    from gptqmodel import BACKEND

    if variant.method == "awq":
        # on CPU only the torch AWQ kernel runs; the automatic choice asks for CUDA
        return BACKEND.AWQ_TORCH if device.type == "cpu" or variant.kernel == "torch" else BACKEND.AUTO
    return BACKEND.TORCH if variant.kernel == "torch" else BACKEND.AUTO


class GPTQModelAdapter(CalibratedAdapter):
    name: ClassVar[str] = "gptqmodel"
    description: ClassVar[str] = "GPTQ (2/3/4/8-bit, act-order) and AWQ (4-bit) through GPTQModel, calibrated; CPU and CUDA"
    extra: ClassVar[str | None] = "gptqmodel"
    Variant: ClassVar[type[VariantConfig]] = GPTQModelVariant
    packages: ClassVar[tuple[str, ...]] = ("gptqmodel", "transformers")

    def availability(self, device: str = "cpu") -> Availability:
        return installed("gptqmodel", "gptqmodel", self.extra)

    def build(self, source: Any, model: torch.nn.Module, variant: VariantConfig,
              calibration: CalibrationSet, device: torch.device, folder: Path) -> dict[str, Any]:
        assert isinstance(variant, GPTQModelVariant)
        _cpu_workers()
        from gptqmodel import GPTQModel
        from gptqmodel.quantization.config import AWQConfig, QuantizeConfig

        common = dict(bits=variant.bits, group_size=variant.group_size, sym=variant.sym)
        if variant.method == "awq":
            config = AWQConfig(**common)
        else:
            config = QuantizeConfig(**common, desc_act=variant.desc_act, damp_percent=variant.damp_percent)
        keep_logs_in(folder)
        dtype = torch.float32 if device.type == "cpu" else torch.float16
        # GPTQModel loads the float weights itself (from the same folder the harness loaded)
        wrapped = GPTQModel.load(source.path, config, device=str(device), dtype=dtype)
        wrapped.quantize(calibration_rows(calibration), batch_size=1)
        wrapped.save(str(folder))
        return {"quantize_dtype": str(dtype).removeprefix("torch.")}

    def load(self, folder: Path, variant: VariantConfig, device: torch.device) -> QuantizedModel:
        assert isinstance(variant, GPTQModelVariant)
        _cpu_workers()
        from gptqmodel import GPTQModel

        try:
            wrapped = GPTQModel.load(str(folder), device=str(device), backend=_backend(variant, device))
        except (ValueError, NotImplementedError, RuntimeError) as exc:
            raise HarnessError(f"gptqmodel: no kernel loads {variant.label()} on {device.type}: "
                               f"{str(exc).splitlines()[0]} (try kernel: torch)") from None
        module = wrapped.model.eval()
        kernels = sorted({type(m).__name__ for m in module.modules() if hasattr(m, "qweight")})
        info = {"kernel": ", ".join(kernels) or "unknown", "quantized_layers":
                sum(hasattr(m, "qweight") for m in module.modules())}
        return QuantizedModel(module, device, info=info)
