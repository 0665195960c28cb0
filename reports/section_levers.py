"""Report section: levers beyond plain PTQ, each next to what it is weighed against, with drift
curves of both (from the drift measurement's `kld_mean@pos` records):

- QAT vs PTQ: each `qat` cell with steps > 0 against the `qat` cell of the same scheme, bits and
  group with steps 0; recovery = (ppl_ptq - ppl_qat) / (ppl_ptq - ppl_ref) on the perplexity
  records, and on held-out calibration loss (`training` measurement); its cost in steps and
  seconds; the loss of every training step.
- Mixed vs uniform: `mixed` cells and the uniform cells of their base backend, bits per weight
  against mean KLD (the divergence measurement's, else drift's buckets pooled) / perplexity.
- Quantized vs float KV cache: `kv-cache` cells, cache bytes at the longest measured context
  against the float-cache cell of the same weights."""

from __future__ import annotations

import json
import math

import pandas as pd
import plotly.graph_objects as go

from harness.reports.section_drift import curve_figure
from harness.reports.common import Table
from harness.reports.sections import Section

QUALITY = (("perplexity", "ppl"), ("divergence", "kld_mean"))


def _ok(df: pd.DataFrame) -> pd.DataFrame:
    return df[(df["status"] == "ok") & df["value"].notna()]


def _value(rows: pd.DataFrame, cell_id: str, metric: str) -> float | None:
    sel = rows[(rows["cell_id"] == cell_id) & (rows["metric"] == metric)]
    return None if sel.empty else float(sel.iloc[-1]["value"])


def _kld(rows: pd.DataFrame, cell_id: str) -> float | None:
    """Mean KLD from the reference: the divergence measurement's, else the drift measurement's
    position buckets pooled (token-weighted)."""
    v = _value(rows, cell_id, "kld_mean")
    if v is not None:
        return v
    b = rows[(rows["cell_id"] == cell_id) & (rows["metric"] == "kld_mean@pos")]
    return None if b.empty or b["n"].sum() == 0 else float((b["value"] * b["n"]).sum() / b["n"].sum())


def _cells(rows: pd.DataFrame, backend: str | None = None) -> pd.DataFrame:
    cells = rows.drop_duplicates("cell_id")
    return cells if backend is None else cells[cells["backend"] == backend]


def _label(row) -> str:
    return f"{row['backend']}:{row['variant']}"


def _text(v: float | None, fmt: str = "{:.4g}") -> tuple[str, str]:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "", ""
    return fmt.format(v), repr(float(v))


def _drift(rows: pd.DataFrame, cell_ids: list[str], title: str) -> go.Figure | None:
    sel = rows[rows["cell_id"].isin(cell_ids) & (rows["measurement"] == "drift")]
    return None if sel.empty else curve_figure(sel, "kld_mean@pos", title, "KLD (nats), log scale", True)


def _reference_ppl(rows: pd.DataFrame) -> float | None:
    ref = rows[rows["is_reference"] & (rows["metric"] == "ppl")]
    return None if ref.empty else float(ref.iloc[-1]["value"])


def _qat(rows: pd.DataFrame):

    cells = _cells(rows, "qat")
    if cells.empty:
        return None, [], []
    key = lambda p: json.dumps({k: v for k, v in p.items() if k in ("scheme", "bits", "group_size")}, sort_keys=True)
    ptq = {key(r["variant_params"]): r for _, r in cells.iterrows() if r["variant_params"].get("steps") == 0}
    ref_ppl = _reference_ppl(rows)
    out, ids, figs = [], [], []
    loss_fig = go.Figure()
    for _, r in cells.iterrows():
        if r["variant_params"].get("steps", 0) == 0:
            continue
        base = ptq.get(key(r["variant_params"]))
        ppl_q = _value(rows, r["cell_id"], "ppl")
        ppl_p = _value(rows, base["cell_id"], "ppl") if base is not None else None
        rec = None
        if None not in (ppl_q, ppl_p, ref_ppl) and abs(ppl_p - ref_ppl) > 0:
            rec = (ppl_p - ppl_q) / (ppl_p - ref_ppl)
        out.append([(_label(r), ""), (_label(base) if base is not None else "(no steps: 0 cell)", ""),
                    _text(ref_ppl), _text(ppl_p), _text(ppl_q), _text(rec, "{:.0%}"),
                    _text(_value(rows, r["cell_id"], "holdout_recovery"), "{:.0%}"),
                    _text(_value(rows, r["cell_id"], "train_steps"), "{:.0f}"),
                    _text(_value(rows, r["cell_id"], "train_seconds"), "{:.0f}"),
                    _text(_value(rows, r["cell_id"], "bits_per_weight"), "{:.2f}")])
        ids += [r["cell_id"]] + ([base["cell_id"]] if base is not None else [])
        losses = rows[(rows["cell_id"] == r["cell_id"]) & (rows["metric"] == "train_loss")]
        if not losses.empty:
            loss_fig.add_trace(go.Scatter(x=losses["params"].map(lambda p: p["step"]), y=losses["value"],
                                          mode="lines+markers", name=_label(r)))
    if not out:
        return None, [], []
    loss_fig.update_layout(title="QAT: training loss per step (calibration windows, fake-quantized model)",
                           xaxis_title="step", yaxis_title="loss (nats/token)", height=380,
                           margin=dict(l=60, r=20, t=50, b=50))
    figs = [f for f in (loss_fig if loss_fig.data else None,
                        _drift(rows, ids, "QAT vs PTQ: mean KLD by position")) if f is not None]
    table = Table(["QAT cell", "PTQ cell", "ppl ref", "ppl PTQ", "ppl QAT", "recovery (ppl)", "recovery (held-out loss)",
                   "steps", "train s", "bits/weight"], out)
    return table, figs, ids


