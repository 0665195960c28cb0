"""Fused Triton kernels for one batch-1 decode step of the lean decoder: five launches a layer.

Why: at batch 1 a decode step should cost the time to stream the weights once. Through cuBLAS
(M=1 GEMVs at ~84% of the copy ceiling on the H200) plus a dozen small pointwise, norm, rotary,
cache-update and attention kernels per layer, the H200's lean step reached 68% of the bandwidth
roofline. Here each layer is
  1. RMSNorm -> fused q/k/v GEMV (+ bias)            `gemv(w_qkv, x, norm=ln1)`
  2. rotary q/k, write k/v at `pos`, attention        `decode_attention(...)`
  3. o_proj GEMV + residual                           `gemv(w_o, att, residual=x)`
  4. RMSNorm -> gate/up GEMV -> silu(g) * u           `gemv(w_gate_up, x, norm=ln2, gated=True)`
  5. down_proj GEMV + residual                        `gemv(w_down, a, residual=x)`
so nothing but the GEMVs' weight stream and a few KB of activations touch device memory. On
Hopper every kernel is launched with programmatic dependent launch: it loads what no earlier kernel
writes (its first weight tile; the position, rotary rows and first cache block) before waiting for
the previous kernel, so the weight stream runs across kernel boundaries (H200, 7B fp16: 87-90% of
the roofline with it, 84-86% without; benchmarks/results/decode-triton-h200).

The GEMV's block shape is tuned per (rows, cols, epilogue) on the device before capture (`tune`:
22 candidates, each timed as a CUDA graph over all layers' matrices of the kind; kept in `TUNED`),
so the captured graph holds the chosen kernels. On CPU the kernels run under Triton's interpreter
(TRITON_INTERPRET=1), which is how the tests check them against torch."""

from __future__ import annotations

import functools
import os

import torch

from harness.perf.decode import capture, replay_seconds

try:  # optional: the kernels need Triton (a CUDA build of torch brings it; tests use its interpreter)
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where triton is absent
    triton = None

# (n, k, flags) -> (BLOCK_N, BLOCK_K, num_warps, num_stages, seconds a launch) chosen on this device
TUNED: dict[tuple, tuple] = {}
DEFAULT_CONFIG = (4, 256, 4, 2)  # interpreter / untuned
# block shapes whose tile (2-32 KB of fp16 a loop step) keeps enough bytes in flight per SM
CANDIDATES = [(bn, bk, w, 2) for bn in (2, 4, 8, 16) for bk in (256, 512, 1024) for w in (4, 8) if bn * bk <= 8192]


def available() -> str | None:
    """None when the kernels can run here, else why not (one line)."""
    if triton is None:
        return "triton is not installed"
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        return "no CUDA device (set TRITON_INTERPRET=1 to run the kernels on CPU, slowly)"
    return None


