"""Report section: outlier probes and layer sensitivity (harness.metrics.outliers, .sensitivity).

- heatmap of the float model's probes, layers x probe metric (colour: the value's rank within its
  column, so metrics in different units share one scale; hover: the value itself);
- heatmap of each cell's own per-layer error (float input fed to both layers), layers x cells;
- bar chart of the most sensitive layers per scheme (one layer quantized, the rest float), the
  per-group KLDs and the measured mixed-precision suggestions."""

from __future__ import annotations

import math
import re

import pandas as pd
import plotly.graph_objects as go

from harness.reports.common import Table, cell_label, fmt, ok_rows
from harness.reports.sections import Section

TOP_LAYERS = 20


def short(layer: str) -> str:
    """'model.layers.3.mlp.down_proj' -> 'L3.mlp.down_proj'."""
    return re.sub(r"^(model\.)?layers\.(\d+)\.", r"L\2.", layer.replace("model.layers.", "layers."))


def _layer_order(rows: pd.DataFrame) -> list[str]:
    return list(dict.fromkeys(rows["params"].map(lambda p: p["layer"])))


def probe_heatmap(rows: pd.DataFrame) -> go.Figure | None:
    sel = rows[rows["metric"].str.endswith("@layer") & rows["metric"].str.startswith(("act_", "weight_"))]
    if sel.empty:
        return None
    table = sel.assign(layer=sel["params"].map(lambda p: p["layer"]), probe=sel["metric"].str[: -len("@layer")])
    wide = table.pivot_table(index="layer", columns="probe", values="value", aggfunc="last")
    wide = wide.reindex(_layer_order(sel))
    ranks = wide.rank(pct=True)
    text = wide.map(lambda v: f"{v:.4g}")
    fig = go.Figure(go.Heatmap(
        z=ranks.values, x=list(wide.columns), y=[short(i) for i in wide.index], text=text.values,
        colorscale="Reds", colorbar=dict(title="rank in column"),
        hovertemplate="%{y}<br>%{x} = %{text}<extra></extra>",
    ))
    fig.update_layout(title="Float model: activation and weight outlier probes per layer", height=max(400, 12 * len(wide)),
                      yaxis=dict(autorange="reversed"), margin=dict(l=140, r=20, t=50, b=120))
    return fig


def error_heatmap(rows: pd.DataFrame) -> go.Figure | None:
    sel = rows[rows["metric"] == "layer_rel_error@layer"]
    if sel.empty:
        return None
    table = sel.assign(layer=sel["params"].map(lambda p: p["layer"]), cell=[cell_label(r) for _, r in sel.iterrows()])
    wide = table.pivot_table(index="layer", columns="cell", values="value", aggfunc="last").reindex(_layer_order(sel))
    z = wide.map(lambda v: math.log10(v) if v and v > 0 else None)
    fig = go.Figure(go.Heatmap(
        z=z.values, x=list(wide.columns), y=[short(i) for i in wide.index], text=wide.map(lambda v: f"{v:.3g}").values,
        colorscale="Viridis", colorbar=dict(title="log10 rel. error"),
        hovertemplate="%{y}<br>%{x}: relative error %{text}<extra></extra>",
    ))
    fig.update_layout(title="Per-layer relative output error of each cell (float input to both layers)",
                      height=max(400, 12 * len(wide)), yaxis=dict(autorange="reversed"),
                      margin=dict(l=140, r=20, t=50, b=120))
    return fig


def sensitivity_bars(rows: pd.DataFrame) -> go.Figure | None:
    sel = rows[rows["metric"] == "layer_kld@layer"]
    if sel.empty:
        return None
    fig = go.Figure()
    for scheme, g in sel.groupby(sel["params"].map(lambda p: p["scheme"]), sort=False):
        g = g.sort_values("value", ascending=False).head(TOP_LAYERS)
        fig.add_trace(go.Bar(x=[short(p["layer"]) for p in g["params"]], y=g["value"], name=str(scheme),
                             error_y=dict(type="data", array=g["uncertainty"].fillna(0).tolist())))
    fig.update_layout(title=f"Layer sensitivity: KLD with one layer quantized (top {TOP_LAYERS} per scheme)",
                      yaxis_title="KLD from the float model (nats), log", yaxis_type="log", barmode="group",
                      height=450, margin=dict(l=60, r=20, t=50, b=140))
    return fig


def _tables(rows: pd.DataFrame):

    out = []
    groups = rows[rows["metric"] == "group_kld@group"]
    if not groups.empty:
        out.append(Table(["scheme", "layers quantized together (regex)", "layers", "KLD (nats) ± stderr"], [
            [(str(p["scheme"]), ""), (str(p["group"]), ""), (str(p.get("layers_in_group")), ""),
             (f"{fmt(v)} ± {fmt(u)}", repr(float(v)))]
            for p, v, u in zip(groups["params"], groups["value"], groups["uncertainty"])]))
    mixed = rows[rows["metric"] == "mixed_kld@keep"]
    if not mixed.empty:
        out.append(Table(["mixed precision (measured)", "KLD (nats)", "KLD, all layers at base", "bytes of the linear layers"], [
            [(str(p["suggestion"]), ""), (fmt(v), repr(float(v))), (fmt(p["base_kld"]), ""), (f"{p['bytes']:,}", str(p["bytes"]))]
            for p, v in zip(mixed["params"], mixed["value"])]))
    return out


def build(df: pd.DataFrame, info: dict) -> Section | None:
    rows = pd.concat([ok_rows(df, "outliers"), ok_rows(df, "sensitivity")])
    if rows.empty:
        return None
    figs = [f for f in (probe_heatmap(rows), error_heatmap(rows), sensitivity_bars(rows)) if f is not None]
    tables = _tables(rows)
    if not figs and not tables:
        return None
    p = rows.iloc[0]["params"]
    return Section(
        title="Outliers and layer sensitivity",
        intro=(f"Forward hooks on {p.get('n_samples')} x {p.get('seq_len')} calibration tokens of '{p.get('corpus')}'. "
               "Probes of each linear layer's input: max/median of per-channel max |x|, Pearson kurtosis (normal = 3), "
               "fraction of channels beyond 6 sigma and beyond |x| >= 6 (LLM.int8), the relative error of per-tensor int8 "
               "fake quantization; weight max/median over output channels. Sensitivity: KLD from the float model with one "
               "layer (or one group) quantized, everything else float."),
        figures=figs,
        tables=tables,
    )
