"""Report section "What this run could detect": for each comparison with the reference (ppl ratio,
mean KLD, task recovery, flips), how many cells it told apart from the reference at alpha 0.05
(tasks: McNemar's exact test),
the median minimum detectable effect (MDE, harness.metrics.paired) at the run's sample sizes, and
how many comparisons were underpowered. It names the sensitive measurement of the run, so a reader
leans on it and reads the underpowered ones as "no evidence either way"."""

from __future__ import annotations

import math

import pandas as pd

from harness.metrics.paired import UNDERPOWERED_RECOVERY_POINTS, Z_ALPHA, underpowered_recovery
from harness.reports.common import Table
from harness.reports.sections import Section


def _told_apart(metric: str, value: float, se: float, params: dict, mcnemar_p: float | None) -> bool:
    """Different from the reference at alpha 0.05 (two-sided), by the comparison's own test; task
    recovery and flips by McNemar's exact test on the same items (the delta-method error of a
    ratio of two accuracies is too optimistic when only a few items flip)."""
    if metric.startswith(("flip_rate@", "recovery@")):
        return mcnemar_p is not None and mcnemar_p < 0.05
    if metric == "ppl_ratio":
        return se > 0 and abs(math.log(value)) / (se / value) > Z_ALPHA
    return se > 0 and value / se > Z_ALPHA  # kld_mean: a mean of non-negative terms, tested against 0


COMPARISONS = (  # (metric or prefix, label, how the MDE reads)
    ("ppl_ratio", "perplexity ratio", lambda m: f"{100 * m:.2g}% change"),
    ("kld_mean", "mean KL divergence", lambda m: f"{m:.2g} nats"),
    ("recovery@", "task recovery", lambda m: f"{m:.3g} points"),
    ("flip_rate@", "task flips (McNemar)", None),
)


def _rows(df: pd.DataFrame) -> list[tuple[str, int, int, float | None, int, int, str]]:
    ok = df[(df["status"] == "ok") & df["value"].notna() & ~df["is_reference"].astype(bool)]
    flips = ok[ok["metric"].str.startswith("flip_rate@")]
    mcnemar = {(c, m.split("@", 1)[1]): (p or {}).get("mcnemar_p") for c, m, p in zip(flips["cell_id"], flips["metric"], flips["params"])}
    out = []
    for key, label, reads in COMPARISONS:
        sel = ok[ok["metric"] == key] if not key.endswith("@") else ok[ok["metric"].str.startswith(key)]
        sel = sel.drop_duplicates(subset=["cell_id", "metric", "protocol"], keep="last")
        if sel.empty:
            continue
        told, mdes, weak = 0, [], 0
        for _, r in sel.iterrows():
            p = r["params"] if isinstance(r["params"], dict) else {}
            se = 0.0 if pd.isna(r["uncertainty"]) else float(r["uncertainty"])
            told += _told_apart(r["metric"], float(r["value"]), se, p, mcnemar.get((r["cell_id"], r["metric"].partition("@")[2])))
            mde = p.get("mde")
            if mde is not None:
                mdes.append(float(mde))
            if key == "recovery@" and underpowered_recovery(mde):
                weak += 1
        median = float(pd.Series(mdes).median()) if mdes else None
        mde_text = reads(median) if reads and median is not None else ""
        out.append((label, len(sel), int(sel["n"].median()) if sel["n"].notna().any() else 0, median, told, weak, mde_text))
    return out


def build(df: pd.DataFrame, info: dict) -> Section | None:

    rows = _rows(df) if not df.empty else []
    if not rows:
        return None
    table = Table(["comparison with the reference", "comparisons", "n (median)", "median detectable effect",
                   "told apart from the reference (alpha 0.05)", "underpowered"],
                  [[(label, ""), (str(k), str(k)), (str(n), str(n)), (text, "" if mde is None else repr(mde)),
                    (f"{told} of {k}", str(told / k)), (str(weak) if label == "task recovery" else "", str(weak))]
                   for label, k, n, mde, told, weak, text in rows])
    best = max(rows, key=lambda r: r[4] / r[1])
    notes = [f"The sensitive measurement of this run: {best[0]} (told {best[4]} of {best[1]} comparisons apart from "
             "the reference). A comparison that tells few or none apart is not evidence that the cells are equal: "
             "see its detectable effect."]
    recov = next((r for r in rows if r[0] == "task recovery"), None)
    if recov and recov[5]:
        notes.append(f"{recov[5]} of {recov[1]} task recoveries could not detect a {UNDERPOWERED_RECOVERY_POINTS:g}-point "
                     "drop at their item count: the tasks section lists them without drawing them.")
    return Section(
        title="What this run could detect",
        intro=("Each comparison with the reference at this run's sample sizes: how many cells it told apart "
               "(paired tests on the same tokens / items) and the smallest effect it would detect with 80% power "
               "at alpha 0.05 (2.80 standard errors; tasks: at least 6 flipped items for McNemar's exact test)."),
        tables=[table],
        notes=notes,
    )
