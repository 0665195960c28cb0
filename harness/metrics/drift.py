"""Long-sequence drift: does quantization error grow with context position, and how soon does
free-running generation leave the reference's path?

Teacher-forced: both models read the same windows of `seq_len` tokens (the reference's
log-probabilities stored by the reference cell, as for `divergence`); per predicted token the
KL(P_ref || P_q) and top-1 agreement, pooled into position buckets of `bucket` tokens. A predicted token's position is its index in the window
(1 .. seq_len-1), so the first bucket [0, bucket) holds bucket-1 tokens.

Free-running: greedy decoding (`module.generate(do_sample=False, **qmodel.generate_kwargs)`, the
prompts batched: they have equal length, so no padding; under `QuantizedModel.evaluating`, where an
adapter may decode more cheaply with the same logits (rtn: weights dequantized once per call, so
drift's wall time is not that backend's decode speed: `llm-perf` measures that); llama.cpp decodes on its own KV cache,
`QuantizedModel.greedy_continuations`; other models without a `generate` take the argmax of their
logits, recomputed each step) from the same prompts with both models (the reference cell stores its continuations in
`drift-greedy-<key>.json`); the first generated position whose token differs (or where
only one model stopped) is that prompt's divergence point. A prompt that never diverges within
`new_tokens` is censored at `new_tokens`: percentiles count it there, and the fraction of such
prompts is reported on its own.

Per-bucket values are one MetricValue per bucket named `<metric>@pos`, with the bucket's
[pos_lo, pos_hi) in params (the report's drift section draws curves from them; the "@" marks
per-slice values that stay out of the cell table)."""

from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import torch
from pydantic import Field

from harness.errors import HarnessError
from harness.metrics.base import CellContext, Measurement, MeasurementParams, MetricValue
from harness.metrics.meaning import MetricSpec, quality
from harness.metrics.divergence import STORED, token_divergence
from harness.metrics.scoring import BatchTokens
from harness.models.corpora import eval_token_stream

FIRST_DIVERGENCE_PERCENTILES = (10, 25, 50, 75, 90)
CHUNK = 256  # positions per KLD chunk: float64 log-softmax over the vocabulary is large


class DriftParams(MeasurementParams):
    corpus: str = "boolq-wiki"
    seq_len: int = Field(1024, gt=1, description="teacher-forced horizon in tokens (<= the model's context)")
    max_windows: int = Field(1, gt=0)
    bucket: int = Field(128, gt=0, description="width of a position bucket in tokens")
    prompts: int = Field(4, ge=0, description="free-running prompts (0: no generation)")
    prompt_len: int = Field(32, gt=0)
    new_tokens: int = Field(64, gt=0)
    batch_tokens: BatchTokens = Field("auto", description="padded tokens per forward pass ('auto': sized to the device)")


def positional_divergence(ref_logits: torch.Tensor, q_logits: torch.Tensor, ids: torch.Tensor):
    """(kld, agree) of shape (batch, seq-1), position t-1 holding the prediction of token t, from
    both models' logits in float64 (the plain definition; runs use the stored reference);
    computed in chunks of positions so a long window never needs the whole float64 vocabulary."""
    seq = ids.shape[1]
    klds, agrees = [], []
    for lo in range(0, seq - 1, CHUNK):
        hi = min(lo + CHUNK, seq - 1)
        sl = slice(lo, hi + 1)  # one extra position: token_divergence predicts ids[:, 1:]
        kld, agree, _ = token_divergence(ref_logits[:, sl], q_logits[:, sl], ids[:, sl])
        klds.append(kld.view(ids.shape[0], -1))
        agrees.append(agree.view(ids.shape[0], -1))
    return torch.cat(klds, 1), torch.cat(agrees, 1)


