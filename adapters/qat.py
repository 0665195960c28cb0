"""Quantization-aware training through torchao's QAT flow (`torchao.quantization.qat.QATConfig`).

prepare: torchao swaps every decoder nn.Linear for a `FakeQuantizedLinear` that rounds its
weights (and, for the dynamic-activation scheme, its input activations) to the target grid in
the forward pass and lets the gradient through unchanged (straight-through estimator);
train: `steps` AdamW steps of next-token loss on the calibration split (never evaluated on);
convert: torchao swaps the layers back and applies the same PTQ config (`quantize_`) to the
trained weights, so the measured model is a real torchao-quantized model.

`steps: 0` is the PTQ baseline of the same scheme (prepare and convert, no training): put it in
the same suite and the report computes recovery, (ppl_ptq - ppl_qat) / (ppl_ptq - ppl_ref).
Within the cell, `holdout` calibration windows that training never sees give the same ratio on
loss: float loss, fake-quantized loss before training (PTQ) and after (QAT); all of this, the
loss of every step and the training wall time travel in `info["training"]` and are emitted by
the `training` measurement.

The token embedding (tied to the output head in SmolLM2) stays frozen: the head is float in
every backend, and training it would move the float part of the model too.

CPU (torchao 0.18): intx_weight_only and int8_dyn_act_intx_weight convert on CPU, their codes
stored unpacked in int8 (so 4-bit weights take 8 bits here, as with the torchao adapter's intx);
int4_weight_only converts only on CUDA (with the package mslk)."""

from __future__ import annotations

import math
import time
from typing import Any, ClassVar, Literal

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
from harness.adapters.torchao_backend import has_mslk, quiet_torchao, skip_head
from harness.errors import HarnessError

Scheme = Literal["intx_weight_only", "int8_dyn_act_intx_weight", "int4_weight_only"]
_SHORT = {"intx_weight_only": "w", "int8_dyn_act_intx_weight": "a8w", "int4_weight_only": "int4wo-w"}


class QATVariant(VariantConfig):
    scheme: Scheme = "int8_dyn_act_intx_weight"
    bits: int = Field(4, ge=1, le=8)  # weight bits (int4_weight_only: 4 only)
    group_size: int | None = Field(32, gt=0)  # None: per output channel (not for int4_weight_only)
    steps: int = Field(20, ge=0)  # 0: PTQ of the same scheme, the baseline recovery is measured against
    lr: float = Field(1e-5, gt=0)
    batch_size: int = Field(1, gt=0)
    seq_len: int | None = Field(None, gt=1)  # training window; None: the calibration windows' length
    holdout: int = Field(2, ge=0)  # calibration windows kept out of training to measure recovery on

    @model_validator(mode="after")
    def _fits(self) -> QATVariant:
        if self.scheme == "int4_weight_only" and (self.bits != 4 or self.group_size is None):
            raise ValueError("int4_weight_only takes bits 4 and a group_size")
        return self

    def label(self) -> str:
        group = f"g{self.group_size}" if self.group_size else "pc"
        train = "ptq" if self.steps == 0 else f"qat{self.steps}-lr{self.lr:g}"
        extra = f"-bs{self.batch_size}" if self.batch_size != 1 else ""
        extra += f"-seq{self.seq_len}" if self.seq_len else ""
        return f"{_SHORT[self.scheme]}{self.bits}-{group}-{train}{extra}"


def base_config(variant: QATVariant):
    """The torchao PTQ config the QAT flow fake-quantizes for and converts to."""
    with quiet_torchao():
        from torchao.quantization import Int4WeightOnlyConfig, Int8DynamicActivationIntxWeightConfig, IntxWeightOnlyConfig
        from torchao.quantization.granularity import PerAxis, PerGroup

    granularity = PerGroup(variant.group_size) if variant.group_size else PerAxis(0)
    dtype = getattr(torch, f"int{variant.bits}")
    configs = {
        "intx_weight_only": lambda: IntxWeightOnlyConfig(weight_dtype=dtype, granularity=granularity),
        "int8_dyn_act_intx_weight": lambda: Int8DynamicActivationIntxWeightConfig(
            weight_dtype=dtype, weight_granularity=granularity),
        "int4_weight_only": lambda: Int4WeightOnlyConfig(group_size=variant.group_size),
    }
    return configs[variant.scheme]()


