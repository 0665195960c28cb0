"""AWQ through autoawq 0.2.9 (archived upstream; its method lives on in llm-compressor's and
GPTQModel's AWQ, which are the main AWQ paths here). Runs where it can: CUDA.

Why not on CPU: its calibration took ~270 s per decoder layer on this 2-core machine (SmolLM2 has
30: over two hours), and its quantized layers on CPU need intel_extension_for_pytorch, whose 2.8.0
refuses torch 2.13 - so a CPU artifact could not even be evaluated. Group sizes must divide every
layer (it asserts on SmolLM2's 576 with g128). On CUDA its GEMM layers use the autoawq-kernels
extension when installed, else its Triton GEMM."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field

from harness.adapters.base import (
    Availability,
    CalibrationSet,
    QuantizedModel,
    VariantConfig,
)
from harness.adapters.calibrated import CalibratedAdapter, installed, save_tokenizer

CPU_REASON = ("autoawq does not run on CPU here: calibration ~270 s per layer on 2 cores, and its CPU "
              "layers need intel_extension_for_pytorch (2.8.0 refuses torch 2.13); use CUDA, or "
              "llmcompressor/gptqmodel AWQ on CPU")


class AutoAWQVariant(VariantConfig):
    bits: Literal[4] = 4
    group_size: int = Field(64, gt=0)
    zero_point: bool = True
    version: Literal["GEMM", "GEMV"] = "GEMM"

    def label(self) -> str:
        return f"int{self.bits}-g{self.group_size}-{'zp' if self.zero_point else 'sym'}-{self.version.lower()}"


class AutoAWQAdapter(CalibratedAdapter):
    name: ClassVar[str] = "autoawq"
    description: ClassVar[str] = "AWQ 4-bit through the archived autoawq 0.2.9 (CUDA only)"
    extra: ClassVar[str | None] = "autoawq"
    Variant: ClassVar[type[VariantConfig]] = AutoAWQVariant
    packages: ClassVar[tuple[str, ...]] = ("autoawq", "transformers")

    def availability(self, device: str = "cpu") -> Availability:
        return installed("awq", "autoawq", self.extra)

    def variant_availability(self, variant: VariantConfig, device: str) -> Availability:
        return Availability(True) if device == "cuda" else Availability(False, CPU_REASON)

    def build(self, source: Any, model: torch.nn.Module, variant: VariantConfig,
              calibration: CalibrationSet, device: torch.device, folder: Path) -> None:
        assert isinstance(variant, AutoAWQVariant)
        from awq import AutoAWQForCausalLM
        from transformers import AutoTokenizer

        wrapped = AutoAWQForCausalLM.from_pretrained(source.path, device_map=str(device))
        config = {"w_bit": variant.bits, "q_group_size": variant.group_size, "zero_point": variant.zero_point,
                  "version": variant.version}
        ids = calibration.input_ids
        # token lists are taken as they are (concatenated, then cut into max_calib_seq_len blocks)
        wrapped.quantize(AutoTokenizer.from_pretrained(source.path), quant_config=config,
                         calib_data=[row.tolist() for row in ids], max_calib_samples=ids.shape[0],
                         max_calib_seq_len=ids.shape[1])
        wrapped.save_quantized(str(folder))
        save_tokenizer(source, folder)

    def load(self, folder: Path, variant: VariantConfig, device: torch.device) -> QuantizedModel:
        from awq import AutoAWQForCausalLM

        wrapped = AutoAWQForCausalLM.from_quantized(str(folder), fuse_layers=False, device_map=str(device))
        module = wrapped.model.eval()
        kernels = sorted({type(m).__name__ for m in module.modules() if hasattr(m, "qweight")})
        return QuantizedModel(module, device, info={"kernel": ", ".join(kernels)})
