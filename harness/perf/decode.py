"""Prefill and decode loops with per-token timestamps.

Two decode modes, so a report can show kernel cost apart from Python overhead:
- framework: the library's plain `generate` (greedy, dynamic cache), timestamped per token by a
  logits processor that records a device event (CUDA) or host clock (CPU) each time it is called;
- graph: a transformers StaticCache and the whole decode step (every layer, the argmax and the
  position update) captured once as one CUDA graph and replayed, optionally after torch.compile.
  No host sync inside the loop; each replay is bracketed by CUDA events. (`generate(cache_
  implementation="static")` recompiles in the loop - a trap - so it is not used.)"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch


@dataclass
class DecodeTiming:
    """TTFT (first token after the prompt) and per-output-token intervals, in seconds."""

    ttft_s: float
    tpot_s: list[float] = field(default_factory=list)
    batch: int = 1
    context: int = 0
    new_tokens: int = 0
    mode: str = "framework"
    note: str = ""
    kv_cache_bytes: int | None = None


class _Stamps:
    """A logits processor that only timestamps: generate calls it once per new token."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.marks: list = []

    def mark(self):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.marks.append(ev)
        else:
            self.marks.append(time.perf_counter())

    def __call__(self, input_ids, scores):
        self.mark()
        return scores

    def seconds(self) -> list[float]:
        """Seconds of each mark after the first."""
        if self.cuda:
            self.marks[-1].synchronize()
            return [self.marks[0].elapsed_time(m) / 1e3 for m in self.marks[1:]]
        return [m - self.marks[0] for m in self.marks[1:]]


