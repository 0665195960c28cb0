"""Outlier probes per linear layer, from calibration text through forward hooks: why do some
schemes (per-tensor int8 activations: torch dynamic INT8, quanto W8A8) hurt where weight-only
int8 does not?

On the float model (the reference cell, or any cell without a reference), per linear layer's
input activations X (tokens x channels), over the calibration windows:
- act_absmax: max |X|; act_max_median_ratio: max over channels of the channel's max |x| divided
  by the median channel's max |x| (one outlier channel drives a per-tensor scale);
- act_kurtosis: Pearson kurtosis of all elements (a normal distribution gives 3);
- act_outlier_channels_6sigma: fraction of channels with some |x| > 6 sigma (sigma: std of all
  elements); act_outlier_channels_abs6: fraction with some |x| >= 6, LLM.int8's literal threshold;
- act_int8_pt_rel_error: ||X - fq(X)|| / ||X|| for per-tensor symmetric int8 fake quantization
  with the absmax scale (torch.fake_quantize_per_tensor_affine): the activation error a per-tensor
  scheme cannot avoid on this layer;
- weight_row_max_median_ratio: max / median over output channels of the row's max |w|.
On a quantized cell: layer_rel_error = ||L_q(X) - L(X)|| / ||L(X)|| with the *float* model's
input X fed to both the float layer L and the cell's layer of the same name L_q, so each layer's
own error is seen without the error of the layers before it (activation quantization included).

Per-layer values are named `<metric>@layer` with params["layer"]; summaries (max over layers and
where) have plain names."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from pydantic import Field

from harness.metrics.base import CellContext, Measurement, MeasurementParams, MetricValue
from harness.metrics.meaning import MetricSpec
from harness.models.corpora import calibration_windows


class OutliersParams(MeasurementParams):
    corpus: str = "boolq-wiki"  # calibration split: never the evaluated text
    n_samples: int = Field(2, gt=0)
    seq_len: int = Field(256, gt=1)
    seed: int = 0
    sigma: float = Field(6.0, gt=0)
    abs_threshold: float = Field(6.0, gt=0)


@dataclass
class ActStats:
    """Running statistics of one layer's input activations (exact over all windows)."""

    chan_absmax: torch.Tensor | None = None
    moments: np.ndarray = field(default_factory=lambda: np.zeros(5))  # count, sum x, x^2, x^3, x^4
    sq_err: float = 0.0  # per-tensor int8 fake-quant error (per window: one scale per forward)
    sq_norm: float = 0.0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).double()
        absmax = x.abs().amax(0)
        self.chan_absmax = absmax if self.chan_absmax is None else torch.maximum(self.chan_absmax, absmax)
        self.moments += np.array([x.numel(), x.sum().item(), (x**2).sum().item(), (x**3).sum().item(), (x**4).sum().item()])
        xf = x.float()
        scale = max(float(xf.abs().max()) / 127.0, 1e-12)
        fq = torch.fake_quantize_per_tensor_affine(xf, scale, 0, -128, 127)
        self.sq_err += float(((fq - xf).double() ** 2).sum())
        self.sq_norm += float((x**2).sum())

    def summary(self, sigma: float, abs_threshold: float) -> dict[str, float]:
        n, s1, s2, s3, s4 = self.moments
        mean = s1 / n
        var = s2 / n - mean**2
        m4 = s4 / n - 4 * mean * s3 / n + 6 * mean**2 * s2 / n - 3 * mean**4  # central 4th moment
        absmax = self.chan_absmax.numpy()
        std = math.sqrt(max(var, 0.0))
        median = float(np.median(absmax))
        return {
            "act_absmax": float(absmax.max()),
            "act_max_median_ratio": float(absmax.max() / median) if median > 0 else float("inf"),
            "act_kurtosis": m4 / var**2 if var > 0 else float("nan"),
            "act_outlier_channels_6sigma": float((absmax > sigma * std).mean()),
            "act_outlier_channels_abs6": float((absmax >= abs_threshold).mean()),
            "act_int8_pt_rel_error": math.sqrt(self.sq_err / self.sq_norm) if self.sq_norm > 0 else float("nan"),
        }


UNITS = {"act_absmax": "abs value", "act_max_median_ratio": "x", "act_kurtosis": "kurtosis (normal=3)",
         "act_outlier_channels_6sigma": "fraction of channels", "act_outlier_channels_abs6": "fraction of channels",
         "act_int8_pt_rel_error": "relative L2", "weight_row_max_median_ratio": "x", "layer_rel_error": "relative L2"}


