"""PyTorch eager-mode quantization-aware training (QAT), the tutorial's QAT flow beside its PTQ one.

    model.train()
    torch.ao.quantization.fuse_modules_qat(model, [["conv1", "bn1", "relu1"], ...], inplace=True)
    model.qconfig = torch.ao.quantization.get_default_qat_qconfig("x86")
    torch.ao.quantization.prepare_qat(model, inplace=True)     # fake-quantized ConvBnReLU2d, Linear
    ... fine-tune on the train split (a few epochs; BN statistics frozen and observers
        disabled for the last epochs, as the tutorial does) ...
    model.eval(); torch.ao.quantization.convert(model, inplace=True)

Fine-tuning starts from the trained float weights and reads only the model's train split (the
split the float model was trained on): the calibration and test splits stay unseen. Seeded
shuffling; the loss of each epoch and the training time travel in the cell's backend info. The
converted model is the same kind of int8 model as `torch-static` produces (QuantizedConvReLU2d,
per-channel int8 weights, uint8 activations), so the two rows compare PTQ with QAT directly."""

from __future__ import annotations

import time
from typing import ClassVar, Literal

import torch
from pydantic import Field, model_validator

from harness.adapters.base import Adapter, Availability, CalibrationSet, QuantizedModel, VariantConfig
from harness.adapters.torch_static import (
    ENGINES,
    count_quantized,
    fuse_groups,
    quiet_eager_quantization,
    use_engine,
)
from harness.adapters.vision_model import VisionModel
from harness.errors import HarnessError
from harness.models.vision import dataset_of


class QATVariant(VariantConfig):
    engine: Literal["x86", "fbgemm"] = "x86"
    epochs: int = Field(3, ge=1)
    lr: float = Field(3e-4, gt=0)
    batch_size: int = Field(32, gt=0)
    freeze_bn_epoch: int = Field(1, ge=0)  # BN running statistics frozen from this epoch on
    freeze_observer_epoch: int = Field(2, ge=0)  # quantization ranges frozen from this epoch on
    seed: int = 0

    @model_validator(mode="after")
    def _epochs(self) -> QATVariant:
        if self.freeze_observer_epoch == 0:
            raise ValueError("freeze_observer_epoch 0 would freeze ranges no data has set: use 1 or more")
        return self

    def label(self) -> str:
        return f"qat-{self.engine}-e{self.epochs}-lr{self.lr:g}"


def finetune(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, variant: QATVariant) -> dict:
    """Fine-tune a prepare_qat model; the mean loss of every epoch."""
    import torch.ao.nn.intrinsic.qat as nniqat
    import torch.ao.quantization as tq

    torch.manual_seed(variant.seed)
    shuffle = torch.Generator().manual_seed(variant.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=variant.lr, weight_decay=0.0)
    losses = []
    t0 = time.perf_counter()
    model.train()
    for epoch in range(variant.epochs):
        if epoch >= variant.freeze_bn_epoch:
            model.apply(nniqat.freeze_bn_stats)
        if epoch >= variant.freeze_observer_epoch:
            model.apply(tq.disable_observer)
        order, total = torch.randperm(images.shape[0], generator=shuffle), 0.0
        for i in range(0, images.shape[0], variant.batch_size):
            idx = order[i:i + variant.batch_size]
            loss = torch.nn.functional.cross_entropy(model(images[idx]), labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * idx.numel()
        losses.append(round(total / images.shape[0], 5))
    return {"epoch_losses": losses, "train_s": round(time.perf_counter() - t0, 2), "images": int(images.shape[0]),
            "split": "train", "optimizer": f"AdamW(lr={variant.lr:g})"}


class TorchQATAdapter(Adapter):
    name: ClassVar[str] = "torch-qat"
    description: ClassVar[str] = "PyTorch eager QAT (fuse_modules_qat, get_default_qat_qconfig, prepare_qat, fine-tune, convert)"
    Variant: ClassVar[type[VariantConfig]] = QATVariant
    tasks: ClassVar[tuple[str, ...]] = ("vision",)

    def availability(self, device: str = "cpu") -> Availability:
        if torch.device(device).type != "cpu":
            return Availability(False, "eager quantized kernels (fbgemm / x86) run on the CPU only")
        if not any(e in torch.backends.quantized.supported_engines for e in ENGINES):
            return Availability(False, "this torch build has no x86 / fbgemm quantized engine")
        return Availability(True)

    def quantize(self, model: torch.nn.Module, variant: VariantConfig, calibration: CalibrationSet | None,
                 device: torch.device) -> QuantizedModel:
        assert isinstance(variant, QATVariant)
        if torch.device(device).type != "cpu":
            raise HarnessError("torch-qat: eager quantized kernels run on the CPU only; use device: cpu")
        groups = fuse_groups(model)
        images, labels = dataset_of(model, "train")
        use_engine(variant.engine)
        with quiet_eager_quantization(), torch.enable_grad():
            import torch.ao.quantization as tq

            model = model.float().train()
            tq.fuse_modules_qat(model, groups, inplace=True)
            model.qconfig = tq.get_default_qat_qconfig(variant.engine)
            tq.prepare_qat(model, inplace=True)
            training = finetune(model, images, labels, variant)
            model.eval()
            tq.convert(model, inplace=True)
        return VisionModel(model, torch.device("cpu"), info={
            "kernel": f"torch.ao eager quantized modules ({variant.engine})", "engine": variant.engine,
            "scheme": "static INT8 (QAT)", "runtime": "torch eager",
            "qconfig": f"get_default_qat_qconfig('{variant.engine}')", "fused": groups, "training": training,
            "quantized_modules": count_quantized(model)})
