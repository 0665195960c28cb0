"""Are two runs' records identical, timings aside? For a change that must not change any result
(issue #19's re-layout): every record that is not `bookkeeping` (wall times, tokens/s, phases) must
match in cell id, value, uncertainty, n, unit, protocol, meaning, status and params (less the keys
that hold seconds). Prints each difference and a summary; exit 1 on any difference.

    python benchmarks/records_identical.py RUN_BEFORE RUN_AFTER
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

FIELDS = ("cell_id", "value", "uncertainty", "n", "unit", "protocol", "direction", "kind", "status", "error")


def _timeless(params: dict) -> dict:
    return {k: v for k, v in (params or {}).items() if not (k.endswith("_s") or "second" in k or k == "samples_s")}


def load(run: Path) -> dict[tuple, dict]:
    """The run's current records (harness.load_run: the latest attempt of each planned cell),
    timings aside."""
    import harness

    out = {}
    for r in harness.load_run(run).to_dict("records"):
        if r.get("kind") == "bookkeeping" or r.get("measurement") == "cell":
            continue
        key = (r["backend"], r["variant"], r["measurement"], r["metric"], json.dumps(_timeless(r.get("params")), sort_keys=True))
        out[key] = {f: r.get(f) for f in FIELDS}
    return out


def same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True  # pandas gives NaN where a record holds None
    return a == b


def main() -> int:
    before, after = (load(Path(p)) for p in sys.argv[1:3])
    diffs = 0
    for key in sorted(set(before) | set(after)):
        a, b = before.get(key), after.get(key)
        if a is None or b is None:
            diffs += 1
            print(f"only in {'after' if a is None else 'before'}: {key[:4]}")
            continue
        for f in FIELDS:
            if not same(a[f], b[f]):
                diffs += 1
                print(f"{':'.join(key[:2])} {key[2]}/{key[3]} {f}: {a[f]!r} -> {b[f]!r}")
    print(f"{len(before)} records before, {len(after)} after (timings aside); {diffs} difference(s)")
    return 1 if diffs else 0


if __name__ == "__main__":
    sys.exit(main())
