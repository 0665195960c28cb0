#!/usr/bin/env bash
# The default regression gate end to end, as a CI job uses it: llm-smoke on main, then llm-smoke
# with a worse variant swapped in (RTN int4 g64 -> int3 g64, what a broken recipe change looks
# like), then `harness check` with no gate file. Expected: the swapped run exits 1 naming the
# metrics that got worse; a run judged against itself exits 0.
#   bash benchmarks/regression_gate_example.sh OUT_DIR
set -uo pipefail
out=${1:?OUT_DIR}
mkdir -p "$out"
here=$(cd "$(dirname "$0")/.." && pwd)
sed 's/      - {bits: 4, group_size: 64}/      - {bits: 3, group_size: 64}   # the worse variant swapped in/' \
  "$here/suites/llm-smoke.yaml" > "$out/llm-smoke-worse.yaml"
grep -q "bits: 3" "$out/llm-smoke-worse.yaml" || { echo "could not swap the variant"; exit 2; }
export COLUMNS=200
harness run --suite llm-smoke --out "$out/base" > "$out/base.log" 2>&1; echo "base run: exit $?"
harness run --suite "$out/llm-smoke-worse.yaml" --out "$out/worse" > "$out/worse.log" 2>&1; echo "worse run: exit $?"
echo "--- harness check base --baseline base (no gate file)"
harness check "$out/base" --baseline "$out/base" --junit "$out/same.xml"; echo "exit $?"
echo "--- harness check worse --baseline base (no gate file)"
harness check "$out/worse" --baseline "$out/base" --junit "$out/worse.xml"; echo "exit $?"