def bucket_values(kld: np.ndarray, agree: np.ndarray, bucket: int, detail: dict) -> list[MetricValue]:
    """Per-bucket mean KLD (token-level stderr) and top-1 agreement (binomial stderr); kld and
    agree are (windows, seq-1) with column j the prediction of token position j+1."""
    positions = np.arange(1, kld.shape[1] + 1)
    out = []
    for lo in range(0, int(positions[-1]) + 1, bucket):
        cols = (positions >= lo) & (positions < lo + bucket)
        k, a = kld[:, cols].ravel(), agree[:, cols].ravel().astype(np.float64)
        n = int(k.size)
        if n == 0:
            continue
        p = {**detail, "pos_lo": lo, "pos_hi": lo + bucket}
        top1 = float(a.mean())
        out += [
            MetricValue("kld_mean@pos", float(k.mean()), "nats", n=n,
                        uncertainty=float(k.std(ddof=1) / math.sqrt(n)) if n > 1 else None,
                        uncertainty_kind="stderr (token-level)", protocol="drift teacher-forced", params=p),
            MetricValue("top1_agreement@pos", top1, "fraction", n=n, uncertainty=math.sqrt(top1 * (1 - top1) / n),
                        uncertainty_kind="stderr (binomial)", protocol="drift teacher-forced", params=p),
        ]
    return out


def first_divergence(ref: list[int], q: list[int], limit: int) -> int | None:
    """Index of the first generated token that differs (a stop on one side only counts as a
    difference there); None if the two agree on every token either produced (censored)."""
    for i in range(min(len(ref), len(q), limit)):
        if ref[i] != q[i]:
            return i
    if len(ref) != len(q) and min(len(ref), len(q)) < limit:
        return min(len(ref), len(q))
    return None


def greedy(qmodel, prompts: torch.Tensor, new_tokens: int, eos: int | None) -> tuple[list[list[int]], str]:
    """Greedy continuations of prompts (k, len) of equal length (no padding needed, so one
    batched `generate` gives each row what it would alone, up to float rounding), each cut after
    its first EOS; and how they were produced."""
    native = qmodel.greedy_continuations(prompts, new_tokens, eos)
    if native is not None:
        return native, "the runtime's own decoding (KV cache)"
    module = qmodel.module
    if callable(getattr(module, "generate", None)):
        with torch.no_grad(), qmodel.evaluating():  # not inference_mode: quanto's packed weights refuse it
            out = module.generate(input_ids=prompts.to(qmodel.device), attention_mask=torch.ones_like(prompts).to(qmodel.device),
                                  max_new_tokens=new_tokens, do_sample=False, num_beams=1,
                                  pad_token_id=eos, **qmodel.generate_kwargs)
        rows = [row[prompts.shape[1]:].tolist() for row in out]
        return [row[: row.index(eos) + 1] if eos in row else row for row in rows], "module.generate (prompts batched)"
    continuations = []
    for prompt in prompts:
        ids, tokens = prompt[None], []
        for _ in range(new_tokens):  # no KV cache: full recompute per step (short horizons only)
            nxt = int(qmodel.logits(ids)[0, -1].argmax())
            tokens.append(nxt)
            if nxt == eos:
                break
            ids = torch.cat([ids, torch.tensor([[nxt]])], 1)
        continuations.append(tokens)
    return continuations, "argmax of logits, recomputed each step (no generate, no KV cache)"


def generation_values(positions: list[int | None], new_tokens: int, detail: dict) -> list[MetricValue]:
    n = len(positions)
    censored = np.array([new_tokens if p is None else p for p in positions], dtype=np.float64)
    never = sum(p is None for p in positions) / n
    proto = f"drift free-running greedy (censored at {new_tokens})"
    p = {**detail, "first_divergence": [None if x is None else int(x) for x in positions]}
    out = [MetricValue("never_diverged_fraction", never, "fraction", n=n, uncertainty=math.sqrt(never * (1 - never) / n),
                       uncertainty_kind="stderr (binomial)", protocol=proto, params=p)]
    out += [MetricValue(f"first_divergence_p{q}", float(np.percentile(censored, q)), "tokens", n=n, protocol=proto, params=p)
            for q in FIRST_DIVERGENCE_PERCENTILES]
    return out


def model_context(qmodel) -> int | None:
    config = getattr(qmodel.module, "config", None)
    return getattr(config, "max_position_embeddings", None)