def random_prompt(vocab: int, batch: int, length: int, device, seed: int = 0) -> torch.Tensor:
    """Random token ids (never zeros: they can run faster than real data)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, length), generator=g).to(device)


@torch.inference_mode()
def framework_decode(model, input_ids: torch.Tensor, new_tokens: int, generate_kwargs: dict | None = None) -> DecodeTiming:
    """One plain greedy `generate` of exactly `new_tokens`, timestamped per token."""
    from transformers import LogitsProcessorList

    cuda = input_ids.device.type == "cuda"
    stamps = _Stamps(cuda)
    stamps.mark()
    out = model.generate(
        input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
        do_sample=False, logits_processor=LogitsProcessorList([stamps]), pad_token_id=0, **(generate_kwargs or {}),
    )
    times = stamps.seconds()
    if out.shape[1] - input_ids.shape[1] != new_tokens or len(times) != new_tokens:
        raise RuntimeError(f"generate produced {out.shape[1] - input_ids.shape[1]} tokens, asked for {new_tokens}")
    tpot = [b - a for a, b in zip(times, times[1:])]
    return DecodeTiming(ttft_s=times[0], tpot_s=tpot, batch=input_ids.shape[0], context=input_ids.shape[1],
                        new_tokens=new_tokens, mode="framework")


def _static_cache(model, max_len: int):
    from transformers import StaticCache

    return StaticCache(config=model.config, max_cache_len=max_len)


def static_cache_len(context: int, new_tokens: int, warmup: int = 3) -> int:
    """Positions a graph-decoded run writes: the prompt, the warm-up and captured steps, the timed
    replays, and slack for an `after_replays` hook that replays a few more (e.g. to profile)."""
    return context + new_tokens + warmup + 16


def cache_bytes(cache) -> int:
    total = 0
    for layer in getattr(cache, "layers", []):
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


@torch.inference_mode()
def graph_decode(model, input_ids: torch.Tensor, new_tokens: int, compile: bool = False, warmup: int = 3,
                 inductor: dict | None = None, around_replays=None, after_replays=None) -> DecodeTiming:
    """Static KV cache + the whole decode step captured as one CUDA graph, replayed `new_tokens`
    times; each replay timed with CUDA events. `compile`: torch.compile the step before capture
    (fuses the small elementwise kernels; no cudagraph mode of its own: we capture), with
    `inductor` config overrides (e.g. {"freezing": True}: weights as constants, so linears that
    share an input are concatenated). `around_replays`: a context manager (e.g. an EnergyMeter)
    entered around the timed replays only. `after_replays(graph)`: called after them (e.g. to profile)."""
    if input_ids.device.type != "cuda":
        raise RuntimeError("graph-captured decode needs a CUDA device")
    batch, context = input_ids.shape
    cache = _static_cache(model, static_cache_len(context, new_tokens, warmup))
    t0 = torch.cuda.Event(enable_timing=True)
    t1 = torch.cuda.Event(enable_timing=True)
    t0.record()
    out = model(input_ids=input_ids, past_key_values=cache, use_cache=True,
                cache_position=torch.arange(context, device=input_ids.device), logits_to_keep=1)
    token = out.logits[:, -1:].argmax(-1)
    t1.record()
    t1.synchronize()
    ttft = t0.elapsed_time(t1) / 1e3

    pos = torch.tensor([context], device=input_ids.device)
    ids = token.clone()

    def step():
        logits = model(input_ids=ids, past_key_values=cache, cache_position=pos,
                       position_ids=pos.expand(batch, 1), use_cache=True).logits
        ids.copy_(logits[:, -1:].argmax(-1))
        pos.add_(1)

    def reset():  # capture advanced the state; decode restarts right after the prompt
        pos.fill_(context)
        ids.copy_(token)

    tpot = capture_and_time(step, reset, new_tokens, compile=compile, warmup=warmup, inductor=inductor,
                            around_replays=around_replays, after_replays=after_replays)
    kv = cache_bytes(cache)
    return DecodeTiming(ttft_s=ttft, tpot_s=tpot, batch=batch, context=context, new_tokens=new_tokens,
                        mode="graph", note=(f"torch.compile {inductor or {}} + one CUDA graph per step" if compile
                                            else "one CUDA graph per step (eager kernels)"),
                        kv_cache_bytes=kv)


def capture_and_time(step, reset, new_tokens: int, compile: bool = False, fullgraph: bool = False, warmup: int = 3,
                     inductor: dict | None = None, around_replays=None, after_replays=None) -> list[float]:
    """Warm `step` up on a side stream (torch.compile'd first if asked, with `inductor` config
    overrides), capture one call as a CUDA graph, `reset()` the state the capture advanced, then
    replay it `new_tokens` times, each replay bracketed by CUDA events. `around_replays`: a context
    manager around the timed replays only; `after_replays(graph)`: called after them (e.g. to
    profile). Returns the seconds of each replay."""
    import contextlib

    fn, patch = step, contextlib.nullcontext()
    if compile:
        import torch._dynamo as dynamo
        import torch._inductor.config as inductor_config

        dynamo.reset()
        fn = torch.compile(step, dynamic=False, fullgraph=fullgraph)
        patch = inductor_config.patch(inductor or {})
    with patch:
        graph = capture(fn, warmup)
    reset()
    tpot = replay_seconds(graph, new_tokens, around_replays)
    if after_replays is not None:
        after_replays(graph)
    del graph
    return tpot


def capture(fn, warmup: int = 3) -> "torch.cuda.CUDAGraph":
    """`fn` run `warmup` times on a side stream (compiles, cuBLAS handles and workspaces, Triton
    tuning: nothing of that may happen inside a capture), then captured once as a CUDA graph."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def replay_seconds(graph, replays: int, around=None) -> list[float]:
    """Seconds of each of `replays` back-to-back replays, each bracketed by CUDA events; `around`:
    a context manager entered around the replays only (e.g. an EnergyMeter)."""
    import contextlib

    events = [torch.cuda.Event(enable_timing=True) for _ in range(replays + 1)]
    torch.cuda.synchronize()
    with around or contextlib.nullcontext():
        events[0].record()
        for i in range(replays):
            graph.replay()
            events[i + 1].record()
        events[-1].synchronize()
    return [events[i].elapsed_time(events[i + 1]) / 1e3 for i in range(replays)]


@torch.inference_mode()
def prefill(model, input_ids: torch.Tensor):
    """One forward over the prompt, building the cache as generate would; last-token logits only."""
    return model(input_ids=input_ids, use_cache=True, logits_to_keep=1).logits


def kernel_table(graph, label: str, replays: int = 2, top: int = 14) -> list[str]:
    """A diagnostic: torch.profiler over a few replays of a captured graph, device time per kernel
    name (one line a kernel, heaviest first, after a total line); a profiler failure is one line."""
    from torch.profiler import ProfilerActivity, profile

    try:
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(replays):
                graph.replay()
            torch.cuda.synchronize()
    except Exception as exc:  # noqa: BLE001 - a diagnostic only
        return [f"profiler failed for {label}: {type(exc).__name__}: {exc}"]
    agg: dict[str, list] = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            t = agg.setdefault(e.name, [0.0, 0])
            t[0] += e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
            t[1] += 1
    busy = sum(v[0] for v in agg.values()) / replays
    lines = [f"kernels of one replay ({label}): {sum(v[1] for v in agg.values()) // replays} launches, "
             f"{busy / 1e3:.3f} ms busy"]
    return lines + [f"  {v[0] / replays / 1e3:7.3f} ms  x{v[1] // replays:4d}  {k[:110]}"
                    for k, v in sorted(agg.items(), key=lambda kv: -kv[1][0])[:top]]
