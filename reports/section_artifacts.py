"""Report section: calibrated quantization runs. For each cell whose quantize record carries a
calibration set: the calibration (corpus, samples x tokens, seed), whether the quantized artifact
came from the cache (harness/models/artifacts.py), how long the original quantization took and how long
this run's quantize step took (a load, on a hit), next to bits per weight and the PPL ratio, so a
calibrated method is judged with what it cost."""

from __future__ import annotations

import pandas as pd

from harness.reports.common import Table, cell_label, fmt, ok_rows
from harness.reports.sections import Section


def _first(df: pd.DataFrame, cell_id: str, metric: str):
    rows = df[(df["cell_id"] == cell_id) & (df["metric"] == metric) & df["value"].notna()]
    return rows["value"].iloc[0] if len(rows) else None


def build(df: pd.DataFrame, info: dict) -> Section | None:

    quant = ok_rows(df, "quantize")
    quant = quant[quant["params"].map(lambda p: isinstance(p, dict) and isinstance(p.get("calibration"), dict))]
    if quant.empty:
        return None
    rows = []
    for _, r in quant.drop_duplicates("cell_id").iterrows():
        p, c = r["params"], r["params"]["calibration"]
        original = p.get("quantize_s")
        ratio = _first(df, r["cell_id"], "ppl_ratio")
        bits = _first(df, r["cell_id"], "bits_per_weight")
        rows.append([
            (cell_label(r), ""),
            (f"{c.get('corpus')} {c.get('n_samples')} x {c.get('seq_len')} (seed {c.get('seed')})", ""),
            (str(p.get("artifact_cache", "not cached")), ""),
            (fmt(original) if original is not None else "", repr(float(original)) if original is not None else ""),
            (fmt(r["value"]), repr(float(r["value"]))),
            (fmt(bits) if bits is not None else "", repr(float(bits)) if bits is not None else ""),
            (fmt(ratio) if ratio is not None else "", repr(float(ratio)) if ratio is not None else ""),
        ])
    table = Table(["cell", "calibration", "artifact", "original quantize (s)", "this run's quantize step (s)",
                   "bits/weight", "ppl ratio"], rows)
    return Section(
        title="Calibrated quantization: settings and cost",
        intro=("Cells whose method needs calibration data (drawn from the corpus's calibration split, "
               "disjoint from evaluation). Quantized artifacts are cached by model, method, settings, "
               "calibration tokens and library versions: on a hit the quantize step is a load, and the "
               "original wall-clock quantization time is shown next to it."),
        tables=[table],
    )
