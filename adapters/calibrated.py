"""Shared shape of the calibrated quantizers (GPTQ, AWQ, SmoothQuant): quantize once with the
library's own algorithm, save with the library's own serializer into the artifact cache
(harness/models/artifacts.py), and load back with the library's own loader for measurement.

Loading back even right after quantizing is deliberate: the model that is measured is always the
saved artifact, so a cache hit and a miss measure the same thing, and a serializer that loses
something shows up as a quality drop instead of hiding behind the in-memory model."""

from __future__ import annotations

from abc import abstractmethod
from pathlib import Path
from typing import Any, ClassVar

import torch

from harness.adapters.base import (
    Adapter,
    Availability,
    CalibrationSet,
    ModelShapes,
    QuantizedModel,
    VariantConfig,
    check_group_size,
)
from harness.errors import HarnessError
from harness.models.artifacts import artifact_key, cached_build


class CalibratedAdapter(Adapter):
    """Subclasses implement `build` (quantize + save into a folder) and `load` (folder -> model)."""

    needs_calibration: ClassVar[bool] = True

    def check(self, variant: VariantConfig, shapes: ModelShapes, device: str) -> None:
        """Every calibrated method here quantizes in groups along the input dimension: refuse a
        group size that does not divide the layers before anything is calibrated."""
        check_group_size(self.name, variant.group_size, shapes)

    @abstractmethod
    def build(self, source: Any, model: torch.nn.Module, variant: VariantConfig,
              calibration: CalibrationSet, device: torch.device, folder: Path) -> dict[str, Any] | None:
        """Quantize with the library and save the result into `folder`; may return metadata."""

    @abstractmethod
    def load(self, folder: Path, variant: VariantConfig, device: torch.device) -> QuantizedModel:
        """The saved artifact, loaded by the library, ready to measure on `device`."""

    def quantize(self, model: torch.nn.Module, variant: VariantConfig, calibration: CalibrationSet | None,
                 device: torch.device) -> QuantizedModel:
        if calibration is None:
            raise HarnessError(f"{self.name}: needs a calibration set (the suite's `calibration:`)")
        device = torch.device(device)
        source = getattr(model, "qharness_source", None)
        if source is None:
            raise HarnessError(f"{self.name}: the model has no source folder (load it with harness.models.zoo.load_model)")
        key = artifact_key(source, self.name, variant.model_dump(mode="json"), calibration,
                           self.versions(), device.type)

        def build(folder: Path):
            return self.build(source, model, variant, calibration, device, folder)

        folder, info = cached_build(key, build)  # the float model is not measured: the artifact is
        qmodel = self.load(folder, variant, device)
        qmodel.info = {**qmodel.info, **info, "calibration": calibration.describe()}
        return qmodel


def installed(module: str, package: str, extra: str | None = None) -> Availability:
    """Availability without importing: gptqmodel and llm-compressor take 10+ s to import and set
    process-wide environment variables (CUDA_DEVICE_ORDER, PYTORCH_ALLOC_CONF) on import, which
    must not happen in the driver that plans every cell. A broken install fails in its own cell."""
    import importlib.util

    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        found = False
    return Availability(True) if found else Availability.missing(package, extra)


def calibration_rows(calibration: CalibrationSet) -> list[dict[str, list[int]]]:
    """The harness's token windows as the list of {input_ids, attention_mask} most libraries take."""
    return [{"input_ids": row.tolist(), "attention_mask": [1] * row.numel()} for row in calibration.input_ids]


def save_tokenizer(source: Any, folder: Path) -> None:
    """Loaders look for a tokenizer next to the weights: copy the source's."""
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(source.path).save_pretrained(folder)
