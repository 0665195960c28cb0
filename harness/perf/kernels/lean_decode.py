"""A lean Llama-family decoder over a transformers model's own weights, for the graph-decode floor.

Why: transformers' decode step (HF modules, StaticCache bookkeeping, separate q/k/v and gate/up
projections) leaves a third of the H100's bandwidth unused at batch 1 even when compiled and
captured as one CUDA graph. This decoder does the same arithmetic in the fewest kernels (gpt-fast
style: q/k/v and gate/up fused into one GEMV each, a static [batch, kv_heads, seq, head_dim] cache
written with index_copy_, SDPA with grouped-query heads), so the report can show how far the
*kernels* of a float model can go on the device apart from the framework's step overhead.

It is a measurement path, not a backend: Llama/Mistral/Qwen2-style models (RMSNorm, rotary
embeddings as the model computes them, SiLU-gated MLP, optional q/k/v biases). Plain float
projections are fused; a quantized backend's projection modules (torchao tensor subclasses, bnb,
HQQ, quanto layers) are called as they are, one module each, so the backend's own kernels run
inside the same lean step. `check_against` compares its logits with the transformers model's on
the same tokens before any number is reported."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from harness.perf.decode import DecodeTiming, capture_and_time, static_cache_len
from harness.weights.footprint import tensor_bytes

SUPPORTED = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' LlamaRMSNorm: variance in fp32, scale in the model dtype."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def plain_linear(module: torch.nn.Module) -> bool:
    """An nn.Linear whose weight is an ordinary float tensor (so it can be concatenated)."""
    return (type(module) is torch.nn.Linear and type(module.weight) in (torch.Tensor, torch.nn.Parameter)
            and module.weight.dtype.is_floating_point)


@dataclass
class _Layer:
    ln1: torch.Tensor
    wqkv: torch.Tensor | list[torch.nn.Module]  # fused weight, or the q/k/v modules as they are
    bqkv: torch.Tensor | None
    wo: torch.nn.Module
    ln2: torch.Tensor
    w13: torch.Tensor | list[torch.nn.Module]
    w2: torch.nn.Module
    k_cache: torch.Tensor
    v_cache: torch.Tensor


class LeanDecoder:
    """Callable `(ids [B, T], pos [T]) -> last-position logits [B, vocab]`; holds its own cache."""

    def __init__(self, model, batch: int, max_seq: int, fuse: bool = True, attention: str = "sdpa",
                 kernels: str = "torch"):
        arch = (getattr(model.config, "architectures", None) or [type(model).__name__])[0]
        if type(model).__name__ not in SUPPORTED:
            raise ValueError(f"lean decoder: {type(model).__name__} ({arch}) is not one of {', '.join(SUPPORTED)}")
        cfg = model.config
        inner = model.model
        self.eps = cfg.rms_norm_eps
        self.n_heads = cfg.num_attention_heads
        self.n_kv = getattr(cfg, "num_key_value_heads", None) or self.n_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads
        projections = [m for lay in inner.layers for m in (lay.self_attn.q_proj, lay.self_attn.k_proj,
                                                            lay.self_attn.v_proj, lay.mlp.gate_proj, lay.mlp.up_proj)]
        self.fused = fuse and all(plain_linear(m) for m in projections)  # quantized modules are called as they are
        if attention not in ("sdpa", "matmul"):
            raise ValueError(f"lean decoder: attention must be sdpa or matmul, not {attention!r}")
        # matmul: decode steps (one query) as q.K^T -> softmax -> .V in plain ops, which inductor
        # (coordinate_descent_tuning) lowers to fused Triton reductions instead of a flash kernel
        # launch per layer; prefill always uses SDPA
        self.attention = attention
        if kernels not in ("torch", "triton"):
            raise ValueError(f"lean decoder: kernels must be torch or triton, not {kernels!r}")
        self.kernels = kernels
        self.embed = inner.embed_tokens.weight
        self.norm = inner.norm.weight
        self.lm_head = model.lm_head
        self.dtype, self.device = self.embed.dtype, self.embed.device
        positions = torch.arange(max_seq, device=self.device)[None]
        with torch.no_grad():  # the model's own rotary module: rope scaling variants come for free
            cos, sin = inner.rotary_emb(torch.empty(1, device=self.device, dtype=self.dtype), positions)
        self.cos, self.sin = cos[0], sin[0]  # [max_seq, head_dim]
        self.max_seq = max_seq
        self.mask = torch.ones(max_seq, max_seq, dtype=torch.bool, device=self.device).tril()
        self.layers: list[_Layer] = []
        for layer in inner.layers:
            at, mlp = layer.self_attn, layer.mlp
            qkv = [at.q_proj, at.k_proj, at.v_proj]
            biases = [p.bias for p in qkv]
            cache = (batch, self.n_kv, max_seq, self.head_dim)
            fused = self.fused
            self.layers.append(_Layer(
                ln1=layer.input_layernorm.weight,
                wqkv=torch.cat([p.weight for p in qkv]) if fused else qkv,
                bqkv=torch.cat(biases) if fused and biases[0] is not None else None,
                wo=at.o_proj,
                ln2=layer.post_attention_layernorm.weight,
                w13=torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]) if fused else [mlp.gate_proj, mlp.up_proj],
                w2=mlp.down_proj,
                k_cache=torch.zeros(cache, dtype=self.dtype, device=self.device),
                v_cache=torch.zeros(cache, dtype=self.dtype, device=self.device),
            ))
        if kernels == "triton":
            self._check_triton(batch)

    def _check_triton(self, batch: int) -> None:
        """The fused Triton step (harness.perf.kernels.triton_decode) covers one layout only: say which
        part of this model falls outside it, in one line, rather than run something else."""
        # lazy: `import harness.perf.kernels.lean_decode` stays free of triton
        from harness.perf.kernels import triton_decode

        why = triton_decode.available()
        plain = all(plain_linear(lay.wo) and plain_linear(lay.w2) and lay.wo.bias is None and lay.w2.bias is None
                    for lay in self.layers) and plain_linear(self.lm_head) and self.lm_head.bias is None
        hd = self.head_dim
        why = why or (None if self.fused else "its projections are not all plain float linears (quantized?)")
        why = why or (None if plain else "o_proj/down_proj/lm_head are not bias-free plain float linears")
        why = why or (None if batch == 1 else f"batch {batch} (the fused step is batch-1 decode)")
        why = why or (None if hd >= 16 and hd & (hd - 1) == 0 else f"head_dim {hd} is not a power of two")
        if why:
            raise ValueError(f"lean decoder, triton kernels: {why}")
        self.cos, self.sin = self.cos.contiguous(), self.sin.contiguous()
        self.scratch = triton_decode.AttentionScratch(self.n_heads, self.n_kv, hd, self.device)
        if self.device.type == "cuda":
            self.tune_triton()

    def tune_triton(self) -> dict:
        """Tune each GEMV of the fused step over all layers' matrices of its kind (cold, as the
        step reads them; random inputs): {kind: (BLOCK_N, BLOCK_K, warps, stages, s a launch)}."""
        # lazy: `import harness.perf.kernels.lean_decode` stays free of triton
        from harness.perf.kernels import triton_decode

        def vec(n):
            return torch.randn(n, device=self.device, dtype=self.dtype)

        hidden = self.embed.shape[1]
        nq = self.n_heads * self.head_dim
        kinds = {
            "qkv": [dict(w=lay.wqkv, x=vec(hidden), norm=lay.ln1, eps=self.eps, bias=lay.bqkv) for lay in self.layers],
            "o_proj": [dict(w=lay.wo.weight, x=vec(nq), residual=vec(hidden)) for lay in self.layers],
            "gate_up": [dict(w=lay.w13, x=vec(hidden), norm=lay.ln2, eps=self.eps, gated=True) for lay in self.layers],
            "down": [dict(w=lay.w2.weight, x=vec(lay.w2.weight.shape[1]), residual=vec(hidden)) for lay in self.layers],
            "lm_head": [dict(w=self.lm_head.weight, x=vec(hidden), norm=self.norm, eps=self.eps)],
        }
        return {kind: triton_decode.tune(calls) for kind, calls in kinds.items()}

    def weight_bytes(self) -> int:
        """Bytes of the weights one decode step reads (fused copies, modules' storage as stored,
        quantized tensors opened; the embedding table is not read, only one row of it)."""
        tensors = [self.norm, *self.lm_head.parameters()]
        for lay in self.layers:
            for w in (lay.ln1, lay.wqkv, lay.wo, lay.ln2, lay.w13, lay.w2):
                for item in w if isinstance(w, list) else [w]:
                    if isinstance(item, torch.nn.Module):
                        tensors += [*item.parameters(), *item.buffers()]
                    else:
                        tensors.append(item)
        return tensor_bytes(tensors)

    def cache_bytes(self) -> int:
        return sum(2 * lay.k_cache.numel() * lay.k_cache.element_size() for lay in self.layers)

    def _proj(self, h, w, b=None):
        if isinstance(w, list):
            return [module(h) for module in w]
        return F.linear(h, w, b)

    def _matmul_attention(self, q, k, v, mask):
        """One query per sequence: [B, H, 1, hd] against the whole static cache, fp32 softmax."""
        bsz, group = q.shape[0], self.n_heads // self.n_kv
        qg = q.reshape(bsz, self.n_kv, group, self.head_dim)
        scores = torch.matmul(qg, k.transpose(-1, -2)).float() * self.head_dim ** -0.5  # [B, kv, g, S]
        scores = scores.masked_fill(~mask[:, :, -1:], float("-inf"))
        out = torch.matmul(scores.softmax(-1).to(v.dtype), v)  # [B, kv, g, hd]
        return out.reshape(bsz, self.n_heads, 1, self.head_dim)

    def _triton_step(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """One token through the fused kernels: five launches a layer (triton_decode's docstring)."""
        # lazy: `import harness.perf.kernels.lean_decode` stays free of triton
        from harness.perf.kernels.triton_decode import decode_attention, gemv

        x = F.embedding(ids.view(1), self.embed).view(-1)
        for lay in self.layers:
            qkv = gemv(lay.wqkv, x, norm=lay.ln1, eps=self.eps, bias=lay.bqkv)
            att = decode_attention(qkv, lay.k_cache, lay.v_cache, self.cos, self.sin, pos, self.n_heads, self.n_kv,
                                   self.scratch)
            x = gemv(lay.wo.weight, att, residual=x)
            x = gemv(lay.w2.weight, gemv(lay.w13, x, norm=lay.ln2, eps=self.eps, gated=True), residual=x)
        return gemv(self.lm_head.weight, x, norm=self.norm, eps=self.eps).view(1, -1)

    @torch.no_grad()
    def __call__(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        bsz, seq = ids.shape
        if self.kernels == "triton" and seq == 1:
            return self._triton_step(ids, pos)
        x = F.embedding(ids, self.embed)
        cos, sin = self.cos[pos][None, None], self.sin[pos][None, None]  # [1, 1, T, hd]
        mask = self.mask[pos][None, None]  # [1, 1, T, max_seq]: keys at positions <= each query's
        nq, nkv, hd = self.n_heads * self.head_dim, self.n_kv * self.head_dim, self.head_dim
        for lay in self.layers:
            h = _rms(x, lay.ln1, self.eps)
            qkv = self._proj(h, lay.wqkv, lay.bqkv)
            q, k, v = qkv.split([nq, nkv, nkv], dim=-1) if not isinstance(qkv, list) else qkv
            q = q.view(bsz, seq, self.n_heads, hd).transpose(1, 2)
            k = k.view(bsz, seq, self.n_kv, hd).transpose(1, 2)
            v = v.view(bsz, seq, self.n_kv, hd).transpose(1, 2)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            lay.k_cache.index_copy_(2, pos, k)
            lay.v_cache.index_copy_(2, pos, v)
            if self.attention == "matmul" and seq == 1:
                att = self._matmul_attention(q, lay.k_cache, lay.v_cache, mask)
            else:
                att = F.scaled_dot_product_attention(q, lay.k_cache, lay.v_cache, attn_mask=mask,
                                                     enable_gqa=self.n_kv != self.n_heads)
            x = x + lay.wo(att.transpose(1, 2).reshape(bsz, seq, nq))
            h = _rms(x, lay.ln2, self.eps)
            gu = self._proj(h, lay.w13)
            g, u = gu.chunk(2, dim=-1) if not isinstance(gu, list) else gu
            x = x + lay.w2(F.silu(g) * u)
        return self.lm_head(_rms(x[:, -1], self.norm, self.eps))


@torch.no_grad()
def check_against(model, lean: LeanDecoder, ids: torch.Tensor, steps: int = 4) -> dict:
    """Prefill + `steps` greedy decode steps through both; the transformers model is the truth.
    Returns the largest |logit difference| relative to the logits' scale and the share of steps
    whose argmax agrees (fp16 accumulation order differs, so agreement, not equality)."""
    from transformers import DynamicCache

    cache = DynamicCache()
    ctx = ids.shape[1]
    ref = model(input_ids=ids, past_key_values=cache, use_cache=True).logits[:, -1].float()
    got = lean(ids, torch.arange(ctx, device=ids.device)).float()
    worst, agree = 0.0, 0
    for i in range(steps + 1):
        worst = max(worst, ((ref - got).abs().max() / ref.abs().max().clamp_min(1e-6)).item())
        agree += int(torch.equal(ref.argmax(-1), got.argmax(-1)))
        if i == steps:
            break
        nxt = ref.argmax(-1, keepdim=True)
        ref = model(input_ids=nxt, past_key_values=cache, use_cache=True).logits[:, -1].float()
        got = lean(nxt, torch.tensor([ctx + i], device=ids.device)).float()
    return {"max_rel_logit_diff": worst, "argmax_agreement": agree / (steps + 1), "steps": steps + 1}


def lean_graph_decode(model, input_ids: torch.Tensor, new_tokens: int, compile: bool = False, fuse: bool = True,
                      warmup: int = 3, inductor: dict | None = None, around_replays=None, lean: LeanDecoder | None = None,
                      after_replays=None):
    """Like harness.perf.decode.graph_decode, through the lean decoder: prefill, then one captured
    CUDA graph per decode step (argmax and position update inside), each replay timed with events.
    `after_replays(graph)`: called once the timed replays are done (e.g. to profile a few more)."""
    if input_ids.device.type != "cuda":
        raise RuntimeError("graph-captured decode needs a CUDA device")
    batch, context = input_ids.shape
    lean = lean or LeanDecoder(model, batch, static_cache_len(context, new_tokens, warmup), fuse=fuse)
    t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    t0.record()
    token = lean(input_ids, torch.arange(context, device=input_ids.device)).argmax(-1, keepdim=True)
    t1.record()
    t1.synchronize()
    pos = torch.tensor([context], device=input_ids.device)
    ids = token.clone()

    def step():
        ids.copy_(lean(ids, pos).argmax(-1, keepdim=True))
        pos.add_(1)

    def reset():
        pos.fill_(context)
        ids.copy_(token)

    # a backend's own modules may break the graph: fullgraph only for the all-float fused step
    tpot = capture_and_time(step, reset, new_tokens, compile=compile, fullgraph=lean.fused, warmup=warmup,
                            inductor=inductor, around_replays=around_replays, after_replays=after_replays)
    if lean.kernels == "triton":
        from harness.perf.kernels.triton_decode import use_pdl

        note = ("lean decoder, fused Triton step (5 kernels a layer: norm+qkv, rotary+cache+split attention, "
                f"o_proj+residual, norm+gate/up+silu, down+residual; programmatic dependent launch "
                f"{'on' if use_pdl(input_ids.device) else 'off'}) + one CUDA graph per step")
    else:
        note = ("lean decoder (fused qkv/gate-up" if lean.fused else "lean decoder (projections called one module each") + (
            f", {lean.attention} attention)") + (
            f" + torch.compile {inductor or {}}" if compile else ", eager kernels") + " + one CUDA graph per step"
    timing = DecodeTiming(ttft_s=t0.elapsed_time(t1) / 1e3, tpot_s=tpot, batch=batch, context=context,
                          new_tokens=new_tokens, mode="graph-lean", note=note, kv_cache_bytes=lean.cache_bytes())
    return timing, lean
