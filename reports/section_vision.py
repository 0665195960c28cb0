"""Report section: vision models (the `classification`, `vision-speed` and `model-size` measurements).

Static INT8 (eager PTQ, pt2e), QAT, dynamic INT8 and the edge runtimes side by side on the
held-out test images: accuracy (binomial stderr), top-1 agreement with the float reference, the
paired accuracy change with its flips, latency p50 / p90 at batch 1 and at the largest measured
batch, and size (tensor bytes and the stored file). What each cell is (scheme, runtime) is read
from what its adapter recorded in the cell's provenance, not guessed from its name."""

from __future__ import annotations

import math
import re
from typing import Any

import pandas as pd
import plotly.graph_objects as go

from harness.reports.common import REFERENCE_MARKER, Table, axis_type, cell_label, cell_looks, esc, missing, ok_rows, sort_key
from harness.reports.sections import Section

KB = 1e3


def _value(rows: pd.DataFrame, cid: str, metric: str, column: str = "value") -> float | None:
    sel = rows[(rows["cell_id"] == cid) & (rows["metric"] == metric)]
    if sel.empty or missing(sel.iloc[-1][column]):
        return None
    return float(sel.iloc[-1][column])


def _cell(text: str, key: float | None = None) -> tuple[str, str]:
    return text, sort_key(key) if key is not None else ""


def _num(v: float | None, fmt: str, unc: float | None = None, scale: float = 1.0) -> tuple[str, str]:
    if v is None or math.isnan(v):
        return "", ""
    text = fmt.format(v * scale)
    if unc is not None and not math.isnan(unc):
        text += " ± " + fmt.replace("+", "").format(unc * scale)
    return text, sort_key(v)


def _backend_info(df: pd.DataFrame, cid: str) -> dict[str, Any]:
    for prov in df.loc[df["cell_id"] == cid, "provenance"]:
        if isinstance(prov, dict) and isinstance(prov.get("backend_info"), dict):
            return prov["backend_info"]
    return {}


def _batches(rows: pd.DataFrame) -> list[int]:
    found = {int(m.group(1)) for m in (re.match(r"latency_p50_b(\d+)$", x) for x in rows["metric"].unique()) if m}
    return sorted(found)


def _points(df: pd.DataFrame, rows: pd.DataFrame, big: int | None) -> list[dict[str, Any]]:
    out = []
    for _, cell in rows.drop_duplicates("cell_id").iterrows():
        cid = cell["cell_id"]
        if not ((rows["cell_id"] == cid) & (rows["measurement"] == "classification")).any():
            continue
        info = _backend_info(df, cid)
        out.append({
            "cid": cid, "label": cell_label(cell), "reference": bool(cell.get("is_reference", False)),
            "scheme": str(info.get("scheme", "")), "runtime": str(info.get("runtime", "")),
            "acc": _value(rows, cid, "accuracy"), "acc_se": _value(rows, cid, "accuracy", "uncertainty"),
            "agree": _value(rows, cid, "agreement"), "agree_se": _value(rows, cid, "agreement", "uncertainty"),
            "delta": _value(rows, cid, "accuracy_delta"), "delta_se": _value(rows, cid, "accuracy_delta", "uncertainty"),
            "flip": _value(rows, cid, "flip_rate"),
            "p50_1": _value(rows, cid, "latency_p50_b1"), "p90_1": _value(rows, cid, "latency_p90_b1"),
            "p50_big": _value(rows, cid, f"latency_p50_b{big}") if big else None,
            "p90_big": _value(rows, cid, f"latency_p90_b{big}") if big else None,
            "rate_big": _value(rows, cid, f"throughput_b{big}") if big else None,
            "weights": _value(rows, cid, "weight_bytes"), "file": _value(rows, cid, "file_bytes"),
            "bpw": _value(rows, cid, "bits_per_weight"),
        })
    return out


