#!/usr/bin/env bash
# On the lent GPU (device tool): install the wheels carried in .gpuE/ (qharness + the pure-Python
# deps the GPU image lacks + backend wheels), then from /tmp (the checkout's harness/ folder would
# shadow the installed package) run either
#   script: benchmarks/perf_gpu.py (probes, prefill, framework vs graph decode of the 7B shape)
#   suite:  harness run benchmarks/perf-h100.yaml (every GPU backend's decode point + report)
# Build the wheel here first:  pip wheel --no-deps --no-build-isolation -w .gpuE .
set -euo pipefail
what=${1:-script}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpuE/*.whl
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 QHARNESS_CACHE=/tmp/qh
repo=$PWD
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total,power.limit,clocks.max.sm --format=csv
cd /tmp
case "$what" in
  script) python3 "$repo/benchmarks/perf_gpu.py" 2>&1 | tee "$OUT/perf_gpu.log" ;;
  suite)
    python3 -m harness.cli env --device cuda 2>&1 | head -3 || true
    timeout "${SUITE_TIMEOUT:-400}" python3 -m harness.cli run --suite "$repo/benchmarks/perf-h100.yaml" --device cuda \
      --out "$OUT/run" 2>&1 | tee "$OUT/log.txt" || echo "harness exit $?"
    rm -f "$OUT"/run/cells/*/*.npy
    tar czf "$OUT/cell-logs.tgz" -C "$OUT/run" cells && rm -rf "$OUT/run/cells"
    python3 - "$OUT/run/records.jsonl" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    if r["metric"].startswith(("decode_tokens_s@", "prefill_tokens_s@")) or r["status"] != "ok":
        p = r.get("params") or {}
        print(f"{r['backend']}:{r['variant']:12s} {r['metric']:34s} {r['value'] if r['value'] is None else round(r['value'], 1)!s:>9} "
              f"roofline {p.get('roofline_tokens_s', 0):8.1f} frac {p.get('roofline_fraction', 0):6.1%} "
              f"bw-util {p.get('bandwidth_utilisation', 0):6.1%} {r.get('error') or p.get('error') or ''}")
PY
    ;;
esac
