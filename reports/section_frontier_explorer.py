"""Report section "Frontier explorer": one figure per model with a menu that switches the axes —
x: bits per weight, weight size or decode speed (when measured); y: every quality metric that has
a better direction (ppl, ppl ratio, mean KLD, top-1 agreement, task accuracy / recovery, ...).

The fixed frontier figures above show the headline pairs; this one keeps the page light while
letting a reader try any pair. The Pareto front honours each axis's direction (speed: higher is
better, size: lower; the y metric's own direction from its declaration, harness.metrics.meaning)."""

from __future__ import annotations

import html

import pandas as pd
import plotly.graph_objects as go

from harness.metrics.meaning import spec_for
from harness.results.records import instance_label, measurement_instance
from harness.reports.common import REFERENCE_MARKER, axis_layout, cell_looks, pareto_front
from harness.reports.sections import Section

# (metric names tried in order, menu label, axis title, scale, lower is better)
X_CHOICES = (
    (("bits_per_weight",), "bits/weight", "bits per weight (bits)", 1.0, True),
    (("weight_bytes",), "weight MB", "weight size (MB = 10^6 bytes)", 1e6, True),
    (("decode_tokens_s", "tokens_per_s"), "decode tok/s", "decode speed (tokens/s, higher is better)", 1.0, False),
)



def _per_cell(ok: pd.DataFrame, metrics: tuple[str, ...]) -> pd.DataFrame:
    for m in metrics:
        rows = ok[ok["metric"] == m].drop_duplicates(subset="cell_id", keep="last")
        if not rows.empty:
            return rows
    return ok.iloc[0:0]


def _spec(rows: pd.DataFrame):
    """The declaration of the metric in `rows` (one measurement and metric), stamps first."""
    first = rows.iloc[0]
    return spec_for(first["measurement"], first["metric"], first.get("direction"), first.get("kind"))


def _y_metrics(ok: pd.DataFrame) -> list[tuple[str, str, str | None]]:
    """(measurement, metric, instance): the instance (protocol|corpus) only where a suite measured
    the metric more than once, so two corpora never share one curve."""
    out = []
    for (meas, metric), g in ok.groupby(["measurement", "metric"], sort=True):
        spec = _spec(g)
        # quality with a better direction, said once (nll restates ppl), one value per cell (a
        # metric@slice is one of many: per task, per position; the task and drift sections draw those)
        if (spec is None or spec.kind != "quality" or spec.direction == 0 or spec.restates or "@" in metric
                or g["cell_id"].nunique() < 2):
            continue
        keys = sorted(g["instance"].unique())
        out += [(meas, metric, key) for key in (keys if len(keys) > 1 else [None])]
    return out


def _axis_args(name: str, axis: dict) -> dict:
    """A menu button's relayout of one axis: title, type and ticks (cleared when linear)."""
    return {f"{name}.title.text": axis["title"]["text"], f"{name}.type": axis["type"],
            f"{name}.tickvals": axis.get("tickvals"), f"{name}.ticktext": axis.get("ticktext"),
            f"{name}.tickmode": "array" if "tickvals" in axis else "auto"}


def _add_points(fig: go.Figure, pts: pd.DataFrame, looks: dict, metric: str, xlabel: str) -> None:
    """One trace per backend (per-point symbols and labels: the menu holds every pair, so a trace per
    cell would multiply the page's JSON by the number of cells), the reference as a gold star."""
    hover = f"<b>%{{text}}</b><br>{html.escape(metric)}: %{{y:.4g}}<br>{html.escape(xlabel)}: %{{x:.4g}}<extra></extra>"
    for backend, g in pts[~pts["is_reference"].astype(bool)].groupby("backend", sort=True):
        g = g.sort_values("variant")
        gl = [looks.get(c) for c in g["cell_id"]]
        fig.add_trace(go.Scatter(
            x=g["x"], y=g["value"], mode="markers+text", name=html.escape(str(backend)),
            text=[html.escape(str(v)) for v in g["variant"]], textposition="top center", textfont={"size": 10},
            marker={"size": 10, "color": gl[0].color if gl[0] else None,
                    "symbol": [lk.symbol if lk else "circle" for lk in gl]},
            error_y={"type": "data", "array": [None if pd.isna(u) else float(u) for u in g["uncertainty"]],
                     "visible": True, "thickness": 1},
            hovertemplate=hover))
    ref = pts[pts["is_reference"].astype(bool)]
    if not ref.empty:
        fig.add_trace(go.Scatter(
            x=ref["x"], y=ref["value"], mode="markers+text", name="reference", marker=dict(REFERENCE_MARKER),
            text=[html.escape(str(v)) for v in ref["variant"]], textposition="top center", textfont={"size": 10},
            hovertemplate=hover))


