"""NVIDIA TensorRT Model Optimizer (`nvidia-modelopt`): TensorRT's quantization recipes — FP8
per-tensor, INT8 SmoothQuant, INT4 AWQ, W4A8 AWQ — through modelopt's own `mtq.quantize` with a
calibration forward loop over the calibration windows, measured in PyTorch.

What is measured: modelopt's simulated ("fake") quantization, the path its own accuracy
evaluations use: every quantized linear rounds its weights (and, for W8A8 / W4A8 recipes, its
inputs) to the recipe's format with the calibrated scales, then computes in float. That is the
quality a TensorRT engine built from the same checkpoint computes up to kernel rounding; engine
*speed* is not measured: TensorRT itself cannot be installed here (docs/ADAPTERS.md, the
`tensorrt` adapter says why), so these cells have quality and size, not TensorRT throughput.

Bytes: the simulated model still holds float weights, so storage is counted as the recipe stores
it: each quantized linear's weight at the recipe's bits (fp8: 8, int8: 8, int4: 4, packed) plus
every quantizer buffer (amax / scale / pre-quant-scale tensors, at their in-memory dtype, float32:
an upper bound on what an fp16-scale export keeps), plus bias. `mtq.compress` (real packed
weights) reproduces this count for FP8 on CPU; for INT4 AWQ its CPU forward disagreed with the
simulated one and W4A8 does not compress on CPU (modelopt 0.47), so it is not used."""

from __future__ import annotations

import copy
import math
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field

from harness.adapters.base import Adapter, Availability, CalibrationSet, ModelShapes, QuantizedModel, VariantConfig
from harness.errors import HarnessError
from harness.weights.footprint import module_bytes, tensor_bytes

# recipe -> modelopt config name (modelopt.torch.quantization.<NAME>)
RECIPES: dict[str, str] = {
    "fp8": "FP8_DEFAULT_CFG",  # W8A8, FP8 E4M3 per tensor (Hopper / Ada)
    "int8-sq": "INT8_SMOOTHQUANT_CFG",  # W8A8 int8, weights per channel, SmoothQuant-smoothed activations
    "int4-awq": "INT4_AWQ_CFG",  # W4A16 int4 blocks with AWQ-lite scales
    "w4a8-awq": "W4A8_AWQ_BETA_CFG",  # int4 weight blocks + FP8 activations (beta in modelopt)
}
BLOCK_RECIPES = ("int4-awq", "w4a8-awq")


class ModelOptVariant(VariantConfig):
    recipe: Literal["fp8", "int8-sq", "int4-awq", "w4a8-awq"] = "int4-awq"
    block_size: int | None = Field(None, gt=0)  # int4 recipes: weight block (modelopt's default 128)
    calibration_batches: int = Field(16, gt=0)  # windows the calibration forward loop runs

    def label(self) -> str:
        return self.recipe + (f"-b{self.block_size}" if self.block_size else "") + f"-cal{self.calibration_batches}"


def quantizer_bits(quantizer: Any) -> float | None:
    """Bits one weight is stored in: an int, or (exponent, mantissa) for a float format (+1 sign);
    a SequentialQuantizer stores the codes of its first stage."""
    first = quantizer[0] if hasattr(quantizer, "__getitem__") and not hasattr(quantizer, "num_bits") else quantizer
    bits = getattr(first, "num_bits", None)
    if isinstance(bits, (tuple, list)):
        return 1.0 + sum(bits)
    return float(bits) if isinstance(bits, (int, float)) else None


def _quantized_linears(model: torch.nn.Module):
    for name, mod in model.named_modules():
        wq = getattr(mod, "weight_quantizer", None)
        if wq is not None and isinstance(getattr(mod, "weight", None), torch.Tensor) and getattr(wq, "is_enabled", True):
            yield name, mod, wq


