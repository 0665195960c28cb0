"""Layer sensitivity: quantize one linear layer at a time, everything else float, and measure the
mean KLD of the whole model's next-token distribution from the float model's on calibration
windows. Ranks layers per scheme, measures groups of layers (e.g. all down_proj) under a scheme,
and suggests a mixed-precision allocation: quantize everything with `base`, keep the N most
sensitive layers at `keep_as`, and *measure* (not extrapolate) the KLD and bytes of that model.

Schemes use the libraries' own code: the rtn adapter's RTNLinear (weight-only) and torch's
dynamic quantized Linear (`torch.ao.nn.quantized.dynamic.Linear.from_float`, the module
`quantize_dynamic` installs: int8 weights, activations quantized per tensor on every forward).

Runs on the float model only: in the suite's reference cell (other cells return nothing). The
ranking is also written to the cell dir as sensitivity.json (for mixed-precision tooling).
Per-layer values are `layer_kld@layer` with params {layer, scheme}; per-group `group_kld@group`."""

from __future__ import annotations

import json
import math
import re
import warnings
from collections.abc import Callable

import torch
from pydantic import Field

from harness.adapters.linears import replace_module
from harness.adapters.rtn import RTNLinear, RTNVariant
from harness.adapters.torch_int8 import quiet_torch_ao
from harness.errors import HarnessError
from harness.metrics.base import CellContext, Measurement, MeasurementParams, MetricValue
from harness.metrics.meaning import MetricSpec
from harness.metrics.divergence import token_divergence
from harness.metrics.outliers import probe_layers
from harness.models.corpora import calibration_windows
from harness.weights.footprint import module_bytes


def _rtn(bits: int, group_size: int | None, sym: bool) -> Callable[[torch.nn.Linear], torch.nn.Module]:
    def build(linear: torch.nn.Linear) -> torch.nn.Module:
        return RTNLinear.from_linear(linear, RTNVariant(bits=bits, group_size=group_size, sym=sym))
    return build


