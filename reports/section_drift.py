"""Report section: long-sequence drift (harness.metrics.drift). Curves of mean KLD and top-1
agreement against token position, one line per cell, from the `kld_mean@pos` /
`top1_agreement@pos` records (bucket [pos_lo, pos_hi) in params); a table of where free-running
greedy generation first leaves the reference's path."""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go

from harness.reports.common import CellLook, Table, cell_label, cell_looks, fmt, ok_rows
from harness.reports.sections import Section

MEASUREMENT = "drift"


def _style(look: CellLook | None, is_reference: bool) -> dict:
    if is_reference:
        return {"marker": {"symbol": "star", "color": "goldenrod", "size": 9}, "line": {"color": "goldenrod", "dash": "dash"}}
    if look is None:
        return {}
    return {"marker": {"symbol": look.symbol, "color": look.color, "size": 7}, "line": {"color": look.color}}


def curve_figure(rows: pd.DataFrame, metric: str, title: str, yaxis: str, log: bool,
                 looks: dict[str, CellLook] | None = None) -> go.Figure | None:
    """One line per cell against token position; `looks` (reports.common.cell_looks of the whole run)
    keeps each cell's colour and symbol the same as in the frontier figures."""
    sel = rows[rows["metric"] == metric]
    if sel.empty:
        return None
    fig = go.Figure()
    show_model = sel["model"].nunique() > 1
    for cell_id, g in sel.groupby("cell_id", sort=False):
        lo = g["params"].map(lambda p: p["pos_lo"])
        hi = g["params"].map(lambda p: p["pos_hi"])
        g = g.assign(mid=(lo + hi) / 2).sort_values("mid")
        name = cell_label(g.iloc[0]) + (f" ({g.iloc[0]['model']})" if show_model else "")
        fig.add_trace(go.Scatter(
            x=g["mid"], y=g["value"], mode="lines+markers", name=name,
            **_style((looks or {}).get(cell_id), bool(g.iloc[0]["is_reference"])),
            error_y=dict(type="data", array=g["uncertainty"].fillna(0).tolist(), visible=True, thickness=1),
            customdata=list(zip(lo.loc[g.index], hi.loc[g.index], g["n"])),
            hovertemplate=name + "<br>positions %{customdata[0]}-%{customdata[1]}: %{y:.4g}<br>n=%{customdata[2]}<extra></extra>",
        ))
    fig.update_layout(title=title, xaxis_title="token position in the window (bucket centre)", yaxis_title=yaxis,
                      yaxis_type="log" if log else "linear", height=420, margin=dict(l=60, r=20, t=50, b=50))
    return fig


def _generation_table(rows: pd.DataFrame):

    gen = rows[rows["metric"].isin(["never_diverged_fraction", "first_divergence_p10", "first_divergence_p50",
                                    "first_divergence_p90"])]
    if gen.empty:
        return None
    headers = ["model", "cell", "prompts", "new tokens", "first divergence p10", "median", "p90", "never diverged"]
    out = []
    for _, g in gen.groupby("cell_id", sort=False):
        v = {r["metric"]: r for _, r in g.iterrows()}
        first = g.iloc[0]
        cells = [(str(first["model"]), ""), (cell_label(first), ""), (str(first["n"]), str(first["n"])),
                 (str(first["params"].get("new_tokens")), "")]
        for m in ("first_divergence_p10", "first_divergence_p50", "first_divergence_p90", "never_diverged_fraction"):
            r = v.get(m)
            cells.append(("", "") if r is None else (fmt(r["value"]), repr(float(r["value"]))))
        out.append(cells)
    return Table(headers, out)


def build(df: pd.DataFrame, info: dict) -> Section | None:
    rows = ok_rows(df, MEASUREMENT)
    if rows.empty:
        return None
    refs = sorted({str(p.get("reference_cell")) for p in rows["params"] if p.get("reference_cell")})
    ref_cells = df[df["cell_id"].isin(refs)].drop_duplicates("cell_id")
    ref_names = ", ".join(cell_label(r) for _, r in ref_cells.iterrows()) or "the suite's reference"
    p = rows.iloc[0]["params"]
    looks = cell_looks(df)
    figs = [f for f in (
        curve_figure(rows, "kld_mean@pos", f"Mean KL divergence from {ref_names} by position", "KLD (nats), log scale", True, looks),
        curve_figure(rows, "top1_agreement@pos", f"Top-1 agreement with {ref_names} by position", "fraction", False, looks),
    ) if f is not None]
    table = _generation_table(rows)
    return Section(
        title="Long-sequence drift",
        intro=(f"Teacher-forced on {p.get('windows')} window(s) of {p.get('seq_len')} tokens of '{p.get('corpus')}', "
               f"buckets of {p.get('bucket')} positions, reference {ref_names}; error bars are token-level stderr "
               f"(tokens in a window are correlated: lower bounds). Free-running: greedy continuation of "
               f"{p.get('prompt_len')}-token prompts; a prompt that never diverges counts as the horizon in percentiles."),
        figures=figs,
        tables=[table] if table is not None else [],
    )