class ModelOptQuantizedModel(QuantizedModel):
    """Storage counted as the recipe stores it (module docstring), not the simulation's float."""

    def _linear_payload(self) -> tuple[int, int, set[int]]:
        n_weights = n_bytes = 0
        counted: set[int] = set()
        for _, mod, wq in _quantized_linears(self.module):
            bits = quantizer_bits(wq)
            if bits is None:
                raise HarnessError(f"modelopt: cannot tell the storage bits of {type(wq).__name__}")
            w = mod.weight
            n_weights += w.numel()
            n_bytes += math.ceil(w.numel() * bits / 8)
            quant_buffers = [b for n, b in mod.named_buffers() if "quantizer" in n]
            n_bytes += tensor_bytes(quant_buffers)
            counted |= {id(t) for t in [w, *quant_buffers]}
        return n_weights, n_bytes, counted

    def linear_stats(self) -> tuple[int, int]:
        n_weights, n_bytes, _ = self._linear_payload()
        return n_weights, n_bytes

    def weight_bytes(self) -> int:
        _, payload, counted = self._linear_payload()
        rest = [t for t in list(self.module.parameters()) + list(self.module.buffers()) if id(t) not in counted]
        holder = torch.nn.Module()
        for i, t in enumerate(rest):
            holder.register_buffer(f"t{i}", t, persistent=False)
        return payload + module_bytes(holder)


class ModelOptAdapter(Adapter):
    name: ClassVar[str] = "modelopt"
    description: ClassVar[str] = ("NVIDIA ModelOpt (TensorRT's quantizer): FP8, INT8 SmoothQuant, INT4 AWQ, W4A8 AWQ; "
                                  "quality in simulation, no TensorRT engine")
    extra: ClassVar[str | None] = "modelopt"
    Variant: ClassVar[type[VariantConfig]] = ModelOptVariant
    packages: ClassVar[tuple[str, ...]] = ("nvidia-modelopt",)
    needs_calibration: ClassVar[bool] = True

    def availability(self, device: str = "cpu") -> Availability:
        return Availability.of_import("modelopt.torch.quantization", "nvidia-modelopt", self.extra)

    def check(self, variant: VariantConfig, shapes: ModelShapes, device: str) -> None:
        assert isinstance(variant, ModelOptVariant)
        if variant.recipe in BLOCK_RECIPES:
            block = variant.block_size or 128
            bad = [s for s in shapes.targets() if s.in_features % block]
            if bad:
                raise HarnessError(f"modelopt: {variant.recipe} blocks of {block} do not divide in_features "
                                   f"{bad[0].in_features} of {bad[0].name} (set block_size, e.g. 64)")
        elif variant.block_size is not None:
            raise HarnessError(f"modelopt: block_size is for {' / '.join(BLOCK_RECIPES)}, not {variant.recipe}")

    def config(self, variant: ModelOptVariant) -> dict:
        import modelopt.torch.quantization as mtq

        cfg = copy.deepcopy(getattr(mtq, RECIPES[variant.recipe]))
        if variant.block_size is not None:  # quant_cfg: a list of {"quantizer_name", "cfg" (dict or stages)}
            entries = [e for e in cfg["quant_cfg"] if e.get("quantizer_name") == "*weight_quantizer"]
            stages = [st for e in entries for st in (e["cfg"] if isinstance(e.get("cfg"), list) else [e.get("cfg") or {}])]
            blocked = [st for st in stages if isinstance(st.get("block_sizes"), dict) and -1 in st["block_sizes"]]
            if not blocked:
                raise HarnessError(f"modelopt: {RECIPES[variant.recipe]} has no weight block size to set (modelopt changed?)")
            for st in blocked:
                st["block_sizes"][-1] = variant.block_size
        return cfg

    def quantize(self, model: torch.nn.Module, variant: VariantConfig, calibration: CalibrationSet | None,
                 device: torch.device) -> QuantizedModel:
        import modelopt.torch.quantization as mtq

        assert isinstance(variant, ModelOptVariant)
        if calibration is None:
            raise HarnessError("modelopt: its recipes calibrate scales on data (none was given)")
        device = torch.device(device)
        # the model's own dtype (the suite's reference is fp32): a cast would mix float error into the recipe's
        model = model.to(device).eval()
        batches = calibration.input_ids[: variant.calibration_batches]

        def forward_loop(m: torch.nn.Module) -> None:
            with torch.no_grad():
                for row in batches:
                    m(input_ids=row[None].to(device), use_cache=False)

        model = mtq.quantize(model, self.config(variant), forward_loop)
        layers = list(_quantized_linears(model))
        info = {"kernel": "modelopt simulated quantization (no TensorRT engine: see the tensorrt adapter)",
                "recipe": variant.recipe, "config": RECIPES[variant.recipe], "quantized_layers": len(layers),
                "weight_bits": sorted({quantizer_bits(wq) for _, _, wq in layers}),
                "calibration": {**calibration.describe(), "batches_used": len(batches)}}
        return ModelOptQuantizedModel(model, device, info=info)
