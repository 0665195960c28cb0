"""Does packing several documents into one row make rolling-window scoring faster on a GPU?

Issue #16 asks for >= 3x lm-eval's HF backend; on BoolQ's short passages (~128 tokens) the plain
forward+NLL loop over length-sorted, right-padded rows reached only 2.46x (engine-h200/). This
probe times, on the same rows (lm-eval's rolling windows at seq_len 2048) and the same random-init
7B shape in fp16, one forward + lm_head + logsumexp per batch of <= budget tokens (each layout at each budget given):

- padded: rows sorted by length, right-padded, no mask (causal attention never reads the padding):
  what the harness and the plain loop do today;
- packed-sdpa: documents packed first-fit-decreasing into rows of <= seq_len tokens, position ids
  restarting at each document, no attention mask: transformers (>= 5) then builds the
  block-diagonal causal mask itself (masking_utils.find_packed_sequence_indices); SDPA runs it
  with a dense mask;
- packed-flex: the same rows with `attn_implementation="flex_attention"`, whose block mask skips
  the blocks outside each document;
- concat: every token of the corpus in one stream cut into seq_len rows (a different protocol: the
  documents see each other), the speed of full rows, for orientation only.

The NLL sums of padded and packed rows must agree (fp16: 1e-3 relative on perplexity).
Usage: here `python benchmarks/packing_probe.py make-rows --out rows.pt` (needs the harness and the
embedded tokenizer); on the device `python benchmarks/packing_probe.py time --rows rows.pt`."""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

SHAPES = Path(__file__).resolve().parents[1] / "harness" / "perf" / "shapes"


def make_rows(out: Path, corpus: str, seq_len: int) -> None:
    from transformers import AutoTokenizer

    from harness.models.corpora import load_texts
    from harness.metrics.perplexity import rolling_windows
    from harness.models.zoo import resolve_model

    tok = AutoTokenizer.from_pretrained(resolve_model("builtin:smollm2-135m").path)
    prefix = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    docs = load_texts(corpus, "eval")
    rows = []
    for d in docs:
        ids = tok(d, add_special_tokens=False)["input_ids"]
        for c, t in rolling_windows(ids, prefix, seq_len):
            x = (c + t)[-(seq_len + 1):][:-1]
            rows.append((torch.tensor(x, dtype=torch.int32), torch.tensor(t, dtype=torch.int32)))
    torch.save({"rows": rows, "vocab": len(tok), "seq_len": seq_len, "corpus": corpus, "documents": len(docs)}, out)
    print(f"{len(docs)} documents, {len(rows)} windows, {sum(len(t) for _, t in rows)} scored tokens -> {out}")


def batches_padded(rows, budget, max_padding: float = 1.0):
    """Length-sorted rows, right-padded; a batch closes at the budget or, with max_padding < 1,
    before its padding would pass that fraction (the harness's rule, MAX_PADDING = 0.10)."""
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    start = 0
    while start < len(order):
        width = len(rows[order[start]][0])
        end, real = start + 1, width
        while end < len(order) and (end - start + 1) * width <= budget and \
                (end - start + 1) * width - (real + len(rows[order[end]][0])) <= max_padding * (end - start + 1) * width:
            real += len(rows[order[end]][0])
            end += 1
        batch = order[start:end]
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        tgt = torch.full((len(batch), width), -100, dtype=torch.long)
        for b, i in enumerate(batch):
            x, t = rows[i]
            ids[b, : len(x)] = x
            tgt[b, len(x) - len(t): len(x)] = t
        yield ids, tgt, None
        start += len(batch)


def pack(rows, seq_len):
    """First-fit decreasing: lists of row indices whose lengths sum to <= seq_len."""
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(rows)), key=lambda i: -len(rows[i][0])):
        n = len(rows[i][0])
        for k, r in enumerate(room):
            if r >= n:
                bins[k].append(i)
                room[k] -= n
                break
        else:
            bins.append([i])
            room.append(seq_len - n)
    return bins


