"""Report section: sentence encoders (the `embedding` and `encoder-speed` measurements).

The LLM frontier (perplexity / KLD against bits) has nothing to draw for an encoder, so this
section shows what its suite measures: agreement with the reference (mean cosine to the float
model's vectors, with its standard error) against speed (sentences/s at the largest measured
batch) and against weight size, plus one table row per cell with retrieval and latency."""

from __future__ import annotations

import math
import re

import pandas as pd
import plotly.graph_objects as go

from harness.reports.common import Table
from harness.reports.sections import Section

MB = 1e6


def _ok(df: pd.DataFrame) -> pd.DataFrame:
    rows = df[(df["status"] == "ok") & df["value"].notna()]
    return rows.drop_duplicates(["cell_id", "measurement", "metric"], keep="last")


def _get(rows: pd.DataFrame, cell_id: str, metric: str, column: str = "value") -> float | None:
    sel = rows[(rows["cell_id"] == cell_id) & (rows["metric"] == metric)]
    if sel.empty or pd.isna(sel.iloc[-1][column]):
        return None
    return float(sel.iloc[-1][column])


def _fmt(v: float | None, fmt: str, unc: float | None = None) -> tuple[str, str]:
    if v is None or math.isnan(v):
        return "", ""
    spread = f" ± {fmt.replace('+', '').format(unc)}" if unc is not None and not math.isnan(unc) else ""
    text = fmt.format(v) + spread
    return text, repr(float(v))


def _scatter(points: list[dict], x: str, x_title: str, title: str) -> go.Figure:
    fig = go.Figure()
    for p in points:
        if p[x] is None or p["cos"] is None:
            continue
        fig.add_trace(go.Scatter(x=[p[x]], y=[p["cos"]], mode="markers+text", name=p["label"], text=[p["label"]],
                                 textposition="top center",
                                 error_y=dict(type="data", array=[p["cos_se"] or 0.0], visible=True)))
    fig.update_layout(title=title, xaxis_title=x_title, yaxis_title="mean cosine to the reference's vectors",
                      showlegend=False, height=420)
    return fig


def build(df: pd.DataFrame, info: dict) -> Section | None:

    rows = _ok(df)
    if not (rows["measurement"] == "embedding").any():
        return None
    speed = rows[rows["metric"].str.match(r"throughput_b\d+$")]
    batch = max((int(re.findall(r"\d+", m)[0]) for m in speed["metric"].unique()), default=None)
    points, table = [], []
    for _, cell in rows.drop_duplicates("cell_id").iterrows():
        cid = cell["cell_id"]
        if not ((rows["cell_id"] == cid) & (rows["measurement"] == "embedding")).any():
            continue
        p = {"label": f"{cell['backend']}:{cell['variant']}", "cos": _get(rows, cid, "cosine_mean"),
             "cos_se": _get(rows, cid, "cosine_mean", "uncertainty"),
             "mb": (_get(rows, cid, "weight_bytes") or float("nan")) / MB,
             "rate": _get(rows, cid, f"throughput_b{batch}") if batch else None}
        if p["cos"] is None and bool(cell.get("is_reference", False)):
            p["cos"], p["cos_se"] = 1.0, 0.0  # the reference against itself
        points.append(p)
        latency_b1 = _get(rows, cid, "latency_b1")
        table.append([
            (p["label"], ""), _fmt(p["mb"], "{:.1f}"), _fmt(_get(rows, cid, "bits_per_weight"), "{:.2f}"),
            _fmt(p["cos"], "{:.4f}", p["cos_se"]), _fmt(_get(rows, cid, "cosine_p1"), "{:.4f}"),
            _fmt(_get(rows, cid, "recall_at_1"), "{:.3f}"),
            _fmt(_get(rows, cid, "mrr_delta"), "{:+.4f}", _get(rows, cid, "mrr_delta", "uncertainty")),
            _fmt(latency_b1 * 1e3 if latency_b1 is not None else None, "{:.1f}"),
            _fmt(p["rate"], "{:.1f}"),
        ])
    figures = []
    if batch:
        figures.append(_scatter(points, "rate", f"sentences/s at batch {batch}", "Agreement with the reference vs speed"))
    figures.append(_scatter(points, "mb", "weight size (MB = 10^6 bytes)", "Agreement with the reference vs weight size"))
    headers = ["cell", "weights MB", "bits/weight", "cosine mean ± se", "cosine p1", "recall@1",
               "MRR Δ vs ref ± se", "latency b1 (ms)", f"sentences/s b{batch}" if batch else "sentences/s"]
    return Section(
        title="Sentence encoder: agreement, retrieval and speed",
        intro=("Cosine of each cell's sentence vectors to the reference model's (BoolQ questions and passages), "
               "BoolQ question→passage retrieval (MRR difference paired per query with the reference) and CPU "
               "speed (median over repeats, warm-up excluded). The reference is drawn at cosine 1."),
        figures=figures, tables=[Table(headers, table)],
    )
