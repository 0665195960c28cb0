"""Divergence from the reference model, token by token, as llama.cpp's --kl-divergence: the
reference cell stores its log-probabilities over the whole vocabulary for these windows (16 bits
a vocabulary entry, harness/metrics/scoring.py), and every comparing cell scores the same windows
against them on its own device, without loading the reference model.

Per predicted token: KL(P_ref || P_q) over the full vocabulary, whether the two argmax tokens
agree (top-1 agreement), and delta-p = P_q(correct) - P_ref(correct). Reported: mean KLD with its
standard error and percentiles, top-1 agreement with a binomial standard error, delta-p mean, RMS
and percentiles. Token-level errors treat tokens as independent: read them as lower bounds. The
stored reference changes mean KLD by at most 0.001% against the float64 live computation on the
embedded model (benchmarks/results/reference-store/)."""

from __future__ import annotations

import math

import numpy as np
import torch
from pydantic import Field

from harness.errors import HarnessError
from harness.metrics.base import CellContext, Measurement, MeasurementParams, MetricValue
from harness.metrics.meaning import MetricSpec, quality
from harness.metrics.paired import MDE_PROTOCOL, stderr_mde
from harness.metrics.scoring import BatchTokens
from harness.models.corpora import eval_token_stream

KLD_PERCENTILES = (99.9, 99, 95, 90, 50, 10, 5, 1)
DELTA_P_PERCENTILES = (99, 95, 50, 5, 1)


STORED = "stored reference log-probabilities (16-bit, full vocabulary)"


class DivergenceParams(MeasurementParams):
    corpus: str = "boolq-wiki"
    seq_len: int = Field(512, gt=1)
    max_windows: int | None = Field(8, gt=0)
    batch_tokens: BatchTokens = Field("auto", description="padded tokens per forward pass ('auto': sized to the device)")


def token_divergence(ref_logits: torch.Tensor, q_logits: torch.Tensor, ids: torch.Tensor):
    """(kld, top1_agree, delta_p) per predicted token for logits (batch, seq, vocab), ids (batch,
    seq), float64 on the host: the plain definition, kept as the check of the stored-reference
    path (harness/metrics/scoring.py)."""
    ref_lp = torch.log_softmax(ref_logits[:, :-1].double(), dim=-1)
    q_lp = torch.log_softmax(q_logits[:, :-1].double(), dim=-1)
    kld = (ref_lp.exp() * (ref_lp - q_lp)).sum(-1).clamp_min(0.0)  # rounding can dip just below 0
    agree = ref_lp.argmax(-1) == q_lp.argmax(-1)
    target = ids[:, 1:, None]
    delta_p = q_lp.gather(-1, target).exp().squeeze(-1) - ref_lp.gather(-1, target).exp().squeeze(-1)
    return kld.flatten(), agree.flatten(), delta_p.flatten()


def summarize(kld: np.ndarray, agree: np.ndarray, delta_p: np.ndarray, detail: dict) -> list[MetricValue]:
    n = int(kld.size)
    sem = lambda x: float(x.std(ddof=1) / math.sqrt(x.size)) if x.size > 1 else float("nan")  # noqa: E731
    top1 = float(agree.mean())
    out = [
        MetricValue("kld_mean", float(kld.mean()), "nats", n=n, uncertainty=sem(kld), uncertainty_kind="stderr (token-level)",
                    protocol="kld", params={**detail, "mde": stderr_mde(sem(kld)), "mde_unit": "nats",
                                           "mde_protocol": MDE_PROTOCOL}),
        MetricValue("top1_agreement", top1, "fraction", n=n, uncertainty=math.sqrt(top1 * (1 - top1) / n),
                    uncertainty_kind="stderr (binomial)", protocol="kld", params=detail),
        MetricValue("delta_p_mean", float(delta_p.mean()), "probability", n=n, uncertainty=sem(delta_p),
                    uncertainty_kind="stderr (token-level)", protocol="kld", params=detail),
        MetricValue("delta_p_rms", float(np.sqrt((delta_p**2).mean())), "probability", n=n, protocol="kld", params=detail),
    ]
    out += [MetricValue(f"kld_p{q:g}", float(np.percentile(kld, q)), "nats", n=n, protocol="kld", params=detail)
            for q in KLD_PERCENTILES]
    out += [MetricValue(f"delta_p_p{q:g}", float(np.percentile(delta_p, q)), "probability", n=n, protocol="kld",
                        params=detail) for q in DELTA_P_PERCENTILES]
    return out


def eval_windows(ctx: CellContext, corpus: str, seq_len: int, max_windows: int | None, who: str) -> torch.Tensor:
    """(n, seq_len) consecutive windows from the start of the corpus's eval split."""
    max_tokens = seq_len * max_windows if max_windows else None
    stream = eval_token_stream(ctx.tokenizer, corpus, max_tokens)
    n_windows = stream.numel() // seq_len
    if n_windows == 0:
        raise HarnessError(f"{who}: corpus '{corpus}' has fewer than {seq_len} tokens")
    return stream[: n_windows * seq_len].view(n_windows, seq_len)


class Divergence(Measurement):
    name = "divergence"
    metrics = (quality("kld_mean", -1, headline="Mean KL divergence from the reference", samples="tokens"),
               quality("top1_agreement", +1), quality("delta_p_mean", 0), quality("delta_p_rms", -1),
               MetricSpec("kld_p*", -1, "diagnostic", detail=True), MetricSpec("delta_p_p*", 0, "diagnostic", detail=True))
    Params = DivergenceParams

    def reference_windows(self, ctx: CellContext, params: DivergenceParams) -> torch.Tensor:
        return eval_windows(ctx, params.corpus, params.seq_len, params.max_windows, self.name)

    def run(self, ctx: CellContext, params: DivergenceParams) -> list[MetricValue]:
        if ctx.reference_dir is None and not ctx.is_reference:
            return []  # a suite without a reference
        windows = self.reference_windows(ctx, params)
        if ctx.is_reference:  # scoring them records the reference's log-probabilities
            ctx.scorer.windows(windows, 0, params.batch_tokens, "divergence windows (reference)")
            return []
        scores = ctx.scorer.windows(windows, 0, params.batch_tokens, "divergence windows", need_reference=True)
        kld = np.concatenate([s.kld for s in scores])
        if not np.isfinite(kld).all():
            raise HarnessError(f"divergence: {int((~np.isfinite(kld)).sum())} non-finite token KLDs (model output inf/nan)")
        detail = {**params.model_dump(), "windows": int(windows.shape[0]), "reference": STORED,
                  "reference_cell": ctx.reference_dir.name if ctx.reference_dir else None}
        return summarize(kld, np.concatenate([s.top1 for s in scores]).astype(np.float64),
                         np.concatenate([s.delta_p for s in scores]), detail)
