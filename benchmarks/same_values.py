"""Two runs of one suite, cell by cell: does every value agree within its stated uncertainty?
For a change that must not move results (the evaluation engine): perplexity, its ratio to the
reference, KLD (stored reference vs live), top-1 agreement, drift and task values. Cells are matched
by backend and variant (not by cell id: ids hash measurement parameters, which may differ).

    python benchmarks/same_values.py OLD_RUN NEW_RUN
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

METRICS = ("ppl", "ppl_ratio", "kld_mean", "top1_agreement", "delta_p_mean", "never_diverged_fraction",
           "acc@lambada", "acc@arc_easy", "acc@piqa", "recovery@piqa")


def load(run: str) -> dict:
    out = {}
    for line in (Path(run) / "records.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r["status"] == "ok" and r["value"] is not None and r["measurement"] != "timing":
            out[(f"{r['backend']}:{r['variant']}", r["metric"])] = (r["value"], r.get("uncertainty"))
    return out


def main(old_run: str, new_run: str) -> None:
    old, new = load(old_run), load(new_run)
    cells = sorted({c for c, _ in old} & {c for c, _ in new})
    print(f"{old_run} -> {new_run}: {len(cells)} cells in both")
    print(f"{'cell':36s} {'metric':24s} {'old':>12s} {'new':>12s} {'relative':>10s} {'|z|':>6s}")
    worst = 0.0
    for cell in cells:
        for metric in METRICS:
            if (cell, metric) not in old or (cell, metric) not in new:
                continue
            (a, ua), (b, _) = old[(cell, metric)], new[(cell, metric)]
            rel = (b - a) / abs(a) if a else float("nan")
            z = abs(b - a) / ua if ua else float("nan")
            worst = max(worst, z) if z == z else worst
            print(f"{cell:36s} {metric:24s} {a:12.6g} {b:12.6g} {rel:+10.4%} {z:6.2f}")
    print(f"largest difference in standard errors of the old value: {worst:.2f}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