def batches_packed(rows, budget, seq_len):
    bins = pack(rows, seq_len)
    bins.sort(key=lambda b: -sum(len(rows[i][0]) for i in b))
    per = max(1, budget // seq_len)
    for s in range(0, len(bins), per):
        group = bins[s: s + per]
        width = max(sum(len(rows[i][0]) for i in b) for b in group)
        ids = torch.zeros(len(group), width, dtype=torch.long)
        tgt = torch.full((len(group), width), -100, dtype=torch.long)
        pos = torch.zeros(len(group), width, dtype=torch.long)
        for r, b in enumerate(group):
            at = 0
            for i in b:
                x, t = rows[i]
                ids[r, at: at + len(x)] = x
                tgt[r, at + len(x) - len(t): at + len(x)] = t
                pos[r, at: at + len(x)] = torch.arange(len(x))
                at += len(x)
            pos[r, at:] = torch.arange(width - at)  # padding: its own "document", never scored
        yield ids, tgt, pos


def batches_concat(rows, budget, seq_len):
    stream = torch.cat([x for x, _ in rows]).long()
    n = stream.numel() // seq_len
    full = stream[: n * seq_len].view(n, seq_len)
    per = max(1, budget // seq_len)
    for s in range(0, n, per):
        ids = full[s: s + per]
        tgt = torch.roll(ids, -1, 1)
        tgt[:, -1] = -100
        yield ids, tgt, None


def score(model, batches, device, trace: list | None = None):
    """trace: when a list, each batch's (rows, width, seconds) is appended (a sync per batch)."""
    total = torch.zeros((), dtype=torch.float64, device=device)
    scored = forward = 0
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    with torch.inference_mode():
        for ids, tgt, pos in batches:
            ids, tgt = ids.to(device, non_blocking=True), tgt.to(device, non_blocking=True)
            kw = {"position_ids": pos.to(device)} if pos is not None else {}
            hidden = model.model(input_ids=ids, use_cache=False, **kw).last_hidden_state
            sel = (tgt.reshape(-1) >= 0).nonzero().squeeze(-1)
            flat, targets = hidden.reshape(-1, hidden.shape[-1]), tgt.reshape(-1)
            for lo in range(0, sel.numel(), 4096):
                s = sel[lo: lo + 4096]
                logits = model.lm_head(flat.index_select(0, s)).float()
                total += (torch.logsumexp(logits, -1) - logits.gather(-1, targets[s][:, None]).squeeze(-1)).sum(dtype=torch.float64)
            scored += sel.numel()
            forward += ids.numel()
            if trace is not None:
                sync()
                trace.append((ids.shape[0], ids.shape[1], time.perf_counter() - t0 - sum(t[2] for t in trace)))
    sync()
    return float(total), scored, forward, time.perf_counter() - t0


def time_all(rows_file: Path, shape: str, repeats: int, which: list[str], reload: bool = False,
             cold: bool = False, trace: bool = False, profile: bool = False, fused_norm: bool = False) -> None:
    """`which`: entries "layout@budget", e.g. "padded@65536"."""
    from transformers import AutoConfig, AutoModelForCausalLM

    data = torch.load(rows_file)
    rows, seq_len = data["rows"], data["seq_len"]
    spec = {k: v for k, v in json.loads((SHAPES / f"{shape}.json").read_text()).items() if not k.startswith("_")}
    spec.pop("torch_dtype", None)
    spec.update(vocab_size=data["vocab"], dtype="float16")
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**spec), dtype=torch.float16).eval()
    print(f"# {torch.cuda.get_device_name()} torch {torch.__version__} | {shape} fp16 | {data['documents']} documents "
          f"{len(rows)} windows seq_len {seq_len} | median of {repeats}", flush=True)
    makers = {
        "padded": lambda budget: batches_padded(rows, budget),
        "padded-cap10": lambda budget: batches_padded(rows, budget, 0.10),
        "packed-sdpa": lambda budget: batches_packed(rows, budget, seq_len),
        "packed-flex": lambda budget: batches_packed(rows, budget, seq_len),
        "concat": lambda budget: batches_concat(rows, budget, seq_len),
    }
    state = {"base": None, "cold": cold, "trace": trace, "rows": rows, "fused_norm": fused_norm}
    for entry in which:
        time_entry(model, entry, makers, repeats, state)
    if profile:
        layout, budget = which[0].split("@")
        fuse_rms_norm(layout.endswith("+fn") or fused_norm)
        layout = layout.removesuffix("+fn")
        profile_pass(model, makers[layout if layout in makers else "padded-cap10"](int(budget)))
    if reload:  # the same weights saved and loaded back as a user's folder is loaded (from_pretrained)
        folder = Path("/tmp/packing-probe-model")
        model.save_pretrained(folder)
        del model
        torch.cuda.empty_cache()
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float16).to("cuda").eval()
        print(f"reloaded with from_pretrained: attn {model.config._attn_implementation}", flush=True)
        for entry in which:
            time_entry(model, entry, makers, repeats, state, " reloaded")


