"""Report section: the roofline, one figure per hardware profile.

Roofs are the measured ceilings of the run ("ceilings" records: copy bandwidth, GEMM per dtype),
with the profile's datasheet values dashed beside them. Points are the "speed" records: each
prefill and decode grid point at its arithmetic intensity (from the model config, harness.perf.
roofline) and achieved FLOP/s. The table gives tokens/s against the roofline's tokens/s,
bandwidth utilisation (bytes that had to move / time / measured bandwidth) and, where a cell ran
both decode modes, the framework-vs-graph gap (Python and launch overhead apart from kernels), and
the lean mode (harness.perf.kernels.lean_decode, compiled) where it ran: the kernels with the framework's
step bookkeeping taken away too, and the triton mode (the lean step as five fused Triton kernels a
layer, harness.perf.kernels.triton_decode): how close a float model's decode gets to the bandwidth roof."""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go

from harness.reports.common import Table, cell_label, cell_looks, esc, fmt, fmt_unc, ok_rows
from harness.reports.sections import Section

POINT_PREFIXES = ("decode_tokens_s@", "prefill_tokens_s@")
FAST_MODES = ("graph", "lean", "triton")  # decode modes set beside plain generate in the gap table


def _points(df: pd.DataFrame) -> pd.DataFrame:
    speed = ok_rows(df, "speed")
    return speed[speed["metric"].str.startswith(POINT_PREFIXES)]


def _figure(profile: str, ceil: pd.DataFrame, pts: pd.DataFrame, looks: dict | None = None) -> go.Figure:
    xs = [p["intensity"] for p in pts["params"]] or [1.0]
    lo, hi = min(xs + [0.1]) / 3, max(xs + [1e4]) * 3
    fig = go.Figure()
    bw_rows = ceil[ceil["metric"] == "memory_bandwidth"]
    if not bw_rows.empty:
        bw = float(bw_rows.iloc[0]["value"])
        sheet_bw = bw_rows.iloc[0]["params"].get("datasheet")
        for _, row in ceil[ceil["metric"].str.startswith("gemm_")].iterrows():
            peak, label = float(row["value"]), row["metric"][5:]
            knee = peak / bw
            fig.add_trace(go.Scatter(x=[lo, knee, hi], y=[lo * bw, peak, peak], mode="lines", name=f"measured {label}",
                                     hovertemplate=f"{label}: %{{y:.3g}} {row['unit']}<extra></extra>"))
            sheet = row["params"].get("datasheet")
            if sheet and sheet_bw:
                fig.add_trace(go.Scatter(x=[lo, sheet / sheet_bw, hi], y=[lo * sheet_bw, sheet, sheet], mode="lines",
                                         line={"dash": "dot", "width": 1}, name=f"datasheet {label}", visible="legendonly"))
    looks = cell_looks(pts) if looks is None else looks
    for (cell, phase), group in pts.groupby([pts.apply(cell_label, axis=1), pts["metric"].str.split("@").str[0]]):
        params = list(group["params"])
        look = looks.get(group.iloc[0]["cell_id"])
        fig.add_trace(go.Scatter(
            x=[p["intensity"] for p in params], y=[p["achieved_flops"] for p in params], mode="markers",
            marker={"symbol": "circle" if phase.startswith("decode") else "diamond", "size": 9,
                    "color": look.color if look else None},
            name=esc(f"{cell} {phase.split('_')[0]}"),
            text=[esc(f"{m.split('@')[1]}: {v:.4g} tok/s, {p['roofline_fraction']:.0%} of roofline "
                       f"({p['roofline_tokens_s']:.4g}), bw util {p['bandwidth_utilisation']:.0%}")
                  for m, v, p in zip(group["metric"], group["value"], params)],
            hovertemplate="%{text}<extra></extra>"))
    fig.update_layout(title=esc(f"Roofline: {profile}"), xaxis={"type": "log", "title": "arithmetic intensity (ops/byte)"},
                      yaxis={"type": "log", "title": "ops/s"}, height=460, margin={"t": 50})
    return fig


