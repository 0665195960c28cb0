"""PyTorch's own dynamic INT8 quantization (`torch.ao.quantization.quantize_dynamic`).

Weights are quantized to int8 once (per tensor or per output channel); activations are quantized
per tensor on every forward from their observed range, and the int8 GEMM runs in fbgemm (x86) or
qnnpack (ARM). CPU only. The output head is left in float.

Per-tensor activation scales make this method sensitive to activation outliers: on SmolLM2 the
perplexity rises by more than half. That is the method's real behaviour, not a harness bug.

Storage: a dynamic quantized Linear keeps its weight in `_packed_params`, a TorchScript object
that is neither a parameter nor a buffer, so the generic storage walk sees nothing there. The
adapter's `QuantizedModel` counts it explicitly (see `_packed_bytes`)."""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from typing import ClassVar, Literal

import torch

from harness.adapters.base import (
    Adapter,
    Availability,
    CalibrationSet,
    QuantizedModel,
    VariantConfig,
)
from harness.adapters.vision_model import as_vision_model
from harness.errors import HarnessError
from harness.weights.footprint import linear_weight_stats, module_bytes

_CPU_ONLY = "torch quantize_dynamic kernels are CPU-only (fbgemm/qnnpack)"


class TorchInt8Variant(VariantConfig):
    granularity: Literal["per_tensor", "per_channel"] = "per_tensor"

    def label(self) -> str:
        return {"per_tensor": "dyn-int8-pt", "per_channel": "dyn-int8-pc"}[self.granularity]


@contextmanager
def quiet_torch_ao():
    """torch.ao.quantization warns that it is deprecated (and so does quantized tensor creation)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.ao\.quantization is deprecated.*")
        warnings.filterwarnings("ignore", message=r".*quantized tensor creation functions.*deprecated.*")
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.ao\..*")
        yield


def _dynamic_linear_type() -> type:
    from torch.ao.nn.quantized.dynamic import Linear as DynamicQuantizedLinear

    return DynamicQuantizedLinear


def _packed_bytes(module: torch.nn.Module, engine: str) -> tuple[int, int]:
    """(weight + quantization parameter bytes, bias bytes) held in a dynamic Linear's packed params.

    With fbgemm / x86 (the engine on x86 CPUs) torch stores `PackedLinearWeight`: the int8 weight
    matrix (fbgemm's block padding is not visible from Python and not counted), and per output
    channel an int32 column offset, plus `std::vector<float>` scales and `std::vector<int32_t>`
    zero points: one each per tensor, or one per output channel. So float32 scale + int32 zero
    point, not the float64 / int64 that the unpacked quantized tensor reports. With other engines
    (qnnpack, onednn) we count the unpacked quantized tensor as it is: int8 codes plus its scale
    and zero point at the dtypes torch reports (per channel: float64 + int64 tensors; per tensor:
    one double + one int64)."""
    with quiet_torch_ao():
        weight, bias = module._packed_params._weight_bias()
    out_f = weight.shape[0]
    codes = weight.numel() * torch.iinfo(torch.int8).bits // 8
    per_channel = weight.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric)
    n_qparams = out_f if per_channel else 1
    if engine in ("fbgemm", "x86"):
        qparams = n_qparams * (4 + 4) + out_f * 4  # float32 scale + int32 zero point, int32 col offsets
    elif per_channel:
        scales, zeros = weight.q_per_channel_scales(), weight.q_per_channel_zero_points()
        qparams = scales.numel() * scales.element_size() + zeros.numel() * zeros.element_size()
    else:
        qparams = 8 + 8  # double scale, int64 zero point
    bias_bytes = bias.numel() * bias.element_size() if bias is not None else 0
    return codes + qparams, bias_bytes


class DynamicInt8Model(QuantizedModel):
    """Counts the packed weights that the generic parameter/buffer walk cannot see."""

    def _dynamic_modules(self) -> list[tuple[str, torch.nn.Module]]:
        cls = _dynamic_linear_type()
        return [(n, m) for n, m in self.module.named_modules() if isinstance(m, cls)]

    def weight_bytes(self) -> int:
        engine = self.info.get("engine", torch.backends.quantized.engine)
        return module_bytes(self.module) + sum(sum(_packed_bytes(m, engine)) for _, m in self._dynamic_modules())

    def linear_stats(self) -> tuple[int, int]:
        # dynamic Linear modules have in/out_features, so the generic walk already counts their
        # logical weights (with 0 stored bytes); add the packed bytes without bias
        n_weights, n_bytes = linear_weight_stats(self.module)
        engine = self.info.get("engine", torch.backends.quantized.engine)
        return n_weights, n_bytes + sum(_packed_bytes(m, engine)[0] for _, m in self._dynamic_modules())


class TorchDynamicInt8Adapter(Adapter):
    name: ClassVar[str] = "torch-int8"
    description: ClassVar[str] = "PyTorch native dynamic INT8 (torch.ao quantize_dynamic on Linear)"
    Variant: ClassVar[type[VariantConfig]] = TorchInt8Variant
    tasks: ClassVar[tuple[str, ...]] = ("causal-lm", "encoder", "vision")  # vision: only its Linear head is quantized

    def availability(self, device: str = "cpu") -> Availability:
        if torch.device(device).type != "cpu":
            return Availability(False, _CPU_ONLY)
        if not any(e in torch.backends.quantized.supported_engines for e in ("x86", "fbgemm", "qnnpack")):
            return Availability(False, "this torch build has no quantized engine (fbgemm/qnnpack)")
        return Availability(True)

    @torch.no_grad()
    def quantize(
        self,
        model: torch.nn.Module,
        variant: VariantConfig,
        calibration: CalibrationSet | None,
        device: torch.device,
    ) -> QuantizedModel:
        assert isinstance(variant, TorchInt8Variant)
        device = torch.device(device)
        if device.type != "cpu":
            raise HarnessError(f"torch-int8: {_CPU_ONLY}; use device: cpu")
        model = model.to(device=device, dtype=torch.float32)  # the dynamic kernels take float32
        names = {name for name, mod in model.named_modules()
                 if isinstance(mod, torch.nn.Linear) and not name.endswith("lm_head")}
        with quiet_torch_ao():
            import torch.ao.quantization as tq

            qconfig = tq.per_channel_dynamic_qconfig if variant.granularity == "per_channel" else tq.default_dynamic_qconfig
            model = tq.quantize_dynamic(model, {name: qconfig for name in names}, dtype=torch.qint8, inplace=True)
        cls = _dynamic_linear_type()
        n = sum(isinstance(m, cls) for m in model.modules())
        engine = torch.backends.quantized.engine

        return as_vision_model(DynamicInt8Model(model, device, info={
            "kernel": f"torch.ao dynamic quantized Linear ({engine})",
            "engine": engine,
            "granularity": variant.granularity,
            "quantized_layers": n,
            "scheme": "dynamic INT8 (Linear layers only)",
        }))