def _scatter(points: list[dict[str, Any]], looks: dict, x: str, x_title: str, title: str, scale: float = 1.0) -> go.Figure:
    """Accuracy (± stderr) against one x per cell; each cell drawn as in the report's other figures
    (colour by backend, symbol by variant, the reference a star), named in the legend and on hover."""
    fig = go.Figure()
    shown = [p for p in points if p[x] is not None and p["acc"] is not None]
    for p in shown:
        look = looks.get(p["cid"])
        marker = dict(REFERENCE_MARKER) if p["reference"] else dict(size=11, color=look.color if look else None,
                                                                     symbol=look.symbol if look else "circle")
        fig.add_trace(go.Scatter(
            x=[p[x] * scale], y=[p["acc"] * 100], mode="markers", name=esc(p["label"]), marker=marker,
            error_y=dict(type="data", array=[(p["acc_se"] or 0.0) * 100], visible=True, thickness=1),
            hovertext=[esc(f"{p['label']}<br>{p['scheme']} | {p['runtime']}")], hoverinfo="text+x+y"))
    fig.update_layout(title=title, xaxis_title=x_title, yaxis_title="held-out accuracy % (± binomial stderr)",
                      xaxis_type=axis_type([p[x] * scale for p in shown]), height=460, legend_title_text="cell")
    return fig


def build(df: pd.DataFrame, info: dict) -> Section | None:
    rows = ok_rows(df)
    if not (rows["measurement"] == "classification").any():
        return None
    rows = rows.drop_duplicates(["cell_id", "measurement", "metric"], keep="last")
    batches = _batches(rows)
    big = max((b for b in batches if b > 1), default=None)
    points = _points(df, rows, big)
    table = []
    for p in points:
        delta = _num(p["delta"], "{:+.2f}", p["delta_se"], 100) if not p["reference"] else ("(reference)", "")
        table.append([
            _cell(p["label"]), _cell(p["scheme"]), _cell(p["runtime"]),
            _num(p["acc"], "{:.2f}", p["acc_se"], 100), _num(p["agree"], "{:.2f}", p["agree_se"], 100), delta,
            _num(p["flip"], "{:.2f}", None, 100),
            _num(p["p50_1"], "{:.3f}", None, 1e3), _num(p["p90_1"], "{:.3f}", None, 1e3),
            _num(p["p50_big"], "{:.3f}", None, 1e3), _num(p["p90_big"], "{:.3f}", None, 1e3),
            _num(p["rate_big"], "{:.0f}"),
            _num(p["weights"], "{:.1f}", None, 1 / KB), _num(p["file"], "{:.1f}", None, 1 / KB), _num(p["bpw"], "{:.2f}"),
        ])
    headers = ["cell", "scheme", "runtime", "accuracy % ± se", "agreement % ± se", "Δ accuracy pts ± se (paired)",
               "flips %", "p50 b1 (ms)", "p90 b1 (ms)", f"p50 b{big} (ms)" if big else "p50 (ms)",
               f"p90 b{big} (ms)" if big else "p90 (ms)", f"images/s b{big}" if big else "images/s",
               "tensors KB", "file KB", "bits/weight"]
    looks = cell_looks(df)
    figures = [_scatter(points, looks, "p50_1", "latency at batch 1, median (ms)", "Accuracy vs latency (batch 1)", 1e3),
               _scatter(points, looks, "file", "stored file (KB = 10^3 bytes)", "Accuracy vs stored size", 1 / KB)]
    n = next((int(r["n"]) for _, r in rows[rows["metric"] == "accuracy"].iterrows() if not missing(r["n"])), None)
    notes = [f"{cell_label(r)}: {r['status']}: {r['error']}" for _, r in df[(df["measurement"] == "cell")
             & (df["status"] != "ok")].drop_duplicates("cell_id", keep="last").iterrows()]
    if big is None:
        notes.append("no batch larger than 1 was timed")
    return Section(
        title="Vision model: static vs dynamic vs QAT INT8 and edge runtimes",
        intro=(f"Top-1 accuracy on the model's held-out test split ({n} images, never trained or calibrated on), "
               "agreement with the float reference's predictions and the paired accuracy change on the same images "
               "(flips: images whose correctness changed). Latency: median and 90th percentile over repeats after "
               "warm-up, on this CPU; size: tensor bytes counted from what each runtime stores, and the stored file "
               "(torch.save / .onnx / .pt2 / .pte / .tflite)."),
        figures=figures, tables=[Table(headers, table)], notes=notes,
    )