def build(df: pd.DataFrame, info: dict) -> Section | None:

    pts = _points(df)
    if pts.empty:
        return None
    ceilings = ok_rows(df, "ceilings")
    figures, rows, gaps = [], [], []
    for profile, group in pts.groupby("hardware_profile"):
        ceil = ceilings[ceilings["hardware_profile"] == profile].drop_duplicates("metric")
        figures.append(_figure(str(profile), ceil, group, cell_looks(df)))
    energy = ok_rows(df, "speed")
    energy = {(r["cell_id"], r["metric"].split("@")[1]): r["value"] for _, r in energy.iterrows()
              if r["metric"].startswith("energy_j_per_token@")}
    for _, r in pts.iterrows():
        p, tag = r["params"], r["metric"].split("@")[1]
        rows.append([(cell_label(r), ""), (str(r["hardware_profile"]), ""), (p["phase"], ""), (p.get("mode", "-"), ""),
                     (str(p["batch"]), repr(float(p["batch"]))), (str(p.get("context", p.get("prompt_length"))), ""),
                     (fmt_unc(r["value"], r["uncertainty"]), repr(float(r["value"]))),
                     (fmt(p["roofline_tokens_s"]), repr(float(p["roofline_tokens_s"]))),
                     (f"{p['roofline_fraction']:.1%}", repr(float(p["roofline_fraction"]))),
                     (f"{p['bandwidth_utilisation']:.1%}", repr(float(p["bandwidth_utilisation"]))),
                     (fmt(p["intensity"]), repr(float(p["intensity"]))),
                     (fmt(energy.get((r["cell_id"], tag))), "")])
    decode = pts[pts["metric"].str.startswith("decode_tokens_s@")]
    by_key = {(r["cell_id"], r["params"]["mode"], r["params"]["batch"], r["params"]["context"]): r for _, r in decode.iterrows()}
    for (cid, mode, batch, context), r in by_key.items():
        fast = {m: by_key.get((cid, m, batch, context)) for m in FAST_MODES}
        if mode == "framework" and any(x is not None for x in fast.values()):
            cols = []
            for m in FAST_MODES:
                x = fast[m]
                cols += [(fmt(x["value"]), repr(float(x["value"]))) if x is not None else ("-", ""),
                         (f"{x['value'] / r['value']:.2f}x", repr(x["value"] / r["value"])) if x is not None else ("-", "")]
            gaps.append([(cell_label(r), ""), (str(batch), ""), (str(context), ""), (fmt(r["value"]), repr(float(r["value"]))),
                         *cols])
    tables = [Table(["cell", "hardware", "phase", "mode", "batch", "context", "tokens/s (± IQR/2)", "roofline tokens/s",
                     "of roofline", "bandwidth utilisation", "ops/byte", "J/token"], rows)]
    notes = []
    if gaps:
        tables.append(Table(["cell", "batch", "context", "framework tokens/s",
                             *[h for m in FAST_MODES for h in (f"{m} tokens/s", f"{m} / framework")]], gaps))
    else:
        notes.append("No cell ran both decode modes here (graph-captured decode needs a CUDA device): no framework-vs-graph gap.")
    for _, r in ok_rows(df, "speed")[lambda d: d["metric"] == "decode_tokens_s"].drop_duplicates("hardware_profile").iterrows():
        layers = r["params"].get("layers") or []
        if layers:  # one per-layer table per hardware profile, from its first cell
            tables.append(Table(
                [f"layer ({cell_label(r)}, {r['hardware_profile']}, decode b{r['params']['batch']})", "per forward",
                 "decode ops/byte", "prefill ops/byte", "decode bytes", "share of decode floor", "decode bound by"],
                [[(x["layer"], ""), (str(x["count"]), ""), (fmt(x["decode_intensity"]), repr(float(x["decode_intensity"]))),
                  (fmt(x["prefill_intensity"]), repr(float(x["prefill_intensity"]))),
                  (fmt(x["decode_bytes"]), repr(float(x["decode_bytes"]))),
                  (f"{x['decode_floor_share']:.1%}", repr(float(x["decode_floor_share"]))), (x["decode_bound"], "")]
                 for x in layers]))
    if ceilings.empty:
        notes.append("No 'ceilings' records: the roofs are missing (add the ceilings measurement to the suite).")
    return Section(
        title="Roofline",
        intro=("Each speed point at its arithmetic intensity (ops per byte that had to move, from the model config and "
               "the measured bits per weight) against the run's measured ceilings (solid; datasheet dotted, in the legend). "
               "Utilisation = bytes that had to move / median time / measured copy bandwidth."),
        figures=figures, tables=tables, notes=notes)
