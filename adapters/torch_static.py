"""PyTorch eager-mode static INT8, exactly as PyTorch's static-quantization tutorial does it.

    model.eval()
    torch.ao.quantization.fuse_modules(model, [["conv1", "bn1", "relu1"], ...], inplace=True)
    model.qconfig = torch.ao.quantization.get_default_qconfig("x86")   # or "fbgemm"
    torch.ao.quantization.prepare(model, inplace=True)                   # observers
    for images in calibration batches: model(images)                     # calibration pass
    torch.ao.quantization.convert(model, inplace=True)                   # int8 modules

Fusion folds each BatchNorm into its conv and runs conv+relu as one quantized kernel
(`QuantizedConvReLU2d`); the QuantStub / DeQuantStub that the model carries become
`Quantize` / `DeQuantize`. Weights are int8 per output channel, activations uint8 per tensor
with scales from the calibration pass (HistogramObserver; fbgemm's reduces the range to 7 bits
for CPUs without VNNI, x86's decides by the CPU). The calibration images are the model's own
calibration split (harness.models.vision: never trained on, never scored), not the suite's text
`calibration:` block. CPU only (fbgemm / x86 / onednn kernels).

The model must be written for eager quantization (QuantStub / DeQuantStub, fusable groups):
vision models declare their groups (`harness.models.vision.FUSE_GROUPS`)."""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from typing import ClassVar, Literal

import torch
from pydantic import Field

from harness.adapters.base import Adapter, Availability, CalibrationSet, ModelShapes, QuantizedModel, VariantConfig
from harness.adapters.vision_model import VisionModel
from harness.errors import HarnessError
from harness.models.vision import FUSE_GROUPS, calibration_images

ENGINES = ("x86", "fbgemm")
_CPU_ONLY = "eager quantized kernels (fbgemm / x86) run on the CPU only"


class StaticVariant(VariantConfig):
    engine: Literal["x86", "fbgemm"] = "x86"  # get_default_qconfig(engine) and torch.backends.quantized.engine
    calibration_images: int | None = Field(None, gt=0)  # first n of the calibration split; None: all of it
    calibration_batch: int = Field(32, gt=0)

    def label(self) -> str:
        n = f"-cal{self.calibration_images}" if self.calibration_images else ""
        return f"static-{self.engine}{n}"


@contextmanager
def quiet_eager_quantization():
    """torch.ao.quantization (eager and its observers) warns that it is deprecated, on every call."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.ao\.quantization is deprecated.*")
        warnings.filterwarnings("ignore", message=r".*quantized tensor creation functions.*deprecated.*")
        warnings.filterwarnings("ignore", message=r".*reduce_range will be deprecated.*")
        warnings.filterwarnings("ignore", message=r".*must run observer before calling calculate_qparams.*")
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.ao\..*")
        yield


def use_engine(engine: str) -> None:
    if engine not in torch.backends.quantized.supported_engines:
        raise HarnessError(f"this torch build has no quantized engine '{engine}' "
                           f"(it has: {', '.join(torch.backends.quantized.supported_engines)})")
    torch.backends.quantized.engine = engine


def fuse_groups(model: torch.nn.Module) -> list[list[str]]:
    source = getattr(model, "qharness_source", None)
    if getattr(source, "task", None) != "vision":
        raise HarnessError("eager static INT8 needs a model written for it (QuantStub, fusable conv+bn+relu): "
                           "the vision models (e.g. builtin:digits-cnn)")

    return [list(g) for g in FUSE_GROUPS]


@torch.no_grad()
def calibrate(model: torch.nn.Module, images: torch.Tensor, batch: int) -> None:
    for i in range(0, images.shape[0], batch):
        model(images[i:i + batch])


def check_calibration_size(backend: str, n: int | None, shapes: ModelShapes) -> None:
    """At plan time: no more calibration images than the model's calibration split holds."""
    sizes = getattr(shapes.source, "meta", {}).get("split_sizes") or {}
    if n is not None and sizes.get("calibration") and n > sizes["calibration"]:
        raise HarnessError(f"{backend}: calibration_images {n} > the {sizes['calibration']} images of the "
                           f"calibration split of '{shapes.source.name}'")


def count_quantized(model: torch.nn.Module) -> dict[str, int]:
    """{class name: count} of the quantized modules a converted model holds."""
    out: dict[str, int] = {}
    for m in model.modules():
        if type(m).__module__.startswith(("torch.ao.nn.quantized", "torch.ao.nn.intrinsic.quantized")):
            out[type(m).__name__] = out.get(type(m).__name__, 0) + 1
    return out


class TorchStaticAdapter(Adapter):
    name: ClassVar[str] = "torch-static"
    description: ClassVar[str] = "PyTorch eager static INT8 (fuse conv+bn+relu, get_default_qconfig, prepare, calibrate, convert)"
    Variant: ClassVar[type[VariantConfig]] = StaticVariant
    tasks: ClassVar[tuple[str, ...]] = ("vision",)

    def availability(self, device: str = "cpu") -> Availability:
        if torch.device(device).type != "cpu":
            return Availability(False, _CPU_ONLY)
        if not any(e in torch.backends.quantized.supported_engines for e in ENGINES):
            return Availability(False, "this torch build has no x86 / fbgemm quantized engine")
        return Availability(True)

    def check(self, variant: VariantConfig, shapes: ModelShapes, device: str) -> None:
        check_calibration_size(self.name, variant.calibration_images, shapes)

    def quantize(self, model: torch.nn.Module, variant: VariantConfig, calibration: CalibrationSet | None,
                 device: torch.device) -> QuantizedModel:
        assert isinstance(variant, StaticVariant)
        if torch.device(device).type != "cpu":
            raise HarnessError(f"torch-static: {_CPU_ONLY}; use device: cpu")
        groups = fuse_groups(model)
        images = calibration_images(model, variant.calibration_images)
        use_engine(variant.engine)
        with quiet_eager_quantization():
            import torch.ao.quantization as tq

            model = model.float().eval()
            tq.fuse_modules(model, groups, inplace=True)
            model.qconfig = tq.get_default_qconfig(variant.engine)
            tq.prepare(model, inplace=True)
            calibrate(model, images, variant.calibration_batch)
            tq.convert(model, inplace=True)
        return VisionModel(model, torch.device("cpu"), info={
            "kernel": f"torch.ao eager quantized modules ({variant.engine})", "engine": variant.engine,
            "scheme": "static INT8 (PTQ)", "runtime": "torch eager",
            "qconfig": f"get_default_qconfig('{variant.engine}')", "fused": groups,
            "calibration": {"split": "calibration", "images": int(images.shape[0])},
            "quantized_modules": count_quantized(model)})