def _token_losses(model: torch.nn.Module, ids: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Per-token next-token losses (nats) of `ids`, without gradients."""
    out = []
    with torch.no_grad():
        for i in range(0, ids.shape[0], batch_size):
            batch = ids[i:i + batch_size]
            logits = model(input_ids=batch, use_cache=False).logits.float()
            out.append(torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="none"))
    return torch.cat(out)


def _mean_se(x: torch.Tensor) -> dict[str, float]:
    return {"mean": float(x.mean()), "stderr": float(x.std() / math.sqrt(x.numel())) if x.numel() > 1 else float("nan"),
            "n": int(x.numel())}


def train_fake_quantized(model: torch.nn.Module, windows: torch.Tensor, variant: QATVariant) -> dict[str, Any]:
    """`variant.steps` AdamW steps on `windows` (cycled, in order); the loss of every step."""
    params = [p for n, p in model.named_parameters() if "embed_tokens" not in n and "lm_head" not in n]
    for _name, p in model.named_parameters():
        p.requires_grad_(any(p is q for q in params))
    optimizer = torch.optim.AdamW(params, lr=variant.lr, weight_decay=0.0)
    model.train()
    losses: list[float] = []
    t0 = time.perf_counter()
    for step in range(variant.steps):
        idx = [(step * variant.batch_size + j) % windows.shape[0] for j in range(variant.batch_size)]
        batch = windows[idx]
        loss = model(input_ids=batch, labels=batch, use_cache=False).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    seconds = time.perf_counter() - t0
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    del optimizer
    return {"losses": losses, "train_seconds": seconds, "tokens_per_step": int(variant.batch_size * windows.shape[1])}


def holdout_split(n: int, seq_len: int, holdout: int, starts: list[int] | None) -> dict[str, Any]:
    """The first `holdout` windows are held out; training keeps only windows whose tokens do not
    overlap any held-out window's (random offsets overlap on a small calibration split, and a
    held-out loss measured on tokens training saw says nothing about generalisation). Without
    offsets (an adapter called directly) it cannot check: `disjoint` is then None."""
    held = list(range(min(holdout, n)))
    if not holdout or starts is None:
        return {"held": held, "train": list(range(holdout, n)), "disjoint": None if holdout else True, "dropped": 0}
    spans = [(starts[i], starts[i] + seq_len) for i in held]
    train = [i for i in range(holdout, n) if all(starts[i] >= b or starts[i] + seq_len <= a for a, b in spans)]
    return {"held": held, "train": train, "disjoint": True, "dropped": n - holdout - len(train)}


def token_coverage(calibration: CalibrationSet, train: list[int], seq_len: int, variant: QATVariant) -> dict[str, Any]:
    """How many distinct calibration tokens training saw, and how many passes over them the steps
    make: QAT on a few thousand distinct tokens for many steps memorises them (seen on the H100:
    training loss 2.9 -> 0.9 while evaluation perplexity ended worse than PTQ's)."""
    if calibration.starts is None or not train:
        return {}
    covered: set[int] = set()
    for i in train:
        covered.update(range(calibration.starts[i], calibration.starts[i] + seq_len))
    seen = variant.steps * variant.batch_size * seq_len
    return {"calibration_stream_tokens": calibration.stream_tokens, "distinct_train_tokens": len(covered),
            "epochs_over_distinct_tokens": seen / len(covered)}


class QATAdapter(Adapter):
    name: ClassVar[str] = "qat"
    description: ClassVar[str] = ("torchao quantization-aware training (fake-quantize, fine-tune on the calibration "
                                  "split, convert); steps: 0 is the PTQ baseline")
    extra: ClassVar[str | None] = "torchao"
    Variant: ClassVar[type[VariantConfig]] = QATVariant
    needs_calibration: ClassVar[bool] = True
    packages: ClassVar[tuple[str, ...]] = ("torchao",)

    def availability(self, device: str = "cpu") -> Availability:
        return Availability.of_import("torchao.quantization.qat", "torchao", self.extra)

    def variant_availability(self, variant: VariantConfig, device: str) -> Availability:
        assert isinstance(variant, QATVariant)
        if variant.scheme == "int4_weight_only" and (torch.device(device).type != "cuda" or not has_mslk()):
            return Availability(False, "qat int4_weight_only converts to torchao Int4WeightOnlyConfig, which needs "
                                       "CUDA and the package mslk >= 1.0.0; use intx_weight_only bits 4 on CPU")
        return Availability(True)

    def check(self, variant: VariantConfig, shapes: ModelShapes, device: str) -> None:
        assert isinstance(variant, QATVariant)
        check_group_size("qat", variant.group_size, shapes)

    def quantize(
        self,
        model: torch.nn.Module,
        variant: VariantConfig,
        calibration: CalibrationSet | None,
        device: torch.device,
    ) -> QuantizedModel:
        assert isinstance(variant, QATVariant)
        if calibration is None:
            raise HarnessError("qat: needs calibration windows to train on (the suite's calibration section)")
        device = torch.device(device)
        windows = calibration.input_ids
        if variant.seq_len:
            if variant.seq_len > windows.shape[1]:
                raise HarnessError(f"qat: seq_len {variant.seq_len} exceeds the calibration windows' "
                                   f"{windows.shape[1]} tokens (raise calibration.seq_len)")
            windows = windows[:, :variant.seq_len]
        if variant.holdout >= windows.shape[0]:
            raise HarnessError(f"qat: holdout {variant.holdout} leaves no calibration window to train on "
                               f"(calibration.n_samples is {windows.shape[0]})")
        split = holdout_split(windows.shape[0], windows.shape[1], variant.holdout, calibration.starts)
        if variant.holdout and not split["train"]:
            raise HarnessError(f"qat: every training window overlaps the {variant.holdout} held-out ones "
                               f"(calibration stream {calibration.stream_tokens} tokens): fewer windows or a shorter seq_len")
        windows = windows.to(device)
        train, held = windows[split["train"]], windows[split["held"]]
        with quiet_torchao():
            from torchao.quantization import quantize_
            from torchao.quantization.qat import QATConfig

            config = base_config(variant)
            model = model.to(device=device, dtype=torch.float32)
            holdout: dict[str, Any] = {}
            if held.numel():
                holdout["float"] = _mean_se(_token_losses(model, held, variant.batch_size))
            quantize_(model, QATConfig(config, step="prepare"), filter_fn=skip_head)
            if held.numel():
                holdout["ptq"] = _mean_se(_token_losses(model, held, variant.batch_size))
            log = train_fake_quantized(model, train, variant)
            if held.numel() and variant.steps:
                holdout["qat"] = _mean_se(_token_losses(model, held, variant.batch_size))
            quantize_(model, QATConfig(config, step="convert"), filter_fn=skip_head)
        kinds = sorted({type(m.weight).__name__ for m in model.modules()
                        if isinstance(m, torch.nn.Linear) and type(m.weight) not in (torch.Tensor, torch.nn.Parameter)})
        training = {**log, "steps": variant.steps, "lr": variant.lr, "batch_size": variant.batch_size,
                    "seq_len": int(windows.shape[1]), "train_windows": int(train.shape[0]),
                    "holdout_windows": int(held.shape[0]), "holdout_loss": holdout,
                    "holdout_disjoint": split["disjoint"], "train_windows_dropped_overlap": split["dropped"],
                    **token_coverage(calibration, split["train"], int(windows.shape[1]), variant)}
        return QuantizedModel(model, device, info={
            "kernel": f"torchao {'+'.join(kinds) or 'none'}", "config": type(config).__name__,
            "training": training,
        })
