"""GPTQ, AWQ and SmoothQuant through llm-compressor (vLLM's quantizer): `oneshot` with its own
modifiers, saved as a compressed-tensors checkpoint (`save_compressed=True`) and loaded back by
transformers' compressed-tensors integration.

Recipes:
- `gptq`: GPTQModifier with scheme W4A16 / W4A16_ASYM / W8A16 (group-wise) or W8A8 (int8 weights
  per channel, int8 activations per token, dynamic);
- `awq`: AWQModifier (activation-aware scales, `duo_scaling`) then QuantizationModifier, W4A16
  (symmetric) or W4A16_ASYM (with zero points: AWQ's usual form);
- `smoothquant`: SmoothQuantModifier(smoothing_strength = alpha) then GPTQ W8A8.

What is measured: the checkpoint as transformers loads it. On CPU the 4-bit layers hold the packed
codes (`weight_packed` int32, scales, zero points) until the first forward, when compressed-tensors
decompresses them to float (some schemes, e.g. AWQ W4A16_ASYM, are decompressed while loading):
quality is the real one, speed is not an int4 kernel's. Bytes are therefore counted from the saved
compressed-tensors checkpoint (safetensors headers: packed codes, scales, zero points per layer),
not from the runtime module. Scales are stored in the model's dtype (float32 here: 0.5 bit per
weight at g64).

Patched, narrowly: llm-compressor 0.14's AWQ pins its cached intermediates (`pin_memory()`), which
raises "Cannot access accelerator device when none is available" on a machine without CUDA. While
`oneshot` runs without CUDA, `IntermediatesCache.pin_memory` is made a no-op (pinning only speeds
host-to-GPU copies, of which there are none); it is restored afterwards."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
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
from harness.adapters.calibrated import CalibratedAdapter, installed, save_tokenizer
from harness.weights.footprint import is_linear_like

WEIGHT_ONLY = ("W4A16", "W4A16_ASYM", "W8A16")


class LLMCompressorVariant(VariantConfig):
    recipe: Literal["gptq", "awq", "smoothquant"] = "gptq"
    scheme: Literal["W4A16", "W4A16_ASYM", "W8A16", "W8A8"] = "W4A16"
    group_size: int | None = Field(64, gt=0)  # weight-only schemes; W8A8 is per channel (None)
    dampening_frac: float = Field(0.01, gt=0, lt=1)  # GPTQ Hessian dampening
    actorder: Literal["static", "group", "weight"] | None = None  # GPTQ activation ordering
    smoothing_strength: float = Field(0.8, gt=0, lt=1)  # SmoothQuant alpha
    duo_scaling: bool = True  # AWQ: scales from activations and weights (True) or activations only

    @model_validator(mode="after")
    def _consistent(self):
        if self.scheme == "W8A8" and self.group_size is not None:
            raise ValueError("W8A8 quantizes weights per channel: set group_size: null")
        if self.scheme in WEIGHT_ONLY and self.group_size is None:
            raise ValueError(f"{self.scheme} is group-wise here: give group_size (e.g. 64)")
        if self.recipe == "awq" and self.scheme not in ("W4A16", "W4A16_ASYM"):
            raise ValueError("recipe awq takes scheme W4A16 or W4A16_ASYM")
        if self.recipe == "smoothquant" and self.scheme != "W8A8":
            raise ValueError("recipe smoothquant smooths activations for W8A8: set scheme: W8A8")
        return self

    def label(self) -> str:
        label = f"{self.recipe}-{self.scheme.lower().replace('_', '-')}"
        if self.group_size:
            label += f"-g{self.group_size}"
        if self.recipe == "smoothquant":
            label += f"-a{self.smoothing_strength:g}"
        if self.recipe != "awq" and self.dampening_frac != 0.01:
            label += f"-damp{self.dampening_frac:g}"
        if self.actorder and self.recipe != "awq":
            label += f"-act{self.actorder}"
        if self.recipe == "awq" and not self.duo_scaling:
            label += "-noduo"
        return label


def _scheme(variant: LLMCompressorVariant):
    from compressed_tensors.quantization import preset_name_to_scheme

    scheme = preset_name_to_scheme(variant.scheme, ["Linear"])
    if variant.group_size:
        scheme.weights.group_size = variant.group_size
        scheme.weights.strategy = "group"
    return scheme


def _recipe(variant: LLMCompressorVariant) -> list:
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier

    groups = {"group_0": _scheme(variant)}
    gptq = dict(config_groups=groups, ignore=["lm_head"], dampening_frac=variant.dampening_frac)
    if variant.actorder:
        gptq["actorder"] = variant.actorder
    if variant.recipe == "awq":
        from llmcompressor.modifiers.transform.awq import AWQModifier

        return [AWQModifier(duo_scaling=variant.duo_scaling),
                QuantizationModifier(config_groups=groups, ignore=["lm_head"])]
    if variant.recipe == "smoothquant":
        from llmcompressor.modifiers.transform.smoothquant import SmoothQuantModifier

        return [SmoothQuantModifier(smoothing_strength=variant.smoothing_strength), GPTQModifier(**gptq)]
    return [GPTQModifier(**gptq)]


@contextlib.contextmanager
def _no_pinning_without_cuda():
    """See the module docstring: AWQ's pin_memory() fails without CUDA; pinning is moot there."""
    from llmcompressor.pipelines.cache import IntermediatesCache

    if torch.cuda.is_available():
        yield
        return
    original = IntermediatesCache.pin_memory
    IntermediatesCache.pin_memory = lambda self, *args, **kwargs: None
    try:
        yield
    finally:
        IntermediatesCache.pin_memory = original