def score_harness(model, rows, budget: int) -> tuple[float, int, int, float]:
    """The harness's own engine (harness.metrics.scoring.Scorer) on the same rows, batched by its
    rule at the budget: what a cell's perplexity pass does, minus the cell around it."""
    from harness.adapters.base import QuantizedModel
    from harness.metrics.scoring import Row, Scorer

    scorer = Scorer(QuantizedModel(module=model, device=torch.device("cuda")))
    todo = [Row.of(x.long(), t.long()) for x, t in rows]
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    scores = scorer.rows(todo, batch_tokens=budget)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    return float(sum(s.nll.sum() for s in scores)), scorer.stats.scored, scorer.stats.forward_tokens, seconds


def time_entry(model, entry: str, makers: dict, repeats: int, state: dict, suffix: str = "") -> None:
    """entry "layout@budget"; "layout+fn@budget": the same with fuse_rms_norm (Llama's RMSNorm fused)."""
    layout, budget = entry.split("@")
    fuse_rms_norm(layout.endswith("+fn") or state.get("fused_norm", False))
    layout = layout.removesuffix("+fn")
    name, budget = entry + suffix, int(budget)
    if layout in ("harness", "harness-nolean"):  # cold when first in the process: no warm-up pass of its own
        import harness.metrics.scoring as scoring

        lean = scoring._lean_patches
        scoring._lean_patches = lean if layout == "harness" else (lambda qmodel: [])  # nolean: without lean_ops
        try:
            runs = [score_harness(model, state["rows"], budget) for _ in range(repeats)]
        finally:
            scoring._lean_patches = lean
        report(name, layout, runs, state, [None] * repeats)
        return
    model.set_attn_implementation("flex_attention" if layout == "packed-flex" else "sdpa")
    try:
        if not state.get("cold"):
            warm = next(iter(makers[layout](budget)))
            score(model, [warm], "cuda")  # warm-up (and flex's compile)
        traces = [[] if state.get("trace") else None for _ in range(repeats)]
        runs = [score(model, makers[layout](budget), "cuda", traces[r]) for r in range(repeats)]
    except Exception as e:  # noqa: BLE001 - a probe: say what failed, go on
        print(f"{name}: failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}", flush=True)
        return
    report(name, layout, runs, state, traces)


