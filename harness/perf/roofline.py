"""Roofline arithmetic from a model config: operations and bytes per layer and per phase.

Formulas follow LLM-Viewer (Yuan et al. 2024, model_analyzer.py) for a Llama-style decoder
block, with fused attention (scores never written to memory, as SDPA/FlashAttention do) and one
addition: quantized weights pay a dequantization term (`dequant_ops` operations per weight per
forward, independent of batch) and their bytes are `bits_per_weight / 8` per weight, where
bits_per_weight includes scales and zero points (4-bit g64 with fp16 scale+zero = 4.5).

Per layer, time >= max(ops / peak, bytes / bandwidth); a phase's floor is the sum over layers.
Decode: `batch` sequences each add one token to a `context`-token cache. Prefill: `batch`
prompts of `context` tokens; logits only for the last token (transformers' logits_to_keep)."""

from __future__ import annotations

from dataclasses import dataclass

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ModelDims:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool = False

    @classmethod
    def from_config(cls, config) -> ModelDims:
        cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
        heads = cfg.num_attention_heads
        return cls(hidden=cfg.hidden_size, intermediate=cfg.intermediate_size, layers=cfg.num_hidden_layers,
                   heads=heads, kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
                   head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // heads, vocab=cfg.vocab_size,
                   tied=bool(getattr(cfg, "tie_word_embeddings", False)))

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """name -> (in_features, out_features) for one decoder block."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return {"q_proj": (self.hidden, q), "k_proj": (self.hidden, kv), "v_proj": (self.hidden, kv),
                "o_proj": (q, self.hidden), "gate_proj": (self.hidden, self.intermediate),
                "up_proj": (self.hidden, self.intermediate), "down_proj": (self.intermediate, self.hidden)}

    def kv_bytes_per_token(self, kv_bytes: float = 2) -> float:
        return 2 * self.layers * self.kv_heads * self.head_dim * kv_bytes


@dataclass(frozen=True)
class LayerCost:
    name: str
    ops: float
    weight_bytes: float
    act_bytes: float  # activations loaded + stored
    kv_bytes: float  # KV cache loaded + stored
    count: int = 1  # how many times per forward (decoder blocks)

    @property
    def bytes(self) -> float:
        return self.weight_bytes + self.act_bytes + self.kv_bytes

    @property
    def intensity(self) -> float:
        return self.ops / self.bytes if self.bytes else float("inf")

    def time_floor(self, peak: float, bandwidth: float) -> float:
        return max(self.ops / peak, self.bytes / bandwidth)


def layer_costs(dims: ModelDims, phase: str, batch: int, context: int, bits_per_weight: float = 16,
                act_bytes: float = 2, kv_bytes: float = 2, dequant_ops: float = 0.0,
                head_bits: float | None = None) -> list[LayerCost]:
    """Per-layer costs of one forward. Decoder-block layers carry count=dims.layers."""
    if phase not in ("prefill", "decode"):
        raise ValueError(f"phase must be prefill or decode, not {phase!r}")
    tokens = batch * (context if phase == "prefill" else 1)  # rows through each linear
    w = bits_per_weight / 8
    quantized = bits_per_weight < 16
    n, b = dims.layers, act_bytes
    out = []
    for name, (i, o) in dims.linear_shapes().items():
        ops = 2.0 * i * o * tokens + (dequant_ops * i * o if quantized else 0.0)
        store = 0.0 if name in ("k_proj", "v_proj") else o * tokens * b  # k/v outputs go to the cache
        kv = o * tokens * kv_bytes if name in ("k_proj", "v_proj") else 0.0
        out.append(LayerCost(name, ops, i * o * w, i * tokens * b + store, kv, n))
    hd, h, kvh = dims.head_dim, dims.heads, dims.kv_heads
    if phase == "decode":
        # q (1 row) against `context + 1` cached keys, then the weighted sum of as many values
        keys = context + 1
        qk_ops = 2.0 * batch * h * hd * keys
        out.append(LayerCost("attention", 2 * qk_ops + 5.0 * batch * h * keys, 0.0,
                             2 * batch * h * hd * b, 2 * batch * keys * kvh * hd * kv_bytes, n))
    else:
        # causal: on average half the keys per query (fused kernel: K/V read once per prompt)
        qk_ops = 2.0 * batch * h * hd * context * (context + 1) / 2
        out.append(LayerCost("attention", 2 * qk_ops + 5.0 * batch * h * context * (context + 1) / 2, 0.0,
                             2 * batch * context * h * hd * b, 2 * batch * context * kvh * hd * kv_bytes, n))
    d, m = dims.hidden, dims.intermediate
    out.append(LayerCost("norms", 2 * 7.0 * tokens * d, 2 * d * b, 2 * 2 * tokens * d * b, 0.0, n))
    out.append(LayerCost("rotary", 6.0 * tokens * (h + kvh) * hd, 0.0, 2 * tokens * (h + kvh) * hd * b, 0.0, n))
    out.append(LayerCost("mlp_act", 5.0 * tokens * m, 0.0, 3 * tokens * m * b, 0.0, n))
    out.append(LayerCost("residual", 2.0 * tokens * d, 0.0, 2 * 3 * tokens * d * b, 0.0, n))
    rows = batch  # logits for the last (prefill) or only (decode) token of each sequence
    hw = (head_bits if head_bits is not None else 16 if quantized else 8 * b) / 8
    out.append(LayerCost("embedding", 0.0, tokens * d * b, tokens * d * b, 0.0, 1))
    out.append(LayerCost("final_norm", 7.0 * rows * d, d * b, 2 * rows * d * b, 0.0, 1))
    out.append(LayerCost("lm_head", 2.0 * d * dims.vocab * rows, d * dims.vocab * hw, rows * (d + dims.vocab) * b, 0.0, 1))
    return out


@dataclass(frozen=True)
class PhaseRoofline:
    phase: str
    batch: int
    context: int
    ops: float
    bytes: float
    floor_s: float  # sum over layers of max(ops/peak, bytes/bandwidth)
    tokens: int  # tokens produced (decode: batch) or consumed (prefill: batch*context) per forward

    @property
    def intensity(self) -> float:
        return self.ops / self.bytes

    @property
    def roofline_tokens_s(self) -> float:
        return self.tokens / self.floor_s

    def placed(self, seconds: float, bandwidth: float) -> dict:
        """The achieved point of a measured forward time: rate, FLOP/s, bandwidth utilisation."""
        return {
            "tokens_s": self.tokens / seconds,
            "achieved_flops": self.ops / seconds,
            "achieved_bytes_s": self.bytes / seconds,
            "bandwidth_utilisation": self.bytes / seconds / bandwidth,
            "roofline_fraction": self.floor_s / seconds,
            "intensity": self.intensity,
            "roofline_tokens_s": self.roofline_tokens_s,
        }


def phase_roofline(dims: ModelDims, phase: str, batch: int, context: int, peak: float, bandwidth: float,
                   **kw) -> PhaseRoofline:
    costs = layer_costs(dims, phase, batch, context, **kw)
    return PhaseRoofline(
        phase=phase, batch=batch, context=context,
        ops=sum(c.ops * c.count for c in costs), bytes=sum(c.bytes * c.count for c in costs),
        floor_s=sum(c.time_floor(peak, bandwidth) * c.count for c in costs),
        tokens=batch * (context if phase == "prefill" else 1),
    )


def attainable(intensity: float, peak: float, bandwidth: float) -> float:
    """The roof: min(peak, intensity x bandwidth) in ops/s."""
    return min(peak, intensity * bandwidth)
