"""Round-to-nearest (RTN) weight-only quantization in plain torch: the baseline every other method
is compared with. No calibration, no error feedback: each group of weights gets its own scale
(and zero point when asymmetric) and every weight is rounded to the nearest level.

Rounding is round-half-to-even (`torch.round`). Codes are bit-packed (`harness.weights.packing`) and the
float weight is rebuilt on every forward and then dropped, so the bytes the storage accounting
sees are the bytes the method really needs: b bits per weight plus one scale (and one b-bit zero
code when asymmetric) per group. One exception, for the quality measurements' passes only
(`QuantizedModel.evaluating`, `held_weights`: a Scorer call, drift's greedy `generate` call): there
each layer's float weight is dequantized once per call and dropped after it (the same weights, so
the same logits; a float copy of the linear layers is held meanwhile: 4 bytes a weight, ~425 MB for
SmolLM2-135M, on a CPU with room for it; the footprint is counted before, from the packed buffers,
and no speed measurement runs under it, so the wall times and tokens/s of those measurements are
not rtn's own speed: `llm-perf` measures that). Otherwise decoding 32 tokens rebuilt every weight
33 times (~9 s of a ~15 s drift measurement on 2 cores) and every scoring batch once more."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from harness.adapters.base import Adapter, CalibrationSet, ModelShapes, QuantizedModel, VariantConfig, check_group_size
from harness.adapters.linears import replace_linears
from harness.errors import HarnessError
from harness.weights.packing import pack_bits, unpack_bits


class RTNVariant(VariantConfig):
    bits: Literal[2, 3, 4, 5, 6, 7, 8]
    group_size: int | None = Field(default=None, gt=0)  # None: one scale per output channel
    sym: bool = False  # symmetric: signed range, no zero point; else unsigned + per-group zero
    scale_dtype: Literal["float16", "bfloat16", "float32"] = "float16"

    def label(self) -> str:
        group = f"g{self.group_size}" if self.group_size else "pc"
        label = f"int{self.bits}-{group}-{'sym' if self.sym else 'asym'}"
        if self.scale_dtype != "float16":  # keep labels unique; fp16 scales are the default
            label += {"bfloat16": "-bf16scale", "float32": "-fp32scale"}[self.scale_dtype]
        return label



def _stored_scale(scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Scale as it will be stored. A zero scale (constant-zero group, or underflow in the storage
    dtype) becomes 1: its codes then all equal the zero point and it dequantizes to 0."""
    stored = scale.to(dtype)
    return torch.where(stored == 0, torch.ones_like(stored), stored)


