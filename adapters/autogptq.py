"""GPTQ through the legacy auto-gptq (0.7.1, archived; GPTQModel is its maintained successor and
the main GPTQ path here: `gptqmodel`). Kept for users who still have it, with its limits stated:

- it imports only under transformers 4.x (it needs `no_init_weights` from transformers 4; with
  transformers 5 the import fails), so it cannot share an environment with the other calibrated
  backends (gptqmodel and llm-compressor need transformers >= 5.14). Worked here with
  transformers 4.57.6, huggingface_hub 0.36.2, peft 0.17.1, datasets 4.8.5.
- quantizing needs CUDA (auto-gptq raises "Load pretrained model to do quantization requires
  CUDA available"), and PyPI serves a CUDA-built wheel.
- its CPU inference error "shape '[-1, 128, 576]' is invalid" is the group size, not the
  library (benchmarks/autogptq_cpu_shapes.py, output in benchmarks/results/calibrated/): without
  act-order its layer (`qlinear_cuda_old`, torch fallback on CPU) reshapes the weight to
  (-1, group_size, out_features), so g128 on SmolLM2's 576-wide inputs fails; g64 and g32 run on
  CPU, and g128 runs through the act-order layer (`qlinear_cuda`, g_idx-based). `check` refuses
  group sizes that do not divide a layer, as for every backend here.
- transformers 4.57 reads a config saved by 5.x with rope_theta 10000 instead of 100000, silently,
  and cannot load the 5.x tokenizer: give it a model folder written by transformers 4."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field

from harness.adapters.base import (
    Availability,
    CalibrationSet,
    ModelShapes,
    QuantizedModel,
    VariantConfig,
    check_group_size,
)
from harness.adapters.calibrated import CalibratedAdapter, save_tokenizer
from harness.errors import HarnessError


class AutoGPTQVariant(VariantConfig):
    bits: Literal[2, 3, 4, 8] = 4
    group_size: int = Field(64, gt=0)
    desc_act: bool = False
    sym: bool = True
    damp_percent: float = Field(0.01, gt=0, lt=1)

    def label(self) -> str:
        return (f"int{self.bits}-g{self.group_size}-{'sym' if self.sym else 'asym'}"
                f"{'-act' if self.desc_act else ''}{'' if self.damp_percent == 0.01 else f'-damp{self.damp_percent:g}'}")


def _transformers_major() -> int:
    from importlib import metadata

    try:
        return int(metadata.version("transformers").split(".")[0])
    except (metadata.PackageNotFoundError, ValueError):
        return 0


class AutoGPTQAdapter(CalibratedAdapter):
    name: ClassVar[str] = "auto-gptq"
    description: ClassVar[str] = "GPTQ through the legacy auto-gptq 0.7 (transformers 4.x + CUDA only; see gptqmodel)"
    extra: ClassVar[str | None] = None  # not installable next to transformers 5: its own environment
    Variant: ClassVar[type[VariantConfig]] = AutoGPTQVariant
    packages: ClassVar[tuple[str, ...]] = ("auto-gptq", "transformers")

    def availability(self, device: str = "cpu") -> Availability:
        major = _transformers_major()
        if major >= 5:
            from importlib import metadata

            return Availability(False, f"auto-gptq needs transformers 4.x (this environment has transformers "
                                       f"{metadata.version('transformers')}; it fails to import under 5.x): run it "
                                       "from a separate environment, or use backend 'gptqmodel'")
        return Availability.of_import("auto_gptq", "auto-gptq")

    def variant_availability(self, variant: VariantConfig, device: str) -> Availability:
        if device != "cuda":
            return Availability(False, "auto-gptq quantizes only on CUDA (its loader refuses to quantize without it)")
        return Availability(True)

    def check(self, variant: VariantConfig, shapes: ModelShapes, device: str) -> None:
        assert isinstance(variant, AutoGPTQVariant)
        try:
            check_group_size(self.name, variant.group_size, shapes)
        except HarnessError as exc:
            raise HarnessError(f"{exc}; auto-gptq's CPU layer fails on it with \"shape '[-1, "
                               f"{variant.group_size}, N]' is invalid\"") from None

    def build(self, source: Any, model: torch.nn.Module, variant: VariantConfig,
              calibration: CalibrationSet, device: torch.device, folder: Path) -> None:
        assert isinstance(variant, AutoGPTQVariant)
        from auto_gptq import AutoGPTQForCausalLM, BaseQuantizeConfig

        config = BaseQuantizeConfig(bits=variant.bits, group_size=variant.group_size, desc_act=variant.desc_act,
                                    sym=variant.sym, damp_percent=variant.damp_percent)
        wrapped = AutoGPTQForCausalLM.from_pretrained(source.path, config, torch_dtype=torch.float16)
        examples = [{"input_ids": row.unsqueeze(0), "attention_mask": torch.ones_like(row).unsqueeze(0)}
                    for row in calibration.input_ids]
        wrapped.quantize(examples)
        wrapped.save_quantized(str(folder), use_safetensors=True)
        save_tokenizer(source, folder)

    def load(self, folder: Path, variant: VariantConfig, device: torch.device) -> QuantizedModel:
        from auto_gptq import AutoGPTQForCausalLM

        wrapped = AutoGPTQForCausalLM.from_quantized(str(folder), device=str(device), use_safetensors=True)
        module = wrapped.model.eval()
        kernels = sorted({f"{type(m).__module__}.{type(m).__name__}" for m in module.modules() if hasattr(m, "qweight")})
        return QuantizedModel(module, device, info={"kernel": ", ".join(kernels)})