def probe_layers(model: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    """The float linear layers quantizers target (the output head is left out, as they do). Exact
    type: quantized layers that subclass nn.Linear (quanto, bitsandbytes) are not float layers."""
    return {n: m for n, m in model.named_modules() if type(m) is torch.nn.Linear and not n.endswith("lm_head")}


def weight_row_ratio(linear: torch.nn.Linear) -> float:
    rows = linear.weight.detach().float().abs().amax(1)
    median = float(rows.median())
    return float(rows.max() / median) if median > 0 else float("inf")


def _float_dtype(module: torch.nn.Module, default: torch.dtype) -> torch.dtype:
    return next((p.dtype for p in module.parameters() if p.is_floating_point()), default)


def run_hooked(model: torch.nn.Module, windows: torch.Tensor, device, hook, progress=None) -> None:
    """Run `windows` through `model`, calling hook(name, linear, input, output) on every probed layer."""
    handles = [m.register_forward_hook(lambda mod, inp, out, name=n: hook(name, mod, inp[0], out))
               for n, m in probe_layers(model).items()]
    try:
        with torch.no_grad():
            for i, row in enumerate(windows):
                model(input_ids=row[None].to(device), use_cache=False)
                if progress:
                    progress(i + 1, len(windows), "outlier probe windows")
    finally:
        for h in handles:
            h.remove()


def activation_probe(model: torch.nn.Module, windows: torch.Tensor, device, progress=None) -> dict[str, ActStats]:
    stats: dict[str, ActStats] = {}
    run_hooked(model, windows, device, lambda name, mod, x, y: stats.setdefault(name, ActStats()).add(x), progress)
    return stats


def layer_errors(float_model: torch.nn.Module, qmodule: torch.nn.Module, windows: torch.Tensor, device,
                 progress=None) -> dict[str, float]:
    """Relative output error of each of the cell's layers fed the float model's input."""
    q_layers = dict(qmodule.named_modules())
    sums: dict[str, list[float]] = {}

    def hook(name, mod, x, y):
        q = q_layers.get(name)
        if q is None or q is mod:
            return
        yq = q(x.to(_float_dtype(q, x.dtype))).float()
        acc = sums.setdefault(name, [0.0, 0.0])
        acc[0] += float(((yq - y.float()).double() ** 2).sum())
        acc[1] += float((y.double() ** 2).sum())

    run_hooked(float_model, windows, device, hook, progress)
    return {n: math.sqrt(e / r) if r > 0 else float("nan") for n, (e, r) in sums.items()}


def _per_layer(values: dict[str, float], metric: str, protocol: str, n: int, detail: dict) -> list[MetricValue]:
    out = [MetricValue(f"{metric}@layer", v, UNITS[metric], n=n, protocol=protocol, params={**detail, "layer": name})
           for name, v in values.items()]
    finite = {k: v for k, v in values.items() if math.isfinite(v)}
    if finite:
        worst = max(finite, key=finite.get)
        out.append(MetricValue(f"{metric}_max", finite[worst], UNITS[metric], n=len(finite), protocol=protocol,
                               params={**detail, "layer": worst}))
    return out


class Outliers(Measurement):
    needs_reference_model = True
    name = "outliers"
    metrics = (MetricSpec("*@layer", 0, "diagnostic"), MetricSpec("*_max", 0, "diagnostic"),
               MetricSpec("layers_compared", 0, "diagnostic"))
    Params = OutliersParams

    def run(self, ctx: CellContext, params: OutliersParams) -> list[MetricValue]:
        windows = calibration_windows(ctx.tokenizer, params.corpus, params.n_samples, params.seq_len, params.seed)
        detail = {**params.model_dump(), "tokens": int(windows.numel())}
        protocol = f"outlier probe: forward hooks on {params.n_samples} x {params.seq_len} calibration tokens"
        if ctx.reference_model is None:  # this cell's model is the float model
            model = ctx.qmodel.module
            layers = probe_layers(model)
            if not layers:
                return []  # nothing in torch to probe (e.g. llama.cpp)
            stats = activation_probe(model, windows, ctx.qmodel.device, ctx.progress)
            summaries = {name: s.summary(params.sigma, params.abs_threshold) for name, s in stats.items()}
            out = []
            for metric in UNITS:
                if metric.startswith("act_"):
                    out += _per_layer({n: s[metric] for n, s in summaries.items()}, metric, protocol, int(windows.numel()), detail)
            out += _per_layer({n: weight_row_ratio(m) for n, m in layers.items()}, "weight_row_max_median_ratio",
                              "per output channel max |w| of the float weight", None, detail)
            return out
        reference = ctx.reference_model()
        errors = layer_errors(reference.module, ctx.qmodel.module, windows, ctx.qmodel.device, ctx.progress)
        out = [MetricValue("layers_compared", float(len(errors)), "layers", protocol=protocol, params=detail)]
        if errors:
            out += _per_layer(errors, "layer_rel_error", protocol + "; float input to both layers", int(windows.numel()),
                              {**detail, "reference_cell": ctx.reference_dir.name if ctx.reference_dir else None})
        return out
