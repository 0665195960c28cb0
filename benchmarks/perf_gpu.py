"""Calibration probes + decode/prefill speed of a random-init Llama-2-7B-shaped fp16 model on the
lent GPU, placed on the roofline with the measured ceilings. Run by benchmarks/perf_gpu.sh with
the qharness wheel installed (harness.perf does the work; this script only orders and prints).
Writes $OUT/perf_gpu.json and prints a table last."""

from __future__ import annotations

import json
import os
import sys
import time

import torch

from harness import hardware
from harness.perf import decode as dec
from harness.perf.probes import run_probes
from harness.perf.roofline import ModelDims, phase_roofline
from harness.perf.shape_models import load_shape, resolve_shape
from harness.perf.telemetry import EnergyMeter, MemoryTracker
from harness.perf.timing import repeat

OUT = os.environ.get("OUT", "/tmp/out")
QUICK = "--quick" in sys.argv
rows, result = [], {"device": torch.cuda.get_device_name(), "torch": torch.__version__}


def log(*a):
    print(*a, flush=True)


profile, name = hardware.detect("cuda")
prof = hardware.profiles().get(profile)
result["profile"] = profile
log(f"device {name} -> profile {profile}")

t = time.time()
ceilings = run_probes("cuda")
result["ceilings"] = {k: c.to_dict() for k, c in ceilings.items()}
bw = ceilings["memory_bandwidth"].value
for k, c in ceilings.items():
    sheet = (prof.memory_bandwidth_bytes_s if k == "memory_bandwidth" else prof.peak_flops.get(k[5:])) if prof else None
    frac = f"{c.value / sheet:.0%} of datasheet {sheet:.3g}" if (c.value and sheet) else c.note
    log(f"probe {k}: {c.value and c.value / 1e12:.3f} T{c.unit} +- {c.spread and c.spread / 1e12:.2f} ({frac})")
log(f"probes took {time.time() - t:.0f} s")
peak16 = ceilings["gemm_fp16"].value

source = resolve_shape("shape:llama-2-7b")
t = time.time()
with torch.device("cuda"):
    model, _ = load_shape(source, torch.float16)
log(f"built random-init {source.name} fp16 on GPU in {time.time() - t:.0f} s")
dims = ModelDims.from_config(model.config)
weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
result["weight_bytes"] = weight_bytes
vocab = model.config.vocab_size


def place(phase, batch, context, seconds, label, extra=None):
    roof = phase_roofline(dims, phase, batch, context, peak16, bw)
    point = roof.placed(seconds, bw)
    row = {"label": label, "phase": phase, "batch": batch, "context": context, "seconds": seconds, **point,
           "bytes": roof.bytes, "ops": roof.ops, **(extra or {})}
    rows.append(row)
    log(f"{label:44s} {point['tokens_s']:10.1f} tok/s  roofline {point['roofline_tokens_s']:9.1f}"
        f"  {point['roofline_fraction']:6.1%}  bw-util {point['bandwidth_utilisation']:6.1%}")
    return row


# prefill
for plen in ([512] if QUICK else [128, 512, 2048]):
    ids = dec.random_prompt(vocab, 1, plen, "cuda")
    s = repeat(lambda: dec.prefill(model, ids), "cuda", warmup=2, repeats=10)
    place("prefill", 1, plen, s.median, f"prefill p={plen} b=1", {"samples_s": s.seconds})

# framework decode (plain generate)
for batch in [1] if QUICK else [1, 8]:
    ids = dec.random_prompt(vocab, batch, 128, "cuda")
    dec.framework_decode(model, ids, 8)  # warm-up
    runs = [dec.framework_decode(model, ids, 64) for _ in range(3)]
    tpot = sorted(x for r in runs for x in r.tpot_s)
    med = tpot[len(tpot) // 2]
    place("decode", batch, 128 + 32, med, f"framework generate b={batch} ctx=128",
          {"ttft_s": [r.ttft_s for r in runs], "tpot_p90": tpot[int(0.9 * len(tpot))], "tpot_p99": tpot[int(0.99 * len(tpot))],
           "samples_s": tpot})

# graph-captured decode
FREEZE = {"freezing": True, "coordinate_descent_tuning": True}
modes = [("graph-eager", False, None, [1, 16]), ("graph-compiled", True, None, [1]),
         ("graph-compiled-frozen", True, FREEZE, [1, 16])]
for label, comp, inductor, batches in modes:
    for batch in batches:
        ids = dec.random_prompt(vocab, batch, 128, "cuda")
        t = time.time()
        meter = EnergyMeter("cuda")
        try:
            with MemoryTracker("cuda") as mem:
                timing = dec.graph_decode(model, ids, 256, compile=comp, inductor=inductor, around_replays=meter)
            energy = meter.result
        except Exception as exc:  # noqa: BLE001 - report and go on with the next mode
            log(f"{label} b={batch} FAILED: {type(exc).__name__}: {str(exc)[:300]}")
            continue
        tp = sorted(timing.tpot_s)
        med = tp[len(tp) // 2]
        place("decode", batch, 128 + 128, med, f"{label} b={batch} ctx=128 ({time.time() - t:.0f}s)",
              {"tpot_p90": tp[int(0.9 * len(tp))], "tpot_p99": tp[int(0.99 * len(tp))], "ttft_s": timing.ttft_s,
               "kv_cache_bytes": timing.kv_cache_bytes, "peak_allocated_bytes": mem.peak_allocated_bytes,
               "process_bytes": mem.process_bytes, "energy_j": energy.joules, "energy_note": energy.note,
               "j_per_token": energy.joules / (256 * batch) if energy.joules else None, "samples_s": timing.tpot_s})

result["rows"] = rows
os.makedirs(OUT, exist_ok=True)
with open(f"{OUT}/perf_gpu.json", "w") as f:
    json.dump(result, f, indent=1, default=str)
log("\n== summary (weights %.2f GB, measured bw %.2f TB/s, fp16 GEMM %.0f TFLOP/s) ==" % (weight_bytes / 1e9, bw / 1e12, peak16 / 1e12))
for r in rows:
    log(f"{r['label'][:44]:44s} {r['tokens_s']:10.1f} tok/s  {r['roofline_fraction']:6.1%} of roofline {r['roofline_tokens_s']:8.1f}"
        f"  bw-util {r['bandwidth_utilisation']:6.1%}" + (f"  {r['j_per_token']:.3f} J/tok" if r.get("j_per_token") else ""))
