"""Batch-1 fp16 decode of a 7B shape through the fused Triton step (harness.perf.kernels.triton_decode:
five kernels a layer) against the roofline, on the lent GPU (issue 6: >= 85%).

Parts, each printed as it finishes (a short table last; $OUT/decode_triton.json):
  1. copy probe (the roofline's bandwidth) and a read-only bandwidth diagnostic;
  1b. with --attention-variants: the decode-attention kernel alone under several launch shapes
     (sequence splits, block, warps; with and without the combine), the fastest used below;
  2. the Triton lean step: logits checked against transformers first (the first calls tune each
     GEMV's block shape), then one CUDA graph per step, 256 replays timed with CUDA events, and a
     torch.profiler kernel table of one replay;
  3. GEMV-only graphs over the same fused matrices of one step: cuBLAS (F.linear) vs the Triton
     GEMV with the step's tuned shapes (no epilogues), the kernels seen apart from everything else;
     (--step-only skips this part); CTX=<n> sets the prompt length (128), SHAPE= the model shape;
  4. with --with-inductor: the previous best (lean decoder, torch.compile coordinate-descent) for
     comparison on the same device, with its kernel table (~90 s of compile).

Run on the device from the repo root:  PYTHONPATH=/tmp/site:$PWD python3 benchmarks/decode_triton.py"""

from __future__ import annotations

import json
import os
import sys
import time

import torch
import torch.nn.functional as F

from harness import hardware
from harness.perf import decode as dec
from harness.perf.kernels import triton_decode as td
from harness.perf.kernels.lean_decode import LeanDecoder, check_against, lean_graph_decode
from harness.perf.probes import run_probes
from harness.perf.roofline import ModelDims, phase_roofline
from harness.perf.shape_models import load_shape, resolve_shape

OUT = os.environ.get("OUT", "/tmp/out")
SHAPE = os.environ.get("SHAPE", "shape:llama-2-7b")
NEW, CTX = 256, int(os.environ.get("CTX", "128"))
rows, result = [], {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                    "git_sha": os.environ.get("QHARNESS_GIT_SHA", "unknown"), "shape": SHAPE}
T0 = time.time()


def log(*a):
    print(f"[{time.time() - T0:5.0f}s]", *a, flush=True)