def _torch_dynamic(per_channel: bool) -> Callable[[torch.nn.Linear], torch.nn.Module]:
    def build(linear: torch.nn.Linear) -> torch.nn.Module:
        if linear.weight.dtype != torch.float32:  # the dynamic kernels take float32 only
            raise HarnessError(f"sensitivity: torch dynamic int8 needs a float32 model, not {linear.weight.dtype}")

        with quiet_torch_ao(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*script_method.*deprecated.*")  # torch's own packed params
            import torch.ao.quantization as tq
            from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

            linear.qconfig = tq.per_channel_dynamic_qconfig if per_channel else tq.default_dynamic_qconfig
            try:
                return DynamicLinear.from_float(linear)
            finally:
                del linear.qconfig
    return build


# name -> (what it is, builder of the quantized replacement of one float nn.Linear)
SCHEMES: dict[str, tuple[str, Callable[[torch.nn.Linear], torch.nn.Module]]] = {
    "rtn-w8": ("RTN int8 per-channel symmetric, weight-only (rtn adapter)", _rtn(8, None, True)),
    "rtn-w4g64": ("RTN int4 group 64 asymmetric, weight-only (rtn adapter)", _rtn(4, 64, False)),
    "rtn-w4": ("RTN int4 per-channel asymmetric, weight-only (rtn adapter)", _rtn(4, None, False)),
    "rtn-w3g64": ("RTN int3 group 64 asymmetric, weight-only (rtn adapter)", _rtn(3, 64, False)),
    "torch-dyn-int8-pt": ("torch dynamic int8: per-tensor weights, per-tensor activations", _torch_dynamic(False)),
    "torch-dyn-int8-pc": ("torch dynamic int8: per-channel weights, per-tensor activations", _torch_dynamic(True)),
}


def _scheme(name: str):
    if name not in SCHEMES:
        from harness.errors import unknown

        raise unknown("sensitivity scheme", name, SCHEMES)
    return SCHEMES[name][1]


class SensitivityParams(MeasurementParams):
    corpus: str = "boolq-wiki"  # calibration split
    n_samples: int = Field(1, gt=0)
    seq_len: int = Field(256, gt=1)
    seed: int = 0
    schemes: list[str] = Field(default_factory=lambda: ["rtn-w4g64", "torch-dyn-int8-pt"])
    layers: str | None = Field(None, description="regex: only layers whose name matches (default: all)")
    groups: list[str] = Field(default_factory=lambda: ["q_proj|k_proj|v_proj", "o_proj", "gate_proj|up_proj", "down_proj", "."],
                              description="regexes: each group quantized together under every scheme ('.': all)")
    base: str = "rtn-w4g64"
    keep_as: str = "rtn-w8"
    keep: list[int] = Field(default_factory=lambda: [1, 4, 16], description="N most sensitive kept at keep_as ([]: none)")
    rank: bool = Field(True, description="one layer at a time (False: groups only, no mixed-precision suggestion)")


class Swapper:
    """Put quantized layers in place of float ones and take them out again."""

    def __init__(self, model: torch.nn.Module):
        self.model, self.saved = model, {}

    def put(self, name: str, module: torch.nn.Module) -> None:
        old = replace_module(self.model, name, module)
        self.saved.setdefault(name, old)

    def restore(self) -> None:
        for name, original in self.saved.items():
            replace_module(self.model, name, original)
        self.saved.clear()


def kld_stats(ref_logits: torch.Tensor, logits: torch.Tensor, ids: torch.Tensor) -> tuple[float, float, float, int]:
    kld, agree, _ = token_divergence(ref_logits, logits, ids)
    k = kld.numpy()
    return float(k.mean()), float(k.std(ddof=1) / math.sqrt(k.size)) if k.size > 1 else float("nan"), float(agree.float().mean()), int(k.size)


def linear_bytes(module: torch.nn.Module) -> int:
    return module_bytes(module)


class Sensitivity(Measurement):
    needs_reference_model = True
    name = "sensitivity"
    metrics = (MetricSpec("*kld*", -1, "diagnostic"),)  # per layer / group / kept set: a map, not a verdict
    Params = SensitivityParams

    def run(self, ctx: CellContext, params: SensitivityParams) -> list[MetricValue]:
        for s in [*params.schemes, params.base, params.keep_as]:
            _scheme(s)
        if ctx.reference_model is not None:
            return []  # measured once, on the float model of the reference cell
        model = ctx.qmodel.module
        layers = probe_layers(model)
        if params.layers:
            layers = {n: m for n, m in layers.items() if re.search(params.layers, n)}
        if not layers:
            raise HarnessError("sensitivity: no float nn.Linear layers to quantize (it needs the float model: "
                               "run it in a suite whose reference is the float model)")
        ids = calibration_windows(ctx.tokenizer, params.corpus, params.n_samples, params.seq_len, params.seed)
        qm = ctx.qmodel
        ref = qm.logits(ids).cpu()
        swap = Swapper(model)

        def measure(replace: dict[str, torch.nn.Module]) -> tuple[float, float, float, int]:
            try:
                for name, mod in replace.items():
                    swap.put(name, mod)
                with torch.no_grad():
                    return kld_stats(ref, qm.logits(ids).cpu(), ids)
            finally:
                swap.restore()

        detail = {**params.model_dump(), "tokens": int(ids.numel())}
        proto = f"sensitivity: KLD from the float model on {params.n_samples} x {params.seq_len} calibration tokens"
        keep = params.keep if params.rank else []
        total = len(params.schemes) * (len(layers) * params.rank + len(params.groups)) + (len(keep) + 1) * bool(keep)
        done, out, ranking = 0, [], {}
        for scheme in params.schemes:
            build = _scheme(scheme)
            rows = []
            for name, linear in (layers if params.rank else {}).items():
                mean, se, top1, n = measure({name: build(linear)})
                rows.append({"layer": name, "kld_mean": mean, "kld_stderr": se, "top1_agreement": top1})
                out.append(MetricValue("layer_kld@layer", mean, "nats", n=n, uncertainty=se, uncertainty_kind="stderr (token-level)",
                                       protocol=proto, params={**detail, "scheme": scheme, "layer": name}))
                done += 1
                ctx.progress(done, total, f"sensitivity {scheme}")
            rows.sort(key=lambda r: -r["kld_mean"])
            if rows:
                ranking[scheme] = rows
                out.append(MetricValue("top_layer_kld", rows[0]["kld_mean"], "nats", n=n, protocol=proto,
                                       params={**detail, "scheme": scheme, "layer": rows[0]["layer"]}))
            for group in params.groups:
                members = {n: build(m) for n, m in layers.items() if re.search(group, n)}
                if members:
                    mean, se, top1, n = measure(members)
                    out.append(MetricValue("group_kld@group", mean, "nats", n=n, uncertainty=se, uncertainty_kind="stderr (token-level)",
                                           protocol=proto, params={**detail, "scheme": scheme, "group": group, "layers_in_group": len(members)}))
                done += 1
                ctx.progress(done, total, f"sensitivity {scheme} groups")

        suggestion = self._mixed(params, layers, ranking, measure, detail, proto, out, ctx, done, total) if keep else []
        (ctx.artifact_dir / "sensitivity.json").write_text(json.dumps(
            {"protocol": proto, "params": detail, "schemes": {s: SCHEMES[s][0] for s in ranking},
             "ranking": ranking, "mixed_precision": suggestion}, indent=1))
        return out

    def _mixed(self, params, layers, ranking, measure, detail, proto, out, ctx, done, total) -> list[dict]:
        """Quantize all with `base`, keep the top-N (by base's own ranking) at `keep_as`: measured."""
        base, keep_as = _scheme(params.base), _scheme(params.keep_as)
        order = [r["layer"] for r in ranking[params.base]] if params.base in ranking else None
        if order is None:  # rank by base first if it was not among the schemes
            order = sorted(layers, key=lambda n: -measure({n: base(layers[n])})[0])
        base_mods = {n: base(m) for n, m in layers.items()}
        keep_mods = {n: keep_as(m) for n, m in layers.items()}
        all_mean, *_ = measure(base_mods)
        done += 1
        ctx.progress(done, total, "sensitivity mixed precision")
        base_bytes = sum(linear_bytes(m) for m in base_mods.values())
        rows = [{"keep": 0, "layers": [], "kld_mean": all_mean, "bytes": base_bytes}]
        for n_keep in params.keep:
            kept = order[:n_keep]
            mean, se, top1, n = measure({**base_mods, **{k: keep_mods[k] for k in kept}})
            nbytes = base_bytes + sum(linear_bytes(keep_mods[k]) - linear_bytes(base_mods[k]) for k in kept)
            change = (mean - all_mean) / all_mean if all_mean > 0 else float("nan")
            text = (f"keep these {len(kept)} layers at {params.keep_as} (rest {params.base}): "
                    f"{100 * change:+.1f}% KLD for {nbytes - base_bytes:+,} bytes")
            rows.append({"keep": len(kept), "layers": kept, "kld_mean": mean, "kld_stderr": se,
                         "bytes": nbytes, "kld_change": change, "suggestion": text})
            out.append(MetricValue("mixed_kld@keep", mean, "nats", n=n, uncertainty=se, uncertainty_kind="stderr (token-level)",
                                   protocol=proto, params={**detail, "keep": len(kept), "layers_kept": kept, "bytes": nbytes,
                                                           "base_kld": all_mean, "base_bytes": base_bytes,
                                                           "kld_change": change, "suggestion": text}))
            done += 1
            ctx.progress(done, total, "sensitivity mixed precision")
        out.append(MetricValue("base_all_layers_kld", all_mean, "nats", protocol=proto,
                               params={**detail, "scheme": params.base, "bytes": base_bytes}))
        return rows
