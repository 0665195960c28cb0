"""Ray on one machine with several GPUs (written for the lent nvidia-h200-x2; NOT RUN YET: that kind
was withheld when this was written — see docs/RAY.md).

1. Parallel cells: N one-GPU cells of equal work (the same random-init Llama reached through N
   paths, so N cells; fp16; perplexity over W windows) run serially by the local executor (one
   GPU) and at once by the Ray executor (one cell per GPU). Expect Ray's wall time close to
   serial / n_gpus, plus Ray's start and per-cell process start.
2. One cell over all GPUs: a larger random-init Llama with `gpus: <n_gpus>`: the worker quantizes
   on the CPU and accelerate spreads the model over the GPUs Ray gave the cell; its provenance
   records the GPU count and the device map. A perf measurement is added when one is registered.

Random weights and a text file of this repository as the corpus: timing only, no quality claim
(every cell still reports perplexity, so the serial and Ray records can be compared).
Usage (on the GPU machine, qharness + ray importable): python3 ray_two_gpus.py OUT_DIR
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import yaml

GiB = 1024**3
RAY_INIT = {"include_dashboard": False}  # wall times below include starting Ray (a few seconds)


def random_llama(dest: Path, hidden: int, layers: int, seed: int) -> Path:
    """A random-init Llama folder with the harness's byte tokenizer (no download needed)."""
    if (dest / "config.json").exists():
        return dest
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from harness.models.zoo import _byte_tokenizer

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=256, hidden_size=hidden, intermediate_size=int(hidden * 2.6875) // 64 * 64,
                         num_hidden_layers=layers, num_attention_heads=hidden // 128, num_key_value_heads=hidden // 512,
                         max_position_embeddings=4096, tie_word_embeddings=False)
    with torch.device("cuda"):  # random init on the GPU: minutes faster than on the CPU
        model = LlamaForCausalLM(config).to(torch.float16)
    model.save_pretrained(dest)
    _byte_tokenizer().save_pretrained(dest)
    return dest


def corpus(dest: Path, repo: Path) -> str:
    """A text corpus from this repository's own files (documents separated by blank lines)."""
    if not dest.exists():
        docs = [p.read_text(errors="replace") for p in sorted(repo.rglob("*.py")) + sorted(repo.rglob("*.md"))
                if ".venv" not in p.parts]
        dest.write_text("\n\n".join(d.strip().replace("\n\n", "\n") for d in docs if d.strip()))
    return f"file:{dest}"


def perf_measurements() -> list[dict]:
    """A registered perf measurement (harness/perf), if this checkout has one, with its defaults."""
    from harness.metrics import MEASUREMENTS

    return [{"name": n} for n in MEASUREMENTS.names() if n in ("decode", "perf", "latency", "throughput")][:1]


def suite_file(path: Path, name: str, models: list[str], gpus: int, windows: int, text: str, extra: list[dict]) -> Path:
    suite = {
        "name": name, "models": models, "device": "cuda", "timeout_s": 1200,
        "backends": [{"name": "fp", "gpus": gpus, "variants": [{"dtype": "float16"}]}],
        "measurements": [{"name": "perplexity", "corpus": text, "seq_len": 2048, "max_windows": windows,
                          "batch_size": 4}, *extra],
    }
    path.write_text(yaml.safe_dump(suite, sort_keys=False))
    return path


def timed_run(suite_path: Path, out: Path, executor) -> tuple[float, list[dict]]:
    from harness.run.runner import run_suite
    from harness.results.run_dir import RunDir
    from harness.run.suite import load_suite

    t0 = time.perf_counter()
    result = run_suite(load_suite(str(suite_path)), out=out, executor=executor)
    wall = time.perf_counter() - t0
    cells = [r.model_dump(include={"model", "status", "error", "value", "provenance"})
             for r in RunDir(out).current_records() if r.measurement == "cell"]
    print(f"{out.name}: {wall:.1f} s wall, {result.failed} failed", flush=True)
    return wall, cells


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--cells", type=int, default=0, help="one-GPU cells (default: 2 per GPU)")
    ap.add_argument("--windows", type=int, default=256, help="perplexity windows of 2048 tokens per cell")
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--big-hidden", type=int, default=4096)
    ap.add_argument("--big-layers", type=int, default=32)
    args = ap.parse_args()

    import torch

    from harness.run.executor import LocalExecutor
    from harness.run.ray_executor import RayExecutor

    n_gpus = torch.cuda.device_count()
    if n_gpus < 2:
        print(f"needs 2 or more GPUs, found {n_gpus}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(os.environ.get("QHARNESS_CACHE", "/tmp/qh")) / "ray-bench"
    work.mkdir(parents=True, exist_ok=True)
    text = corpus(work / "corpus.txt", Path(__file__).resolve().parent.parent)
    base = random_llama(work / "llama-small", args.hidden, args.layers, seed=0)
    n_cells = args.cells or 2 * n_gpus
    paths = []
    for i in range(n_cells):  # N names for one model: N cells of exactly equal work
        link = work / f"small-{i}"
        if not link.exists():
            link.symlink_to(base, target_is_directory=True)
        paths.append(str(link))
    summary: dict = {"gpus": n_gpus, "gpu_name": torch.cuda.get_device_name(0), "cells": n_cells,
                     "windows": args.windows, "small_model": {"hidden": args.hidden, "layers": args.layers}}

    parallel = suite_file(work / "parallel.yaml", "ray-parallel", paths, 1, args.windows, text, [])
    serial_s, serial_cells = timed_run(parallel, args.out / "serial", LocalExecutor())
    # memory_per_cell: this machine's MemTotal grows as it is used (KINDS.md), so Ray's view of it at
    # start (~31 GiB) would make the estimate refuse the big cell; 256 GiB are there
    ray_s, ray_cells = timed_run(parallel, args.out / "ray", RayExecutor(memory_per_cell=GiB, init_kwargs=RAY_INIT))
    summary["serial_wall_s"], summary["ray_wall_s"] = serial_s, ray_s
    summary["speedup"] = serial_s / ray_s
    summary["ideal_speedup"] = min(n_gpus, n_cells)
    summary["serial_cell_s"] = [c["value"] for c in serial_cells]
    summary["ray_cell_s"] = [c["value"] for c in ray_cells]
    summary["ray_gpu_ids"] = [c["provenance"].get("executor", {}).get("gpu_ids") for c in ray_cells]
    summary["all_ok"] = all(c["status"] == "ok" for c in serial_cells + ray_cells)

    big = random_llama(work / "llama-big", args.big_hidden, args.big_layers, seed=1)
    spread = suite_file(work / "spread.yaml", "ray-spread", [str(big)], n_gpus, max(4, args.windows // 4), text,
                        perf_measurements())
    spread_s, spread_cells = timed_run(spread, args.out / "spread", RayExecutor(memory_per_cell=GiB, init_kwargs=RAY_INIT))
    cell = spread_cells[0]
    summary["spread"] = {"wall_s": spread_s, "status": cell["status"], "error": cell["error"],
                         "gpus": cell["provenance"].get("gpus"), "placement": cell["provenance"].get("placement"),
                         "executor": cell["provenance"].get("executor"),
                         "big_model": {"hidden": args.big_hidden, "layers": args.big_layers}}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    print(json.dumps(summary, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