class Drift(Measurement):
    name = "drift"
    metrics = (quality("kld_mean@pos", -1), quality("top1_agreement@pos", +1), quality("never_diverged_fraction", +1),
               MetricSpec("first_divergence_p*", +1, "diagnostic", detail=True))
    Params = DriftParams

    def _stream(self, ctx: CellContext, params: DriftParams) -> torch.Tensor:
        context = model_context(ctx.qmodel)
        longest = max(params.seq_len, params.prompt_len + params.new_tokens)
        if context and longest > context:
            raise HarnessError(f"drift: {longest} tokens exceed the context of {ctx.model_name} ({context}); lower seq_len")
        need = max(params.seq_len * params.max_windows, params.prompts * params.prompt_len)
        return eval_token_stream(ctx.tokenizer, params.corpus, need)

    def reference_windows(self, ctx: CellContext, params: DriftParams) -> torch.Tensor:
        stream = self._stream(ctx, params)
        n_windows = min(params.max_windows, stream.numel() // params.seq_len)
        if n_windows == 0:
            raise HarnessError(f"drift: corpus '{params.corpus}' has fewer than {params.seq_len} tokens")
        return stream[: n_windows * params.seq_len].view(n_windows, params.seq_len)

    def _prompts(self, ctx: CellContext, params: DriftParams) -> torch.Tensor:
        """(prompts, prompt_len): consecutive slices of the eval stream."""
        stream = self._stream(ctx, params)
        if stream.numel() < params.prompts * params.prompt_len:
            raise HarnessError(f"drift: corpus '{params.corpus}' has too few tokens for {params.prompts} prompts")
        return stream[: params.prompts * params.prompt_len].view(params.prompts, params.prompt_len)

    @staticmethod
    def _greedy_file(prompts: torch.Tensor, params: DriftParams, eos: int | None) -> str:
        key = hashlib.sha1(json.dumps([prompts.tolist(), params.new_tokens, eos]).encode()).hexdigest()
        return f"drift-greedy-{key[:16]}.json"

    def run(self, ctx: CellContext, params: DriftParams) -> list[MetricValue]:
        if ctx.reference_dir is None and not ctx.is_reference:
            return []  # a suite without a reference
        windows = self.reference_windows(ctx, params)
        prompts = self._prompts(ctx, params)
        eos = getattr(ctx.tokenizer, "eos_token_id", None)
        greedy_file = self._greedy_file(prompts, params, eos)
        steps = 2
        if ctx.is_reference:  # store what comparing cells read: log-probabilities, greedy continuations
            ctx.scorer.windows(windows, 0, params.batch_tokens, "drift windows (reference)")
            tokens, how = greedy(ctx.qmodel, prompts, params.new_tokens, eos) if params.prompts else ([], "")
            ctx.progress(2, steps, "drift generation (reference)")
            (ctx.artifact_dir / greedy_file).write_text(json.dumps({"new_tokens": params.new_tokens, "eos": eos,
                                                                    "continuations": [{"tokens": t, "decoding": how}
                                                                                      for t in tokens]}))
            return []
        detail = {**params.model_dump(), "windows": int(windows.shape[0]), "reference": STORED,
                  "reference_cell": ctx.reference_dir.name if ctx.reference_dir else None}
        scores = ctx.scorer.windows(windows, 0, params.batch_tokens, "drift windows", need_reference=True)
        kld = np.stack([s.kld for s in scores])
        if not np.isfinite(kld).all():
            raise HarnessError(f"drift: {int((~np.isfinite(kld)).sum())} non-finite token KLDs (model output inf/nan)")
        out = bucket_values(kld, np.stack([s.top1 for s in scores]), params.bucket, detail)
        ctx.progress(1, steps, "drift windows")

        if params.prompts:
            stored = ctx.reference_dir / greedy_file
            if not stored.is_file():
                raise HarnessError(f"drift: the reference cell stored no greedy continuations for these prompts "
                                   f"({stored}); did it run with the same drift parameters?")
            reference = json.loads(stored.read_text())["continuations"]
            q_tokens, how_q = greedy(ctx.qmodel, prompts, params.new_tokens, eos)
            positions = [first_divergence(ref["tokens"], q, params.new_tokens) for ref, q in zip(reference, q_tokens)]
            ctx.progress(2, steps, "drift generation")
            how = sorted({ref["decoding"] for ref in reference} | {how_q})
            out += generation_values(positions, params.new_tokens, {**detail, "decoding": how})
        return out
