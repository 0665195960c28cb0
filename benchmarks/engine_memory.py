"""Per cell of a run: weight bytes, the GPU allocator's peak, the reference store it read (or
wrote), the cell's phases and the KLD it measured: does a comparing cell hold only its own model
(+ a batch's activations), not a second, reference model?

    python benchmarks/engine_memory.py RUN_DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

from harness.results.run_dir import RunDir


def main(run: str) -> None:
    rd = RunDir(run)
    records = rd.current_records()
    cells = {}
    for r in records:
        c = cells.setdefault(r.cell_id, {"cell": f"{r.backend}:{r.variant}", "ref": r.is_reference})
        if r.measurement == "cell":
            c["peak"] = r.provenance.get("cuda_peak_allocated_bytes")
            c["status"], c["ref_model_loaded"] = r.status, r.provenance.get("reference_model_loaded")
        elif r.metric == "weight_bytes":
            c["weights"] = r.value
        elif r.measurement == "timing":
            c[r.metric] = r.value
            c["store"] = r.params.get("reference_store_bytes")
        elif r.metric in ("kld_mean", "ppl"):
            c[r.metric] = r.value
        elif r.measurement == "perplexity" and r.metric == "tokens_per_s":
            c["tok_s"] = r.value
    ref_store = sum(c.get("store") or 0 for c in cells.values() if c["ref"])
    print(f"reference store on disk: {ref_store / 1e9:.2f} GB ({rd.path})")
    print(f"{'cell':26s} {'weights GB':>10s} {'peak GB':>8s} {'peak - weights':>14s} {'ref model':>9s} {'load s':>7s} "
          f"{'measure s':>9s} {'ppl tok/s':>10s} {'kld_mean':>9s}")
    for c in cells.values():
        w, p = c.get("weights"), c.get("peak")
        print(f"{c['cell'] + (' (ref)' if c['ref'] else ''):26s} {w / 1e9 if w else float('nan'):10.2f} "
              f"{p / 1e9 if p else float('nan'):8.2f} {(p - w) / 1e9 if (p and w) else float('nan'):14.2f} "
              f"{str(c.get('ref_model_loaded')):>9s} {c.get('load_s', float('nan')):7.1f} {c.get('measure_s', float('nan')):9.1f} "
              f"{c.get('tok_s', float('nan')):10,.0f} {c.get('kld_mean', float('nan')):9.4f}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else str(Path.cwd()))