def med(xs):
    return sorted(xs)[len(xs) // 2]


def kernel_table(graph, label):
    """The profiler's kernel table of a few replays, kept in the JSON and printed."""
    lines = dec.kernel_table(graph, label)
    result.setdefault("kernel_tables", {})[label] = lines
    for line in lines:
        log(line)


def timed_graph(fn, replays=64):
    """Capture fn once (after warm-up on a side stream); median seconds of `replays` replays."""
    g = dec.capture(fn)
    for _ in range(3):
        g.replay()
    return med(dec.replay_seconds(g, replays)), g


# 1) ceilings
profile, name = hardware.detect("cuda")
prof = hardware.profiles().get(profile)
bw = run_probes("cuda", names=["copy"])["memory_bandwidth"].value


def read_bandwidth() -> float:
    big = torch.randn(1 << 31, device="cuda", dtype=torch.float16)  # 4 GiB
    seconds, _ = timed_graph(lambda: big.sum(), replays=10)
    return big.numel() * 2 / seconds


read_bw = read_bandwidth()
result.update(copy_bandwidth=bw, read_bandwidth=read_bw)
log(f"{name} -> {profile}: copy {bw / 1e12:.3f} TB/s = {bw / prof.memory_bandwidth_bytes_s:.1%} of datasheet; "
    f"read-only (sum of 4 GiB) {read_bw / 1e12:.3f} TB/s")

source = resolve_shape(SHAPE)
with torch.device("cuda"):
    model, _ = load_shape(source, torch.float16)
dims = ModelDims.from_config(model.config)
log(f"built {source.name}")


def place(label, seconds, extra=None):
    roof = phase_roofline(dims, "decode", 1, CTX + NEW // 2, prof.peak_flops["fp16"], bw)  # b=1: bandwidth-bound
    point = roof.placed(seconds, bw)
    rows.append({"label": label, "seconds": seconds, **point, "bytes": roof.bytes, **(extra or {})})
    log(f"{label:52s} {point['tokens_s']:7.1f} tok/s  {point['roofline_fraction']:6.1%} of roofline "
        f"{point['roofline_tokens_s']:.1f} ({seconds * 1e3:.3f} ms/step, {roof.bytes / 1e9:.2f} GB)")


attention_launch = {}  # the step's attention launch shape: sized by AttentionScratch unless 1b picks one


def triton_lean(max_seq: int) -> LeanDecoder:
    """A lean decoder on the fused Triton step, with the attention launch shape chosen in 1b if any."""
    lv = LeanDecoder(model, 1, max_seq, kernels="triton")
    if attention_launch:
        lv.scratch = td.AttentionScratch(lv.n_heads, lv.n_kv, lv.head_dim, "cuda", **attention_launch)
    return lv


# 1b) decode attention launch shapes: 32 layers' worth of launches at mid-context, as one graph
if "--attention-variants" in sys.argv:
    probe = LeanDecoder(model, 1, dec.static_cache_len(CTX, NEW), kernels="triton")
    for lay in probe.layers:
        lay.k_cache.normal_()
        lay.v_cache.normal_()
    qkvs = [torch.randn(lay.wqkv.shape[0], device="cuda", dtype=torch.float16) for lay in probe.layers]
    at_pos = torch.tensor([CTX + NEW // 2], device="cuda")
    best = None
    for splits, block_s, warps, combine in [(8, 64, 4, True), (8, 64, 4, False), (8, 64, 1, True), (8, 64, 2, True),
                                            (8, 64, 8, True), (8, 32, 4, True), (8, 16, 4, True), (4, 64, 4, True),
                                            (16, 32, 4, True), (32, 16, 4, True), (32, 16, 4, False), (32, 16, 1, True),
                                            (64, 8, 1, True), (2, 128, 4, True), (1, 128, 8, True)]:
        scr = td.AttentionScratch(probe.n_heads, probe.n_kv, probe.head_dim, "cuda", splits, block_s, warps)
        try:
            sec, _ = timed_graph(lambda: [td.decode_attention(q, lay.k_cache, lay.v_cache, probe.cos, probe.sin, at_pos,
                                                              probe.n_heads, probe.n_kv, scr, combine=combine)
                                          for q, lay in zip(qkvs, probe.layers)])
        except Exception as exc:  # noqa: BLE001 - a launch shape the compiler refuses
            log(f"attention splits={splits} block_s={block_s} warps={warps}: {type(exc).__name__}: {str(exc)[:120]}")
            continue
        result.setdefault("attention_variants", []).append(
            {"splits": splits, "block_s": block_s, "num_warps": warps, "combine": combine, "us_per_layer": sec / 32 * 1e6})
        log(f"attention splits={splits:2d} block_s={block_s:3d} warps={warps} combine={combine!s:5s}: "
            f"{sec / 32 * 1e6:6.2f} us a layer at position {CTX + NEW // 2}")
        if combine and (best is None or sec < best[0]):
            best = (sec, splits, block_s, warps)
    attention_launch = dict(splits=best[1], block_s=best[2], num_warps=best[3])
    log(f"decode attention launch for the step: {attention_launch}")
    del probe, qkvs

# 2) the Triton lean step
t = time.time()
lean = triton_lean(dec.static_cache_len(CTX, NEW))  # tunes each GEMV kind
log(f"tuned {len(td.TUNED)} GEMV kinds x {len(td.CANDIDATES)} candidates over all layers ({time.time() - t:.0f}s)")
ids = dec.random_prompt(model.config.vocab_size, 1, CTX, "cuda")
check = check_against(model, lean, ids[:, :16], steps=8)
result["triton_check"] = check
log(f"triton lean vs transformers (fp16, 16-token prompt + 8 greedy steps): {check}")
if check["argmax_agreement"] < 0.75 or check["max_rel_logit_diff"] > 0.05:
    log("the Triton step disagrees with transformers: its timings are NOT reported")
    sys.exit(1)
for pdl in ("1", "0"):  # programmatic dependent launch on (Hopper) and off
    os.environ["QHARNESS_TRITON_PDL"] = pdl
    lean = triton_lean(dec.static_cache_len(CTX, NEW))  # fresh caches
    t = time.time()
    try:
        timing, _ = lean_graph_decode(model, ids, NEW, compile=False, lean=lean,
                                      after_replays=lambda g, p=pdl: kernel_table(g, f"triton lean step, PDL {p}"))
    except Exception as exc:  # noqa: BLE001 - report and go on to the other variant
        log(f"triton lean step, PDL {pdl}: FAILED {type(exc).__name__}: {str(exc)[:300]}")
        continue
    place(f"lean triton kernels, one CUDA graph, PDL {'on' if pdl == '1' else 'off'} ({time.time() - t:.0f}s)",
          med(timing.tpot_s), {"samples_s": timing.tpot_s, "note": timing.note, "pdl": pdl == "1"})
os.environ["QHARNESS_TRITON_PDL"] = "1"


def graph_tokens(pdl: str, steps: int = 64) -> torch.Tensor:
    """The greedy tokens the captured Triton step produces, replay by replay (PDL on or off)."""
    os.environ["QHARNESS_TRITON_PDL"] = pdl
    lv = triton_lean(dec.static_cache_len(CTX, steps))
    first = lv(ids, torch.arange(CTX, device="cuda")).argmax(-1, keepdim=True)
    pos, cur = torch.tensor([CTX], device="cuda"), first.clone()

    def step():
        cur.copy_(lv(cur, pos).argmax(-1, keepdim=True))
        pos.add_(1)

    g = dec.capture(step, warmup=1)
    pos.fill_(CTX)
    cur.copy_(first)
    out = [first.clone()]
    for _ in range(steps):
        g.replay()
        out.append(cur.clone())
    os.environ["QHARNESS_TRITON_PDL"] = "1"
    return torch.cat(out, 1)[0]


# 2b) replays under PDL compute what they compute without it, and what the torch lean step computes
on, off = graph_tokens("1"), graph_tokens("0")
ref = LeanDecoder(model, 1, dec.static_cache_len(CTX, 64))  # torch kernels, eager, teacher-forced on `on`
logits = ref(ids, torch.arange(CTX, device="cuda"))
agree = []
for i in range(len(on) - 1):
    agree.append(int(logits.argmax(-1).item() == on[i].item()))
    logits = ref(on[i].view(1, 1), torch.tensor([CTX + i], device="cuda"))
del ref
result["replay_check"] = {"tokens": len(on), "pdl_on_equals_off": bool(torch.equal(on, off)),
                          "torch_lean_argmax_agreement": sum(agree) / len(agree)}
log(f"graph replays, {len(on)} greedy tokens: PDL on == PDL off: {torch.equal(on, off)}; the torch lean step "
    f"(eager, fed the same tokens) picks the same next token {sum(agree)}/{len(agree)} times")
result["tuned"] = {str(k): v for k, v in td.TUNED.items()}
for k, v in td.TUNED.items():
    log(f"GEMV n={k[0]} k={k[1]} norm={k[2]} bias={k[3]} res={k[4]} gated={k[5]}: BLOCK_N={v[0]} BLOCK_K={v[1]} "
        f"warps={v[2]} stages={v[3]} ({v[4] * 1e6:.1f} us a launch in a graph of all layers)")

# 3) GEMV-only: the same fused matrices, cuBLAS vs tuned Triton
if "--step-only" in sys.argv:
    mats = []
else:
    mats = [w for lay in lean.layers for w in (lay.wqkv, lay.wo.weight, lay.w13, lay.w2.weight)] + [lean.lm_head.weight]
    xs = {k: torch.randn(k, device="cuda", dtype=torch.float16) for k in {m.shape[1] for m in mats}}
    nbytes = sum(m.numel() * 2 for m in mats)
    for key, v in list(td.TUNED.items()):  # epilogue-free GEMVs take the config tuned for the step's fused one
        td.TUNED[(key[0] * (2 if key[5] else 1), key[1], False, False, False, False, key[6])] = v
    for label, fn in (("cuBLAS", lambda: [F.linear(xs[m.shape[1]][None], m) for m in mats]),
                      ("Triton", lambda: [td.gemv(m, xs[m.shape[1]]) for m in mats])):
        s, g = timed_graph(fn)
        result[f"gemv_only_{label}"] = {"seconds": s, "bytes": nbytes, "bytes_s": nbytes / s}
        log(f"GEMV-only graph, {label:6s} ({len(mats)} matrices, {nbytes / 1e9:.2f} GB): {s * 1e3:.3f} ms = "
            f"{nbytes / s / 1e12:.3f} TB/s = {nbytes / s / bw:.1%} of copy")
        kernel_table(g, f"GEMV-only {label}")
        del g

# 4) the previous best on the same device, for comparison
if "--with-inductor" in sys.argv:
    del lean
    lean = LeanDecoder(model, 1, dec.static_cache_len(CTX, NEW))
    t = time.time()
    timing, _ = lean_graph_decode(model, ids, NEW, compile=True, inductor={"coordinate_descent_tuning": True}, lean=lean,
                                  after_replays=lambda g: kernel_table(g, "lean inductor coord-descent"))
    place(f"lean torch.compile coord-descent ({time.time() - t:.0f}s)", med(timing.tpot_s), {"samples_s": timing.tpot_s})

result["rows"] = rows
os.makedirs(OUT, exist_ok=True)
with open(f"{OUT}/decode_triton.json", "w") as f:
    json.dump(result, f, indent=1, default=str)
log(f"== {SHAPE} fp16, b=1, ctx {CTX} + {NEW} new; copy {bw / 1e12:.3f} TB/s ==")
for r in rows:
    log(f"{r['label'][:52]:52s} {r['tokens_s']:7.1f} tok/s  {r['roofline_fraction']:6.1%} of roofline {r['roofline_tokens_s']:.1f}")