class RTNLinear(torch.nn.Module):
    """A linear layer holding packed RTN codes; it dequantizes the full weight every forward."""

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int, sym: bool,
                 qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor | None,
                 bias: torch.Tensor | None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.sym = bits, group_size, sym
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)
        self.register_buffer("qzeros", qzeros)  # None when symmetric
        self.bias = torch.nn.Parameter(bias, requires_grad=False) if bias is not None else None
        self.held: dict[torch.dtype, torch.Tensor] | None = None  # dequantized weights, inside held_weights only

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: torch.nn.Linear, variant: RTNVariant,
                    device: torch.device | str | None = None) -> RTNLinear:
        """Quantize `linear` (on `device`, default its own) with round-to-nearest."""
        out_f, in_f = linear.out_features, linear.in_features
        gs = variant.group_size or in_f
        if in_f % gs:
            raise HarnessError(f"rtn: group_size {gs} does not divide in_features {in_f}")
        b = variant.bits
        w = linear.weight.detach().to(device=device or linear.weight.device, dtype=torch.float32)
        w = w.reshape(out_f, in_f // gs, gs)
        sdtype = getattr(torch, variant.scale_dtype)
        if variant.sym:
            qmax = 2 ** (b - 1) - 1
            scales = _stored_scale(w.abs().amax(dim=-1) / qmax, sdtype)
            q = torch.round(w / scales.float().unsqueeze(-1)).clamp_(-qmax, qmax) + 2 ** (b - 1)
            qzeros = None
        else:
            # the range always contains 0 (as in GPTQ's quantizer) so the zero code fits in b bits
            qmax = 2**b - 1
            lo, hi = w.amin(dim=-1).clamp(max=0), w.amax(dim=-1).clamp(min=0)
            scales = _stored_scale((hi - lo) / qmax, sdtype)
            zeros = torch.round(-lo / scales.float()).clamp_(0, qmax)
            q = (torch.round(w / scales.float().unsqueeze(-1)) + zeros.unsqueeze(-1)).clamp_(0, qmax)
            qzeros = pack_bits(zeros.to(torch.uint8), b)
        bias = linear.bias.detach().to(w.device) if linear.bias is not None else None
        return cls(in_f, out_f, b, gs, variant.sym, pack_bits(q.to(torch.uint8), b), scales, qzeros, bias)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The (out, in) weight these codes stand for: (code - zero) * scale in float32, then cast.
        code - zero is an exact small integer, so it is taken in int8 (int16 at 8 bits) and
        multiplied straight into float32: one float temporary instead of three, the same bits."""
        n_groups = self.in_features // self.group_size
        codes = unpack_bits(self.qweight, self.bits, self.out_features * self.in_features)
        codes = codes.view(self.out_features, n_groups, self.group_size).to(torch.int8 if self.bits < 8 else torch.int16)
        if self.qzeros is None:
            codes.sub_(2 ** (self.bits - 1))
        else:
            codes.sub_(unpack_bits(self.qzeros, self.bits, self.out_features * n_groups).view(self.out_features, n_groups, 1))
        w = torch.mul(codes, self.scales.float().unsqueeze(-1))
        return w.reshape(self.out_features, self.in_features).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        if self.held is None:
            return F.linear(x, self.dequantize(x.dtype), bias)
        weight = self.held.get(x.dtype)
        if weight is None:
            weight = self.held[x.dtype] = self.dequantize(x.dtype)
        return F.linear(x, weight, bias)

    def extra_repr(self) -> str:
        group = self.group_size if self.group_size != self.in_features else "pc"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group={group}, sym={self.sym}, scale_dtype={self.scales.dtype}")


HOLD_HEADROOM = 2.0  # hold float weights only where free memory is this many times their size


@contextlib.contextmanager
def held_weights(module: torch.nn.Module) -> Iterator[bool]:
    """Inside: each RTNLinear of `module` dequantizes its weight once, on first use, and reuses it
    (bitwise the weight every forward would rebuild), dropped on exit. Only on a CPU with
    HOLD_HEADROOM times the float weights' bytes free (else: as outside). Yields whether it holds."""
    layers = [m for m in module.modules() if isinstance(m, RTNLinear)]
    float_bytes = 4 * sum(m.in_features * m.out_features for m in layers)
    hold = bool(layers) and all(m.qweight.device.type == "cpu" for m in layers) and _free_memory() > HOLD_HEADROOM * float_bytes
    for m in layers if hold else []:
        m.held = {}
    try:
        yield hold
    finally:
        for m in layers if hold else []:
            m.held = None


def _free_memory() -> int:
    import psutil

    return int(psutil.virtual_memory().available)


class RTNQuantizedModel(QuantizedModel):
    """An rtn model: the quality measurements' passes use each weight dequantized once per call."""

    def evaluating(self) -> contextlib.AbstractContextManager:
        return held_weights(self.module)


class RTNAdapter(Adapter):
    name: ClassVar[str] = "rtn"
    description: ClassVar[str] = "round-to-nearest weight-only int2..int8 in plain torch (baseline)"
    Variant: ClassVar[type[VariantConfig]] = RTNVariant

    def check(self, variant: VariantConfig, shapes: ModelShapes, device: str) -> None:
        assert isinstance(variant, RTNVariant)
        check_group_size("rtn", variant.group_size, shapes)

    @torch.no_grad()
    def quantize(
        self,
        model: torch.nn.Module,
        variant: VariantConfig,
        calibration: CalibrationSet | None,
        device: torch.device,
    ) -> QuantizedModel:
        """Replace every nn.Linear but the head in place, one layer at a time: only one float
        layer is ever on `device` next to the already packed ones."""
        assert isinstance(variant, RTNVariant)
        device = torch.device(device)
        # names, not modules: each float layer is freed once replaced
        replace_linears(model, lambda _name, linear: RTNLinear.from_linear(linear, variant, device))
        model = model.to(device)
        n = sum(isinstance(m, RTNLinear) for m in model.modules())
        return RTNQuantizedModel(model, device, info={"kernel": "torch dequantize+F.linear", "quantized_layers": n,
                                                      "evaluating": "weights dequantized once per scoring / generate call"})
