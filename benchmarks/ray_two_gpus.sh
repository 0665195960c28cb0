#!/usr/bin/env bash
# Ray on the lent 2-GPU machine (device tool, kind nvidia-h200-x2; any machine of 2+ GPUs works).
# NOT RUN YET: multi-GPU kinds were withheld when this was written (docs/RAY.md).
#
# The machine has torch, transformers, accelerate, msgpack, protobuf, click, ... but no ray and no
# network, and one call carries at most 64 MiB, so the ray wheel (~79 MB) travels in two parts:
#   here:      bash benchmarks/ray_two_gpus.sh prepare      # wheels -> .gpuF/ (ignored locally)
#   device 1:  bash benchmarks/ray_two_gpus.sh part1        # carry: .gpuF/ray.part.aa
#   device 2:  bash benchmarks/ray_two_gpus.sh run          # carry: .gpuF/ray.part.ab .gpuF/wheels
# Step 'run' installs everything under /tmp/site, then runs benchmarks/ray_two_gpus.py (parallel
# one-GPU cells, serial vs Ray; one cell over all GPUs) and leaves summary.json, log.txt and the
# three runs' records under $OUT (copy them to benchmarks/results/ray-two-gpus-h200/).
set -euo pipefail
step=${1:-}
case "$step" in
  prepare)
    grep -qx '/.gpuF/' .git/info/exclude 2>/dev/null || echo '/.gpuF/' >> .git/info/exclude
    rm -rf .gpuF && mkdir -p .gpuF/wheels
    ver=$(python -c 'import ray; print(ray.__version__)' 2>/dev/null || echo 2.60.0)
    # the device's python3 is 3.12; ray's own dependencies that its image lacks: jsonschema & co
    python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
      -d .gpuF/dl "ray==$ver" jsonschema jsonschema-specifications referencing rpds-py
    mv .gpuF/dl/ray-*.whl .gpuF/ && mv .gpuF/dl/*.whl .gpuF/wheels/ && rmdir .gpuF/dl
    (cd .gpuF && sha256sum ray-*.whl > ray.sha256 && split -b 40m ray-*.whl ray.part. && ls ray-*.whl > ray.name && rm ray-*.whl)
    mv .gpuF/ray.sha256 .gpuF/ray.name .gpuF/wheels/
    python -m pip wheel -q --no-deps --no-build-isolation -w .gpuF/wheels .
    ls -la .gpuF .gpuF/wheels ;;
  part1)
    cp .gpuF/ray.part.aa /tmp/ && ls -la /tmp/ray.part.aa ;;
  run)
    name=$(cat .gpuF/wheels/ray.name)
    cat /tmp/ray.part.aa .gpuF/ray.part.ab > "/tmp/$name"
    (cd /tmp && sha256sum -c "$OLDPWD/.gpuF/wheels/ray.sha256")
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      "/tmp/$name" .gpuF/wheels/*.whl
    export PYTHONPATH=/tmp/site QHARNESS_CACHE=/tmp/qh PYTHONUNBUFFERED=1 RAY_AUTH_MODE=disabled
    nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv
    repo=$PWD
    mkdir -p "$OUT"
    cd /tmp  # not the checkout: its harness/ folder would shadow the installed package
    timeout 560 python3 "$repo/benchmarks/ray_two_gpus.py" "$OUT/runs" "${@:2}" 2>&1 | tee "$OUT/log.txt" || echo "exit $?"
    # at most 8 files come back, two folders down: the summary and each run's records + run.json
    cp "$OUT/runs/summary.json" "$OUT/" 2>/dev/null || true
    for r in serial ray spread; do
      [ -d "$OUT/runs/$r" ] && mkdir -p "$OUT/$r" && cp "$OUT/runs/$r/records.jsonl" "$OUT/runs/$r/run.json" "$OUT/$r/" 2>/dev/null || true
    done
    rm -rf "$OUT/runs" ;;
  *)
    echo "usage: bash benchmarks/ray_two_gpus.sh prepare|part1|run [ray_two_gpus.py options]" >&2; exit 2 ;;
esac