def report(name: str, layout: str, runs: list, state: dict, traces: list) -> None:
    in_order = ", ".join(f"{r[3]:.2f}" for r in runs)
    if state.get("trace") and traces[0] is not None:  # batch by batch: first run against the last (ms)
        for (rows_n, width, a), (_, _, b) in zip(traces[0], traces[-1]):
            print(f"  batch {rows_n:4d} x {width:4d}: first {a * 1e3:7.1f} ms, last {b * 1e3:7.1f} ms", flush=True)
    secs = sorted(r[3] for r in runs)
    nll, scored, forward, _ = runs[0]
    med = secs[len(secs) // 2]
    ppl = math.exp(nll / scored)
    base = state["base"]
    agree = "" if base is None or layout == "concat" else f", ppl vs first {ppl / base - 1:+.2e}"
    state["base"] = ppl if base is None else base
    print(f"{name:27s} ppl {ppl:.4f}  scored {scored}  forward tokens {forward} ({scored / forward:.1%} useful)  "
          f"{med:.2f} s (min {secs[0]:.2f}, max {secs[-1]:.2f}) = {scored / med:,.0f} scored tok/s{agree}"
          f" | runs in order {in_order} s", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make-rows")
    m.add_argument("--out", type=Path, required=True)
    m.add_argument("--corpus", default="boolq-wiki")
    m.add_argument("--seq-len", type=int, default=2048)
    t = sub.add_parser("time")
    t.add_argument("--rows", type=Path, required=True)
    t.add_argument("--shape", default="llama-2-7b")
    t.add_argument("--repeats", type=int, default=3)
    t.add_argument("--which", nargs="+", default=["padded@65536", "padded@16384", "packed-sdpa@65536",
                                                  "packed-sdpa@16384", "packed-flex@65536", "concat@65536"])
    t.add_argument("--reload", action="store_true", help="time the model saved and loaded back with from_pretrained")
    t.add_argument("--cold", action="store_true", help="no warm-up pass: the first run meets every shape and "
                   "allocation for the first time, as a harness cell (or lm-eval) does")
    t.add_argument("--trace", action="store_true", help="print each batch's time, first run against the last")
    t.add_argument("--no-cudnn-sdpa", action="store_true", help="attention without cuDNN's SDPA backend, which "
                   "builds a graph per new shape (the harness's scoring does this: scoring.shape_stable_attention)")
    t.add_argument("--fused-norm", action="store_true", help="Llama's RMSNorm as weight * F.rms_norm(x) (one fused "
                   "kernel on CUDA) instead of its float32 chain of element-wise kernels")
    t.add_argument("--profile", action="store_true", help="after the timings, torch.profiler over one warm pass of "
                   "the first entry: CUDA time by kernel")
    t.add_argument("--harness-with-cudnn", action="store_true", help="the 'harness' layout with cuDNN's SDPA "
                   "allowed (as before a975c90), for an A/B of shape_stable_attention")
    a = ap.parse_args()
    if getattr(a, "no_cudnn_sdpa", False):
        torch.backends.cuda.enable_cudnn_sdp(False)
    if getattr(a, "harness_with_cudnn", False):  # the engine as it was before a975c90: cuDNN's SDPA allowed
        import contextlib

        import harness.metrics.scoring as scoring

        scoring.shape_stable_attention = lambda device: contextlib.nullcontext()
    if a.cmd == "make-rows":
        make_rows(a.out, a.corpus, a.seq_len)
    else:
        time_all(a.rows, a.shape, a.repeats, a.which, a.reload, a.cold, a.trace, a.profile, a.fused_norm)


def fuse_rms_norm(on: bool = True) -> None:
    """(on) Llama's RMSNorm (float32 upcast, mean of squares, rsqrt, cast back, times the weight: ~7
    element-wise kernels with float32 intermediates) as weight * F.rms_norm(x) (on CUDA one kernel
    that accumulates in float32 and returns x's dtype): the same arithmetic, fewer memory passes."""
    from transformers.models.llama import modeling_llama

    from harness.metrics.lean_ops import rms_norm_forward

    cls = modeling_llama.LlamaRMSNorm
    cls.original_forward = getattr(cls, "original_forward", cls.forward)
    cls.forward = rms_norm_forward if on else cls.original_forward


def profile_pass(model, batches) -> None:
    """CUDA time by kernel over one pass (after the timed ones: everything is warm)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        score(model, batches, "cuda")
    events = prof.key_averages()
    total = sum(e.device_time_total for e in events) or 1
    groups: dict[str, float] = {}
    for e in events:
        name = e.key.lower()
        kind = ("gemm" if any(k in name for k in ("gemm", "cutlass", "sm90_xmma", "nvjet", "cublas")) else
                "attention" if any(k in name for k in ("flash", "fmha", "attention", "efficient")) else
                "copy" if "memcpy" in name or "copy" in name else "elementwise/other")
        groups[kind] = groups.get(kind, 0.0) + e.device_time_total
    print("CUDA time by kind: " + ", ".join(f"{k} {v / total:.1%}" for k, v in sorted(groups.items(), key=lambda kv: -kv[1])),
          flush=True)
    for e in sorted(events, key=lambda e: -e.device_time_total)[:25]:
        print(f"  {e.device_time_total / total:6.1%} {e.count:6d}x  {e.key[:110]}", flush=True)


if __name__ == "__main__":
    main()