if triton is not None:

    @triton.jit
    def _pdl_wait(PDL: tl.constexpr):
        if PDL:  # programmatic dependent launch: wait here for the previous kernel's results
            tl.extra.cuda.gdc_wait()

    @triton.jit
    def _pdl_launch_dependents(PDL: tl.constexpr):
        if PDL:  # the next kernel may be scheduled once every program of this one has started
            tl.extra.cuda.gdc_launch_dependents()

    @triton.jit
    def _gemv_x(X, NW, cols, K, inv, dtype, HAS_NORM: tl.constexpr, EVEN_K: tl.constexpr):
        """A chunk of the GEMV's input as fp32, RMS-normalised and scaled as transformers rounds it."""
        if EVEN_K:
            xv = tl.load(X + cols).to(tl.float32)
        else:
            xv = tl.load(X + cols, mask=cols < K, other=0.0).to(tl.float32)
        if HAS_NORM:
            nw = tl.load(NW + cols, mask=cols < K, other=0.0).to(tl.float32)
            xv = (nw * (xv * inv).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
        return xv

    @triton.jit
    def _gemv_kernel(W, X, NW, B, R, Y, N, K, eps,
                     HAS_NORM: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, GATED: tl.constexpr,
                     EVEN_K: tl.constexpr, K_P2: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     PDL: tl.constexpr):
        """Y[n] = (W @ norm(X))[n] (+B[n]) (+R[n]); GATED: W holds 2N rows (gate, then up) and
        Y[n] = silu(g[n]) * u[n]. fp32 accumulation; each rounding to the model dtype where
        transformers rounds (norm output, projection output, silu, product, residual sum).
        PDL: the first weight tile (which no earlier kernel writes) is loaded before waiting for
        the previous kernel, so the weight stream runs across kernel boundaries."""
        pid = tl.program_id(0)
        _pdl_launch_dependents(PDL)
        rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        cols = tl.arange(0, BLOCK_K)
        dtype = Y.dtype.element_ty
        offs = rows[:, None] * K + cols[None, :]
        wmask = row_ok[:, None] & (cols[None, :] < K)
        w = tl.load(W + offs, mask=wmask, other=0.0, eviction_policy="evict_first")
        if GATED:
            wu = tl.load(W + N * K + offs, mask=wmask, other=0.0, eviction_policy="evict_first")
        _pdl_wait(PDL)
        inv = 1.0
        if HAS_NORM:  # every program recomputes the norm of X (one load of K values from L2, not a launch)
            xall = tl.load(X + tl.arange(0, K_P2), mask=tl.arange(0, K_P2) < K, other=0.0).to(tl.float32)
            inv = tl.rsqrt(tl.sum(xall * xall, 0) / K + eps)
        xv = _gemv_x(X, NW, cols, K, inv, dtype, HAS_NORM, EVEN_K)
        acc = w.to(tl.float32) * xv[None, :]
        if GATED:
            acc_up = wu.to(tl.float32) * xv[None, :]
        for k0 in range(BLOCK_K, K, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            xv = _gemv_x(X, NW, cols, K, inv, dtype, HAS_NORM, EVEN_K)
            offs = rows[:, None] * K + cols[None, :]
            wmask = row_ok[:, None] & (cols[None, :] < K)
            w = tl.load(W + offs, mask=wmask, other=0.0, eviction_policy="evict_first")
            acc += w.to(tl.float32) * xv[None, :]
            if GATED:
                wu = tl.load(W + N * K + offs, mask=wmask, other=0.0, eviction_policy="evict_first")
                acc_up += wu.to(tl.float32) * xv[None, :]
        y = tl.sum(acc, 1)
        if HAS_BIAS:
            y += tl.load(B + rows, mask=row_ok, other=0.0).to(tl.float32)
        y = y.to(dtype).to(tl.float32)
        if GATED:
            u = tl.sum(acc_up, 1).to(dtype).to(tl.float32)
            y = (y / (1.0 + tl.exp(-y))).to(dtype).to(tl.float32) * u
        if HAS_RES:
            y += tl.load(R + rows, mask=row_ok, other=0.0).to(tl.float32)
        tl.store(Y + rows, y.to(dtype), mask=row_ok)

    @triton.jit
    def _attend(qr1, qr2, kk1, kk2, vv1, vv2, s_ok, m, l_sum, o1, o2, scale):
        """One block of cache positions into the running (max, sum, output) of an online softmax."""
        kk1, kk2, vv1, vv2 = kk1.to(tl.float32), kk2.to(tl.float32), vv1.to(tl.float32), vv2.to(tl.float32)
        sc = (tl.sum(qr1[:, None, :] * kk1[None, :, :], 2) + tl.sum(qr2[:, None, :] * kk2[None, :, :], 2)) * scale
        sc = tl.where(s_ok[None, :], sc, float("-inf"))
        m_new = tl.maximum(m, tl.max(sc, 1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(sc - m_new[:, None])
        l_sum = l_sum * alpha + tl.sum(p, 1)
        o1 = o1 * alpha[:, None] + tl.sum(p[:, :, None] * vv1[None, :, :], 1)
        o2 = o2 * alpha[:, None] + tl.sum(p[:, :, None] * vv2[None, :, :], 1)
        return m_new, l_sum, o1, o2

    @triton.jit
    def _decode_attention_kernel(QKV, KC, VC, COS, SIN, POS, OUT, PM, PL, PO, CNT, MAX_SEQ, scale,
                                 N_HEADS: tl.constexpr, N_KV: tl.constexpr, GROUP: tl.constexpr,
                                 GROUP_P2: tl.constexpr, HALF: tl.constexpr, BLOCK_S: tl.constexpr,
                                 SPLITS: tl.constexpr, COMBINE: tl.constexpr = True, PDL: tl.constexpr = False):
        """Split-sequence decode attention (flash-decoding), program (kv head, split): rotary on the
        new k and the GROUP q heads (transformers' rotate_half convention); split 0 writes k/v to
        the caches at `pos`; each split attends to its share of cache positions [0, pos) (the last
        split also to the new key, kept in registers) with an online fp32 softmax and leaves
        (max, sum, unnormalised output) in scratch; the split that finishes last for its kv head
        (an atomic counter) combines them, writes the heads' outputs and resets the counter.
        PDL: the position, rotary rows and the split's first cache block (written by earlier
        steps only) are loaded before waiting for the q/k/v projection."""
        kvh = tl.program_id(0)
        sp = tl.program_id(1)
        _pdl_launch_dependents(PDL)
        pos = tl.load(POS)
        HD: tl.constexpr = 2 * HALF
        dtype = OUT.dtype.element_ty
        d = tl.arange(0, HALF)
        c1 = tl.load(COS + pos * HD + d).to(tl.float32)
        c2 = tl.load(COS + pos * HD + HALF + d).to(tl.float32)
        s1 = tl.load(SIN + pos * HD + d).to(tl.float32)
        s2 = tl.load(SIN + pos * HD + HALF + d).to(tl.float32)
        cache = kvh * MAX_SEQ * HD
        chunk = tl.cdiv(pos, SPLITS)
        start = sp * chunk
        end = tl.minimum(start + chunk, pos)
        s = start + tl.arange(0, BLOCK_S)
        s_ok = s < end
        kp = KC + cache + s[:, None] * HD + d[None, :]
        vp = VC + cache + s[:, None] * HD + d[None, :]
        kk1 = tl.load(kp, mask=s_ok[:, None], other=0.0)
        kk2 = tl.load(kp + HALF, mask=s_ok[:, None], other=0.0)
        vv1 = tl.load(vp, mask=s_ok[:, None], other=0.0)
        vv2 = tl.load(vp + HALF, mask=s_ok[:, None], other=0.0)
        _pdl_wait(PDL)

        kbase = QKV + N_HEADS * HD + kvh * HD
        vbase = QKV + (N_HEADS + N_KV) * HD + kvh * HD
        k1 = tl.load(kbase + d).to(tl.float32)
        k2 = tl.load(kbase + HALF + d).to(tl.float32)
        kr1 = (k1 * c1 - k2 * s1).to(dtype)
        kr2 = (k2 * c2 + k1 * s2).to(dtype)
        v1 = tl.load(vbase + d)
        v2 = tl.load(vbase + HALF + d)
        if sp == 0:  # no split reads position `pos` from the cache: the write races with nothing
            tl.store(KC + cache + pos * HD + d, kr1)
            tl.store(KC + cache + pos * HD + HALF + d, kr2)
            tl.store(VC + cache + pos * HD + d, v1)
            tl.store(VC + cache + pos * HD + HALF + d, v2)

        g = tl.arange(0, GROUP_P2)
        g_ok = g < GROUP
        head = kvh * GROUP + g
        q1 = tl.load(QKV + head[:, None] * HD + d[None, :], mask=g_ok[:, None], other=0.0).to(tl.float32)
        q2 = tl.load(QKV + head[:, None] * HD + HALF + d[None, :], mask=g_ok[:, None], other=0.0).to(tl.float32)
        qr1 = (q1 * c1[None, :] - q2 * s1[None, :]).to(dtype).to(tl.float32)
        qr2 = (q2 * c2[None, :] + q1 * s2[None, :]).to(dtype).to(tl.float32)
        last = sp == SPLITS - 1  # the last split seeds its running softmax with the new key
        s_new = (tl.sum(qr1 * kr1.to(tl.float32)[None, :], 1) + tl.sum(qr2 * kr2.to(tl.float32)[None, :], 1)) * scale
        m = tl.where(last, s_new, float("-inf"))
        l_sum = tl.where(last, tl.full([GROUP_P2], 1.0, tl.float32), 0.0)
        o1 = tl.where(last, tl.zeros([GROUP_P2, HALF], tl.float32) + v1.to(tl.float32)[None, :], 0.0)
        o2 = tl.where(last, tl.zeros([GROUP_P2, HALF], tl.float32) + v2.to(tl.float32)[None, :], 0.0)
        if start < end:
            m, l_sum, o1, o2 = _attend(qr1, qr2, kk1, kk2, vv1, vv2, s_ok, m, l_sum, o1, o2, scale)
        for s0 in range(start + BLOCK_S, end, BLOCK_S):
            s = s0 + tl.arange(0, BLOCK_S)
            s_ok = s < end
            kp = KC + cache + s[:, None] * HD + d[None, :]
            vp = VC + cache + s[:, None] * HD + d[None, :]
            m, l_sum, o1, o2 = _attend(qr1, qr2, tl.load(kp, mask=s_ok[:, None], other=0.0),
                                       tl.load(kp + HALF, mask=s_ok[:, None], other=0.0),
                                       tl.load(vp, mask=s_ok[:, None], other=0.0),
                                       tl.load(vp + HALF, mask=s_ok[:, None], other=0.0), s_ok, m, l_sum, o1, o2, scale)
        part = head * SPLITS + sp
        tl.store(PM + part, m, mask=g_ok)
        tl.store(PL + part, l_sum, mask=g_ok)
        tl.store(PO + part[:, None] * HD + d[None, :], o1, mask=g_ok[:, None])
        tl.store(PO + part[:, None] * HD + HALF + d[None, :], o2, mask=g_ok[:, None])
        if COMBINE:  # False only in timing diagnostics: the output is then left unwritten
            tl.debug_barrier()  # every thread's partials are written before the counter moves
            done = tl.atomic_add(CNT + kvh, 1, sem="acq_rel")
            if done == SPLITS - 1:
                sps = tl.arange(0, SPLITS)
                parts = head[:, None] * SPLITS + sps[None, :]  # [GROUP_P2, SPLITS]
                pm = tl.load(PM + parts, mask=g_ok[:, None], other=0.0, cache_modifier=".cg")
                pl = tl.load(PL + parts, mask=g_ok[:, None], other=0.0, cache_modifier=".cg")
                w = tl.exp(pm - tl.max(pm, 1)[:, None])  # empty splits hold -inf: weight 0
                denom = tl.sum(w * pl, 1)
                po = PO + parts[:, :, None] * HD + d[None, None, :]
                po1 = tl.load(po, mask=g_ok[:, None, None], other=0.0, cache_modifier=".cg")
                po2 = tl.load(po + HALF, mask=g_ok[:, None, None], other=0.0, cache_modifier=".cg")
                out = OUT + head[:, None] * HD + d[None, :]
                tl.store(out, (tl.sum(w[:, :, None] * po1, 1) / denom[:, None]).to(dtype), mask=g_ok[:, None])
                tl.store(out + HALF, (tl.sum(w[:, :, None] * po2, 1) / denom[:, None]).to(dtype), mask=g_ok[:, None])
                tl.atomic_xchg(CNT + kvh, 0)  # ready for the next layer / replay


@functools.lru_cache(maxsize=None)
def _capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def use_pdl(device: torch.device) -> bool:
    """Programmatic dependent launch (Hopper and later; QHARNESS_TRITON_PDL=0 turns it off)."""
    return (device.type == "cuda" and _capability(device)[0] >= 9
            and os.environ.get("QHARNESS_TRITON_PDL", "1") != "0")


def _key(w, x, norm, bias, residual, gated) -> tuple:
    rows, k = w.shape
    return (rows // 2 if gated else rows, k, norm is not None, bias is not None, residual is not None, gated, str(x.dtype))


def _launch_gemv(config, w, x, norm, bias, residual, out, eps, gated, compile_only=False):
    block_n, block_k, warps, stages = config
    n, k = out.numel(), x.numel()
    dummy = x
    pdl = use_pdl(x.device)
    args = (w, x, norm if norm is not None else dummy, bias if bias is not None else dummy,
            residual if residual is not None else dummy, out, n, k, eps)
    meta = dict(HAS_NORM=norm is not None, HAS_BIAS=bias is not None, HAS_RES=residual is not None, GATED=gated,
                EVEN_K=k % block_k == 0, K_P2=triton.next_power_of_2(k), BLOCK_N=block_n, BLOCK_K=block_k, PDL=pdl,
                num_warps=warps, num_stages=stages, **({"launch_pdl": True} if pdl else {}))
    if compile_only:
        _gemv_kernel.warmup(*args, grid=(1,), **meta)
    else:
        _gemv_kernel[(triton.cdiv(n, block_n),)](*args, **meta)


def _graph_seconds(fn, replays: int = 5) -> float:
    """Median seconds of one replay of `fn` captured as a CUDA graph (after one warm-up run)."""
    graph = capture(fn, warmup=1)
    graph.replay()
    return sorted(replay_seconds(graph, replays))[replays // 2]


def tune(calls: list[dict]) -> tuple:
    """Choose the block shape for one GEMV key: `calls` are gemv() keyword sets of that key (e.g.
    every layer's q/k/v projection, so together they outgrow L2 and read cold, as in a decode
    step); each candidate is timed as one CUDA graph of all of them, launched as the step will."""
    from concurrent.futures import ThreadPoolExecutor

    first = calls[0]
    eps, gated = first.get("eps", 1e-6), first.get("gated", False)
    key = _key(first["w"], first["x"], first.get("norm"), first.get("bias"), first.get("residual"), gated)
    if key in TUNED:
        return TUNED[key]
    outs = [torch.empty(key[0], device=c["x"].device, dtype=c["x"].dtype) for c in calls]

    def launch_all(config, compile_only=False):
        for c, out in zip(calls if not compile_only else calls[:1], outs):
            _launch_gemv(config, c["w"], c["x"], c.get("norm"), c.get("bias"), c.get("residual"), out, eps, gated,
                         compile_only)

    try:  # compile the candidates side by side (ptxas runs as a subprocess); timing stays serial
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda config: launch_all(config, True), CANDIDATES))
    except Exception:  # noqa: BLE001 - a refused config or an older warmup API: compiled below, one by one
        pass
    best = None
    for config in CANDIDATES:
        try:
            seconds = _graph_seconds(lambda: launch_all(config)) / len(calls)
        except Exception:  # noqa: BLE001 - a config the compiler refuses (resources) is skipped
            continue
        if best is None or seconds < best[-1]:
            best = (*config, seconds)
    if best is None:
        raise RuntimeError(f"no GEMV configuration compiled for {key}")
    TUNED[key] = best
    return best


def gemv(w: torch.Tensor, x: torch.Tensor, norm: torch.Tensor | None = None, eps: float = 1e-6,
         bias: torch.Tensor | None = None, residual: torch.Tensor | None = None, gated: bool = False) -> torch.Tensor:
    """y = W @ rmsnorm(x) (+ bias) (+ residual) for one token; `gated`: W = [gate; up] and the
    result is silu(gate) * up. x, norm, bias, residual: 1-D and contiguous; W [rows, len(x)].
    On CUDA an untuned key is tuned on this one matrix first (`tune` over all a step's matrices
    of the key is the better ranking; LeanDecoder does that)."""
    if x.numel() != w.shape[1] or not (w.is_contiguous() and x.is_contiguous()):
        raise ValueError(f"gemv: W {tuple(w.shape)} and x {tuple(x.shape)} must be contiguous with matching K")
    key = _key(w, x, norm, bias, residual, gated)
    config = TUNED.get(key)
    if config is None and x.device.type == "cuda":
        config = tune([dict(w=w, x=x, norm=norm, eps=eps, bias=bias, residual=residual, gated=gated)])
    config = config[:4] if config is not None else DEFAULT_CONFIG
    out = torch.empty(key[0], device=x.device, dtype=x.dtype)
    _launch_gemv(config, w, x, norm, bias, residual, out, eps, gated)
    return out


def attention_splits(n_kv: int, device: torch.device) -> int:
    """Sequence splits per kv head: about four programs per SM (on the H200, 32 splits of 16
    positions with one warp each beat 8 x 64 with four warps: 7.6 vs 13.7 us a layer at 256)."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    return max(1, min(32, triton.next_power_of_2(-(-4 * sms // n_kv))))


def attention_warps(group_p2: int, block_s: int, splits: int, half: int) -> int:
    """Warps for the largest register tile (a block's [group, block, half] products or the combine's
    [group, splits, half]) at about 64 fp32 values a thread: one warp for Llama-2's single head a kv
    head (fastest there), more for grouped-query heads, whose tiles spilled with one warp (Llama-3-8B
    24.6 us, Qwen2.5-7B 54 us a layer on the H200)."""
    elements = group_p2 * half * max(block_s, splits)
    return max(1, min(8, triton.next_power_of_2(-(-elements // (64 * 32)))))


class AttentionScratch:
    """The launch shape of decode_attention (sequence splits, positions a block, warps; each sized
    from the problem unless given) and its partials and per-kv-head counters, shared by every layer
    of a step (layers run one after another; the last split of each kv head resets its counter)."""

    def __init__(self, n_heads: int, n_kv: int, head_dim: int, device, splits: int | None = None,
                 block_s: int = 16, num_warps: int | None = None):
        device = torch.device(device)
        self.splits = splits or attention_splits(n_kv, device)
        self.block_s = block_s
        self.num_warps = num_warps or attention_warps(triton.next_power_of_2(n_heads // n_kv), block_s, self.splits,
                                                      head_dim // 2)
        self.m = torch.empty(n_heads * self.splits, device=device, dtype=torch.float32)
        self.l = torch.empty_like(self.m)
        self.o = torch.empty(n_heads * self.splits * head_dim, device=device, dtype=torch.float32)
        self.counters = torch.zeros(n_kv, device=device, dtype=torch.int32)


def decode_attention(qkv: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cos: torch.Tensor,
                     sin: torch.Tensor, pos: torch.Tensor, n_heads: int, n_kv: int, scratch: AttentionScratch,
                     combine: bool = True) -> torch.Tensor:
    """Attention of one new token (batch 1): qkv = [q heads | k heads | v heads] fresh from the
    projection; caches [1, n_kv, max_seq, head_dim]; cos/sin [max_seq, head_dim]; pos a 1-element
    device tensor (the new token's position, so graph replays advance without a host sync)."""
    _, _, max_seq, head_dim = k_cache.shape
    out = torch.empty(n_heads * head_dim, device=qkv.device, dtype=qkv.dtype)
    group = n_heads // n_kv
    pdl = use_pdl(qkv.device)
    _decode_attention_kernel[(n_kv, scratch.splits)](
        qkv, k_cache, v_cache, cos, sin, pos, out, scratch.m, scratch.l, scratch.o, scratch.counters,
        max_seq, head_dim ** -0.5, N_HEADS=n_heads, N_KV=n_kv, GROUP=group,
        GROUP_P2=triton.next_power_of_2(group), HALF=head_dim // 2, BLOCK_S=scratch.block_s,
        SPLITS=scratch.splits, COMBINE=combine, PDL=pdl, num_warps=scratch.num_warps,
        **({"launch_pdl": True} if pdl else {}))
    return out