class LLMCompressorAdapter(CalibratedAdapter):
    name: ClassVar[str] = "llmcompressor"
    description: ClassVar[str] = "llm-compressor GPTQ / AWQ W4A16, SmoothQuant+GPTQ W8A8 (compressed-tensors), calibrated"
    extra: ClassVar[str | None] = "llmcompressor"
    Variant: ClassVar[type[VariantConfig]] = LLMCompressorVariant
    packages: ClassVar[tuple[str, ...]] = ("llmcompressor", "compressed-tensors", "transformers")

    def availability(self, device: str = "cpu") -> Availability:
        return installed("llmcompressor", "llmcompressor", self.extra)

    def build(self, source: Any, model: torch.nn.Module, variant: VariantConfig,
              calibration: CalibrationSet, device: torch.device, folder: Path) -> dict[str, Any]:
        assert isinstance(variant, LLMCompressorVariant)
        from datasets import Dataset
        from llmcompressor import oneshot

        ids = calibration.input_ids
        data = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
        model = model.to(device)
        with _no_pinning_without_cuda():
            oneshot(model=model, dataset=data, recipe=_recipe(variant), num_calibration_samples=ids.shape[0],
                    max_seq_length=ids.shape[1], shuffle_calibration_samples=False)
        model.save_pretrained(folder, save_compressed=True)
        save_tokenizer(source, folder)
        return {"pin_memory_patched": not torch.cuda.is_available() and variant.recipe == "awq"}

    def load(self, folder: Path, variant: VariantConfig, device: torch.device) -> QuantizedModel:
        from transformers import AutoModelForCausalLM

        module = AutoModelForCausalLM.from_pretrained(folder, dtype="auto").to(device).eval()
        packed = [m for m in module.modules() if hasattr(m, "weight_packed") or hasattr(m, "weight_scale")]
        import json

        fmt = json.loads((folder / "config.json").read_text()).get("quantization_config", {}).get("format")
        info = {"kernel": "compressed-tensors (decompressed to float on first forward; accuracy, not int kernels)",
                "quantized_layers": len(packed), "format": str(fmt)}
        return CheckpointCountedModel(module, device, info=info, stored=checkpoint_tensor_bytes(folder))


def checkpoint_tensor_bytes(folder: Path) -> dict[str, int]:
    """name -> stored bytes of every tensor in the folder's safetensors files, from their headers."""
    import json
    import struct

    out: dict[str, int] = {}
    for path in sorted(folder.glob("*.safetensors")):
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
        for name, meta in header.items():
            if name != "__metadata__":
                start, end = meta["data_offsets"]
                out[name] = end - start
    return out


@dataclass
class CheckpointCountedModel(QuantizedModel):
    """Bytes as stored in the compressed checkpoint: the runtime module may hold decompressed
    float weights, which is not what a user ships or what an int4 kernel would read."""

    stored: dict[str, int] = field(default_factory=dict)

    def weight_bytes(self) -> int:
        return sum(self.stored.values())

    def linear_stats(self) -> tuple[int, int]:
        n_weights = n_bytes = 0
        for name, mod in self.module.named_modules():
            if not is_linear_like(mod) or name.split(".")[-1] == "lm_head":
                continue
            n_weights += mod.in_features * mod.out_features
            n_bytes += sum(b for k, b in self.stored.items()
                           if k.startswith(name + ".") and k.count(".") == name.count(".") + 1 and not k.endswith(".bias"))
        return n_weights, n_bytes
