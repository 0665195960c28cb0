"""torchao (`torchao.quantization.quantize_`) with its current config classes.

Each scheme maps to one torchao config; `quantize_` swaps the weights of every decoder nn.Linear
(the output head stays in float) for torchao tensor subclasses, whose own kernels run the matmul.
Bytes are counted by the generic storage walk, which opens those subclasses through
`__tensor_flatten__` (e.g. Int8Tensor -> qdata int8 + scale float32 + zero_point int8).

What this machine showed (torchao 0.18, torch 2.13 CPU):
- int8_weight_only, int8_dynamic_act_int8_weight, intx_weight_only, float8_weight_only run on CPU.
- intx_weight_only keeps its codes unpacked in int8 (IntxUnpackedToInt8Tensor) on CPU: 4-bit
  weights take 8 bits of storage, so there is no size saving over int8.
- int4_weight_only fails on CPU (the default plain packing needs the package mslk and CUDA).
- float8_dynamic_act_float8_weight asserts a CUDA GPU with compute capability >= 8.9."""

from __future__ import annotations

import importlib.util
import logging
import warnings
from contextlib import contextmanager
from importlib import metadata
from typing import ClassVar, Literal

import torch
from pydantic import Field, model_validator

from harness.adapters.base import (
    Adapter,
    Availability,
    CalibrationSet,
    ModelShapes,
    QuantizedModel,
    VariantConfig,
    check_group_size,
)

Scheme = Literal[
    "int8_weight_only",
    "int8_dynamic_act_int8_weight",
    "int4_weight_only",
    "intx_weight_only",
    "float8_weight_only",
    "float8_dynamic_act_float8_weight",
]
_GROUPED = ("int4_weight_only", "intx_weight_only")
_INT4_DEFAULT_GROUP = 128  # Int4WeightOnlyConfig's own default
_SHORT = {
    "int8_weight_only": "int8wo",
    "int8_dynamic_act_int8_weight": "int8dq",
    "int4_weight_only": "int4wo",
    "intx_weight_only": "intx",
    "float8_weight_only": "fp8wo",
    "float8_dynamic_act_float8_weight": "fp8dq",
}


class TorchAOVariant(VariantConfig):
    scheme: Scheme
    group_size: int | None = Field(default=None, gt=0)  # int4 / intx only; intx None: per channel
    bits: int = Field(default=4, ge=1, le=8)  # intx only
    # int4 only. plain: torchao's default (needs the package mslk >= 1); tile_packed_to_4d: tinygemm
    # (torch._weight_int4pack_mm, bf16 activations, CUDA; no mslk), the model is cast to bf16.
    packing: Literal["plain", "tile_packed_to_4d"] = "plain"

    @model_validator(mode="after")
    def _knobs_fit_scheme(self) -> TorchAOVariant:
        if self.group_size is not None and self.scheme not in _GROUPED:
            raise ValueError(f"group_size applies to int4_weight_only and intx_weight_only, not {self.scheme}")
        if self.bits != 4 and self.scheme != "intx_weight_only":
            raise ValueError(f"bits applies to intx_weight_only only, not {self.scheme}")
        if self.packing != "plain" and self.scheme != "int4_weight_only":
            raise ValueError(f"packing applies to int4_weight_only only, not {self.scheme}")
        return self

    def effective_group_size(self) -> int | None:
        if self.scheme == "int4_weight_only":
            return self.group_size or _INT4_DEFAULT_GROUP
        return self.group_size if self.scheme == "intx_weight_only" else None

    def label(self) -> str:
        if self.scheme == "intx_weight_only":
            return f"intx{self.bits}-" + (f"g{self.group_size}" if self.group_size else "pc")
        if self.scheme == "int4_weight_only":
            return f"int4wo-g{self.effective_group_size()}" + ("-tile" if self.packing == "tile_packed_to_4d" else "")
        return _SHORT[self.scheme]


@contextmanager
def quiet_torchao():
    """torchao's import logs a warning per optional CUDA extension it cannot load on CPU, and torch
    logs a pytree deprecation for one of its enums; keep them out of the cell's output."""
    loggers = [logging.getLogger(n) for n in ("torchao", "torch.utils._pytree")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            warnings.filterwarnings("ignore", category=FutureWarning)
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _config(variant: TorchAOVariant):
    with quiet_torchao():
        from torchao.quantization import (
            Float8DynamicActivationFloat8WeightConfig,
            Float8WeightOnlyConfig,
            Int4WeightOnlyConfig,
            Int8DynamicActivationInt8WeightConfig,
            Int8WeightOnlyConfig,
            IntxWeightOnlyConfig,
        )
        from torchao.quantization.granularity import PerAxis, PerGroup

    s = variant.scheme
    if s == "int8_weight_only":
        return Int8WeightOnlyConfig()
    if s == "int8_dynamic_act_int8_weight":
        return Int8DynamicActivationInt8WeightConfig()
    if s == "int4_weight_only":
        return Int4WeightOnlyConfig(group_size=variant.effective_group_size(), int4_packing_format=variant.packing)
    if s == "intx_weight_only":
        granularity = PerGroup(variant.group_size) if variant.group_size else PerAxis(0)
        return IntxWeightOnlyConfig(weight_dtype=getattr(torch, f"int{variant.bits}"), granularity=granularity)
    if s == "float8_weight_only":
        return Float8WeightOnlyConfig()
    return Float8DynamicActivationFloat8WeightConfig()


def _fp8_capable_cuda() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)