def _mixed(rows: pd.DataFrame):

    mixed = _cells(rows, "mixed")
    if mixed.empty:
        return None, []
    bases = sorted({r["variant_params"].get("base") for _, r in mixed.iterrows()})
    uniform = _cells(rows)[_cells(rows)["backend"].isin(bases)]
    fig = go.Figure()
    out = []
    for group, kind in ((uniform, "uniform"), (mixed, "mixed")):
        pts = []
        for _, r in group.iterrows():
            bpw, kld, ppl = _value(rows, r["cell_id"], "bits_per_weight"), _kld(rows, r["cell_id"]), _value(rows, r["cell_id"], "ppl")
            base = r["backend"] if kind == "uniform" else r["variant_params"].get("base")
            out.append([(kind, ""), (str(base), ""), (_label(r), ""), _text(bpw, "{:.3f}"), _text(ppl), _text(kld)])
            if bpw is not None and (kld is not None or ppl is not None):
                pts.append((bpw, kld if kld is not None else ppl, _label(r)))
        if pts:
            pts.sort()
            fig.add_trace(go.Scatter(x=[p[0] for p in pts], y=[p[1] for p in pts], text=[p[2] for p in pts],
                                     mode="markers" if kind == "mixed" else "lines+markers", name=kind,
                                     marker=dict(size=11 if kind == "mixed" else 8, symbol="star" if kind == "mixed" else "circle"),
                                     hovertemplate="%{text}<br>%{x:.3f} bits/weight: %{y:.4g}<extra></extra>"))
    fig.update_layout(title="Mixed precision vs uniform bits (mean KLD from the reference; ppl where no KLD)",
                      xaxis_title="bits per weight (linear layers, storage counted)", yaxis_title="mean KLD (nats)",
                      yaxis_type="log", height=420, margin=dict(l=60, r=20, t=50, b=50))
    ids = list(mixed["cell_id"]) + list(uniform["cell_id"])
    figs = [f for f in (fig if fig.data else None, _drift(rows, ids, "Mixed vs uniform: mean KLD by position")) if f]
    return Table(["kind", "base", "cell", "bits/weight", "ppl", "mean KLD"], out), figs


def _kv(rows: pd.DataFrame):

    cells = _cells(rows, "kv-cache")
    if cells.empty:
        return None, []
    vp = lambda r: r["variant_params"]
    control = {json.dumps([vp(r).get("base"), vp(r).get("base_params")], sort_keys=True): r["cell_id"]
               for _, r in cells.iterrows()
               if vp(r).get("kv") == "none" or (vp(r).get("kv") == "llamacpp" and vp(r).get("type_k") == "f16"
                                                and vp(r).get("type_v") == "f16")}
    out = []
    for _, r in cells.iterrows():
        ctrl = control.get(json.dumps([vp(r).get("base"), vp(r).get("base_params")], sort_keys=True))
        kvb = _value(rows, r["cell_id"], "kv_cache_bytes")
        ctrl_b = _value(rows, ctrl, "kv_cache_bytes") if ctrl else None
        ctx_rows = rows[(rows["cell_id"] == r["cell_id"]) & (rows["metric"] == "kv_cache_bytes")]
        context = ctx_rows.iloc[-1]["params"].get("context") if not ctx_rows.empty else None
        out.append([(_label(r), ""), (str(context or ""), str(context or "")), _text(kvb, "{:,.0f}"),
                    _text(kvb / ctrl_b if kvb and ctrl_b else None, "{:.3f}"),
                    _text(_value(rows, r["cell_id"], "ppl")), _text(_kld(rows, r["cell_id"]))])
    figs = [f for f in (_drift(rows, list(cells["cell_id"]), "KV cache: mean KLD by position (quantized vs float cache)"),) if f]
    return Table(["cell", "context (tokens)", "KV-cache bytes", "x float-cache cell", "ppl", "mean KLD"], out), figs


def build(df: pd.DataFrame, info: dict) -> Section | None:
    rows = _ok(df)
    if rows.empty or not rows["backend"].isin(["qat", "mixed", "kv-cache"]).any():
        return None
    tables, figures, notes = [], [], []
    qat_table, qat_figs, _ = _qat(rows)
    mixed_table, mixed_figs = _mixed(rows)
    kv_table, kv_figs = _kv(rows)
    for table, figs in ((qat_table, qat_figs), (mixed_table, mixed_figs), (kv_table, kv_figs)):
        if table is not None:
            tables.append(table)
        figures += figs
    if not tables and not figures:  # e.g. only the PTQ half of a QAT pair has run
        return None
    if _cells(rows, "kv-cache").shape[0]:
        notes.append("transformers KV cells compute teacher-forced logits through the cache in chunks (kv: none is the "
                     "same protocol with a float cache); llama.cpp cells always read logits through their KV cache.")
    return Section(
        title="Levers: QAT vs PTQ, mixed vs uniform bits, quantized vs float KV cache",
        intro=("Each lever beside what it is weighed against. QAT recovery = (ppl_PTQ - ppl_QAT) / (ppl_PTQ - ppl_ref), "
               "PTQ being the same torchao scheme without training; mixed-precision cells beside the uniform cells of "
               "their base backend (bits per weight from storage); KV-cache bytes measured after prefilling the "
               "longest context, relative to the float-cache cell of the same weights. Drift curves: mean KLD from "
               "the reference by token position."),
        figures=figures, tables=tables, notes=notes,
    )