def explorer_figure(df: pd.DataFrame, model: str) -> go.Figure | None:
    ok = df[(df["status"] == "ok") & df["value"].notna() & (df["model"] == model)]
    failed = set(df.loc[(df["model"] == model) & (df["status"] != "ok"), "cell_id"])
    ok = ok[~ok["cell_id"].isin(failed)]
    if ok.empty:
        return None
    ok = ok.assign(instance=[measurement_instance(pr, pa) for pr, pa in zip(ok["protocol"], ok["params"])])
    xs = [(c, _per_cell(ok, c[0])) for c in X_CHOICES]
    xs = [(c, rows) for c, rows in xs if len(rows) >= 2]
    ys = _y_metrics(ok)
    combos = [(x, y) for y in ys for x in xs]
    if len(combos) < 2:
        return None
    fig = go.Figure()
    looks = cell_looks(df)
    buttons, masks = [], []
    for (xc, xrows), (meas, metric, key) in combos:
        _, xlabel, xtitle, scale, x_lower = xc
        yrows = ok[(ok["measurement"] == meas) & (ok["metric"] == metric)]
        if key is not None:
            yrows = yrows[yrows["instance"] == key]
        metric_label = metric if key is None else f"{metric} [{instance_label(key)}]"
        yrows = yrows.drop_duplicates(subset="cell_id", keep="last")
        pts = yrows.merge(xrows[["cell_id", "value"]].rename(columns={"value": "x"}), on="cell_id")
        if pts.empty:
            continue
        pts = pts.assign(x=pts["x"] / scale).reset_index(drop=True)
        y_lower = _spec(yrows).direction < 0
        start = len(fig.data)
        front = pareto_front([(x if x_lower else -x, y) for x, y in zip(pts["x"], pts["value"])], y_lower)
        if front:
            fp = pts.iloc[front].sort_values("x")
            fig.add_trace(go.Scatter(x=fp["x"], y=fp["value"], mode="lines", name="Pareto front", hoverinfo="skip",
                                     line={"shape": "hv" if x_lower else "vh", "color": "rgba(80,80,80,0.6)", "width": 2}))
        _add_points(fig, pts, looks, metric, xlabel)
        n = len(fig.data) - start
        masks.append((start, n))
        unit = next((str(u) for u in pts["unit"] if isinstance(u, str) and u), "")
        ytitle = f"{meas}/{metric}" + (f" ({unit})" if unit else "") + (", lower is better" if y_lower else ", higher is better")
        buttons.append({"label": f"{metric_label} vs {xlabel}", "xaxis": axis_layout(pts["x"], xtitle),
                        "yaxis": axis_layout(pts["value"], html.escape(ytitle))})
    if len(buttons) < 2:
        return None
    total = len(fig.data)
    menu = []
    for (start, n), b in zip(masks, buttons):
        visible = [start <= i < start + n for i in range(total)]
        menu.append({"label": html.escape(b["label"]), "method": "update",
                     "args": [{"visible": visible}, {**_axis_args("xaxis", b["xaxis"]), **_axis_args("yaxis", b["yaxis"]),
                                                     "title.text": f"{html.escape(model)}: {html.escape(b['label'])}"}]})
    for i, trace in enumerate(fig.data):
        trace.visible = i < masks[0][0] + masks[0][1]
    fig.update_layout(
        title=f"{html.escape(model)}: {html.escape(buttons[0]['label'])}", template="plotly_white",
        xaxis=buttons[0]["xaxis"], yaxis=buttons[0]["yaxis"], legend_title_text="backend (points labelled by variant)",
        updatemenus=[{"buttons": menu, "direction": "down", "x": 1.0, "xanchor": "right", "y": 1.18, "yanchor": "top",
                      "showactive": True}],
        margin={"t": 90},
    )
    return fig


def build(df: pd.DataFrame, info: dict) -> Section | None:
    if df.empty:
        return None
    figs = [f for m in sorted(df["model"].dropna().unique()) if (f := explorer_figure(df, m)) is not None]
    if not figs:
        return None
    return Section(
        title="Frontier explorer",
        intro=("Pick any quality metric against bits per weight, weight size or decode speed (when measured) from "
               "the menu. Error bars are the recorded uncertainty; the star is the reference cell; the grey line is "
               "the Pareto front for the chosen pair, each axis in its own better direction. An axis whose values "
               "span more than 2.5x is drawn in log scale."),
        figures=figs,
    )