def skip_head(module: torch.nn.Module, fqn: str) -> bool:
    return isinstance(module, torch.nn.Linear) and fqn.split(".")[-1] != "lm_head"


def has_mslk() -> bool:
    try:
        return int(metadata.version("mslk").split(".")[0]) >= 1
    except (metadata.PackageNotFoundError, ValueError):
        return False


class TorchAOAdapter(Adapter):
    name: ClassVar[str] = "torchao"
    description: ClassVar[str] = "torchao quantize_ (int8 / int4 / intx / float8 tensor subclasses)"
    extra: ClassVar[str | None] = "torchao"
    Variant: ClassVar[type[VariantConfig]] = TorchAOVariant
    packages: ClassVar[tuple[str, ...]] = ("torchao",)

    def availability(self, device: str = "cpu") -> Availability:
        if importlib.util.find_spec("torchao") is None:
            return Availability.missing("torchao", "torchao")
        return Availability(True)

    def variant_availability(self, variant: VariantConfig, device: str) -> Availability:
        assert isinstance(variant, TorchAOVariant)
        dev = torch.device(device).type
        if variant.scheme == "int4_weight_only" and dev != "cuda":
            return Availability(False,
                "torchao int4_weight_only needs CUDA (and the package mslk on torchao >= 0.15): on CPU "
                "quantize_ fails with 'Requires mslk >= 1.0.0'; use intx_weight_only with bits: 4 on CPU")
        if variant.scheme == "int4_weight_only" and variant.packing == "plain" and not has_mslk():
            return Availability(False,
                "torchao int4_weight_only (packing plain) needs the package mslk >= 1.0.0, which is not installed "
                "(PyPI serves only a 0.0.0 placeholder; seen on an H100 with torchao 0.18: 'Requires mslk >= 1.0.0'); "
                "packing: tile_packed_to_4d (tinygemm, bf16) needs no mslk")
        if variant.scheme == "float8_dynamic_act_float8_weight" and not (dev == "cuda" and _fp8_capable_cuda()):
            return Availability(False,
                "torchao float8_dynamic_act_float8_weight needs a CUDA GPU with compute capability >= 8.9 "
                f"(device here: {device}); float8_weight_only runs elsewhere")
        return Availability(True)

    def check(self, variant: VariantConfig, shapes: ModelShapes, device: str) -> None:
        assert isinstance(variant, TorchAOVariant)
        gs = variant.effective_group_size()
        check_group_size("torchao", gs, shapes)

    @torch.no_grad()
    def quantize(
        self,
        model: torch.nn.Module,
        variant: VariantConfig,
        calibration: CalibrationSet | None,
        device: torch.device,
    ) -> QuantizedModel:
        assert isinstance(variant, TorchAOVariant)
        device = torch.device(device)
        config = _config(variant)
        with quiet_torchao():
            from torchao.quantization import quantize_

            model = model.to(device)
            if variant.packing == "tile_packed_to_4d" and next(model.parameters()).dtype != torch.bfloat16:
                model = model.to(torch.bfloat16)  # tinygemm takes bf16 weights and activations only
            quantize_(model, config, filter_fn=skip_head, device=device)
        kinds = sorted({type(m.weight).__name__ for m in model.modules()
                        if isinstance(m, torch.nn.Linear) and type(m.weight) not in (torch.Tensor, torch.nn.Parameter)})
        n = sum(isinstance(m, torch.nn.Linear) and type(m.weight) not in (torch.Tensor, torch.nn.Parameter)
                for m in model.modules())
        return QuantizedModel(model, device, info={
            "kernel": f"torchao {'+'.join(kinds) or 'none'}",
            "config": type(config).__name__,
            "quantized_layers": n,
            **({"packing": variant.packing} if variant.scheme == "int4_weight_only" else {}),
            **({"compute_dtype": "bfloat16 (tinygemm)"} if variant.packing == "tile_packed_to_4d" else {}),
        })
