"""Report section: calibration distribution mismatch. For calibrated cells (the quantize record
says which corpus calibrated them), perplexity on every evaluated corpus next to the reference's,
and for the same backend variant calibrated on different corpora the gap: ppl when calibrated
on another domain divided by ppl when calibrated on the evaluated one."""

from __future__ import annotations

import json

import pandas as pd

from harness.reports.common import Table, cell_label, fmt, ok_rows
from harness.reports.sections import Section


def _calibrations(df: pd.DataFrame) -> dict[str, str]:
    q = ok_rows(df, "quantize")
    return {r["cell_id"]: r["params"]["calibration"]["corpus"] for _, r in q.iterrows()
            if isinstance(r["params"].get("calibration"), dict)}


def build(df: pd.DataFrame, info: dict) -> Section | None:

    cal = _calibrations(df)
    ppl = ok_rows(df, "perplexity")
    ppl = ppl[ppl["metric"] == "ppl"]
    if not cal or ppl.empty:
        return None
    ppl = ppl.assign(corpus=ppl["params"].map(lambda p: p.get("corpus")))
    corpora = sorted(ppl["corpus"].dropna().unique())
    if len(corpora) < 2:
        return None
    value = {(r["cell_id"], r["corpus"]): r for _, r in ppl.iterrows()}
    refs = {r["model"]: r["cell_id"] for _, r in ppl[ppl["is_reference"]].iterrows()}
    rows = []
    cells = ppl[ppl["cell_id"].isin(cal)].drop_duplicates("cell_id")
    for _, c in cells.iterrows():
        row = [(cell_label(c), ""), (cal[c["cell_id"]], "")]
        for corpus in corpora:
            r, ref = value.get((c["cell_id"], corpus)), value.get((refs.get(c["model"]), corpus))
            if r is None:
                row.append(("", ""))
                continue
            ratio = f" ({r['value'] / ref['value']:.3f}x ref)" if ref is not None else ""
            row.append((f"{fmt(r['value'])} ± {fmt(r['uncertainty'])}{ratio}", repr(float(r["value"]))))
        rows.append(row)
    tables = [Table(["cell", "calibrated on"] + [f"ppl on {c}" for c in corpora], rows)]

    gaps = []  # same backend + variant, different calibration corpus
    key = cells.apply(lambda r: (r["model"], r["backend"], json.dumps(r["variant_params"], sort_keys=True)), axis=1)
    for _, group in cells.groupby(key):
        by_cal = {cal[cid]: cid for cid in group["cell_id"]}
        for corpus in corpora:
            if corpus not in by_cal:
                continue
            matched = value.get((by_cal[corpus], corpus))
            for other, cid in by_cal.items():
                mismatched = value.get((cid, corpus))
                if other == corpus or matched is None or mismatched is None:
                    continue
                gap = mismatched["value"] / matched["value"]
                params = ", ".join(f"{k}={v}" for k, v in sorted(group.iloc[0]["variant_params"].items()))
                gaps.append([(f"{group.iloc[0]['backend']} ({params})", ""),
                             (corpus, ""), (f"{fmt(matched['value'])} (calibrated on {corpus})", ""),
                             (f"{fmt(mismatched['value'])} (calibrated on {other})", ""),
                             (f"{gap:.3f}x", repr(gap))])
    if gaps:
        tables.append(Table(["variant", "evaluated on", "ppl, matched calibration", "ppl, mismatched calibration",
                             "mismatch gap"], gaps))
    return Section(
        title="Calibration distribution mismatch",
        intro=("Calibrated cells evaluated on several corpora. The gap divides perplexity when calibrated on another "
               "domain by perplexity when calibrated on the evaluated one (above 1: the mismatch costs quality). "
               "Calibration windows come from each corpus's calibration split, never from evaluated text."),
        tables=tables,
    )
