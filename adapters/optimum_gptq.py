"""GPTQ through optimum's `GPTQQuantizer` (optimum 2.x): what optimum itself still provides for
quantizing LLMs. It is a front end: the algorithm and the kernels are GPTQModel's (without
gptqmodel installed it fails with "name 'QuantizeConfig' is not defined"), so this adapter
measures optimum's own data preparation, block walk and checkpoint (`GPTQQuantizer.save`, GPTQ v1
format) loaded back through transformers' GPTQ integration - the path a transformers user takes.

What moved out of optimum 2.x (named here so nobody looks for it): ONNX Runtime quantization
(`optimum.onnxruntime`) and ONNX export are in `optimum-onnx`; quanto is `optimum-quanto`
(backend `quanto`); BetterTransformer is gone."""

from __future__ import annotations

import os
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
from harness.adapters.gptqmodel_backend import keep_logs_in


class OptimumGPTQVariant(VariantConfig):
    bits: Literal[2, 3, 4, 8] = 4
    group_size: int = Field(64, gt=0)
    desc_act: bool = False
    sym: bool = True
    damp_percent: float = Field(0.1, gt=0, lt=1)  # optimum's default

    def label(self) -> str:
        return (f"int{self.bits}-g{self.group_size}-{'sym' if self.sym else 'asym'}"
                f"{'-act' if self.desc_act else ''}{'' if self.damp_percent == 0.1 else f'-damp{self.damp_percent:g}'}")


class OptimumGPTQAdapter(CalibratedAdapter):
    name: ClassVar[str] = "optimum-gptq"
    description: ClassVar[str] = "GPTQ through optimum's GPTQQuantizer (a front end to gptqmodel), loaded by transformers"
    extra: ClassVar[str | None] = "optimum-gptq"
    Variant: ClassVar[type[VariantConfig]] = OptimumGPTQVariant
    packages: ClassVar[tuple[str, ...]] = ("optimum", "gptqmodel", "transformers")

    def availability(self, device: str = "cpu") -> Availability:
        found = installed("optimum.gptq", "optimum", self.extra)
        if not found.ok:
            return found
        gptq = installed("gptqmodel", "gptqmodel", self.extra)
        if not gptq.ok:
            return Availability(False, f"optimum's GPTQQuantizer runs on gptqmodel: {gptq.reason}")
        return found

    def build(self, source: Any, model: torch.nn.Module, variant: VariantConfig,
              calibration: CalibrationSet, device: torch.device, folder: Path) -> None:
        assert isinstance(variant, OptimumGPTQVariant)
        from optimum.gptq import GPTQQuantizer

        keep_logs_in(folder)  # optimum runs gptqmodel underneath

        rows = [{"input_ids": row.unsqueeze(0), "attention_mask": torch.ones_like(row).unsqueeze(0)}
                for row in calibration.input_ids]  # optimum collates (1, seq) tensors
        quantizer = GPTQQuantizer(bits=variant.bits, dataset=rows,
                                  group_size=variant.group_size, desc_act=variant.desc_act, sym=variant.sym,
                                  damp_percent=variant.damp_percent, model_seqlen=calibration.seq_len)
        os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(min(os.cpu_count() or 1, 4)))  # as in gptqmodel_backend
        model = quantizer.quantize_model(model.to(device), tokenizer=None)
        # optimum writes its config with the dataset in it: token tensors are not JSON (and not config)
        quantizer.dataset = None
        if isinstance(getattr(model.config, "quantization_config", None), dict):
            model.config.quantization_config["dataset"] = None
        quantizer.save(model, str(folder))
        save_tokenizer(source, folder)

    def load(self, folder: Path, variant: VariantConfig, device: torch.device) -> QuantizedModel:
        from transformers import AutoModelForCausalLM

        module = AutoModelForCausalLM.from_pretrained(folder, device_map=str(device)).eval()
        kernels = sorted({type(m).__name__ for m in module.modules() if hasattr(m, "qweight")})
        return QuantizedModel(module, device, info={"kernel": ", ".join(kernels) or "none (not quantized?)",
                                                    "quantized_layers": sum(hasattr(m, "qweight") for m in module.modules())})
