"""Perplexity under a named protocol.

"gptq" (the GPTQ/AWQ papers' protocol): the evaluation text joined with blank lines, tokenized
once, cut into non-overlapping windows of `seq_len` tokens; every token but the first of a window
is predicted; perplexity = exp(mean token NLL). Uncertainty is the token-level standard error of
the mean NLL carried through exp (delta method), as llama.cpp reports it; tokens within a window
are correlated, so read it as a lower bound. Per-token NLLs are saved for paired comparisons."""

from __future__ import annotations

import hashlib
import json
import math
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field

from harness.errors import HarnessError
from harness.metrics.base import CellContext, Measurement, MeasurementParams, MetricValue


class PerplexityParams(MeasurementParams):
    protocol: Literal["gptq"] = "gptq"
    corpus: str = "boolq-wiki"
    seq_len: int = Field(2048, gt=1)
    max_windows: int | None = Field(None, gt=0, description="cap on windows (None: the whole corpus)")
    batch_size: int = Field(1, gt=0)


def token_nll(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """NLL of ids[:, 1:] under logits[:, :-1], shape (batch, seq-1), float64."""
    logp = F.log_softmax(logits[:, :-1].double(), dim=-1)
    return -logp.gather(-1, ids[:, 1:, None]).squeeze(-1)


def ppl_with_stderr(nll: np.ndarray) -> tuple[float, float]:
    mean = float(nll.mean())
    se = float(nll.std(ddof=1) / math.sqrt(nll.size)) if nll.size > 1 else float("nan")
    ppl = math.exp(mean)
    return ppl, ppl * se


class Perplexity(Measurement):
    name = "perplexity"
    Params = PerplexityParams

    def run(self, ctx: CellContext, params: PerplexityParams) -> list[MetricValue]:
        from harness.data import corpus_info, eval_token_stream

        if ctx.tokenizer is None:
            raise HarnessError(f"perplexity needs a tokenizer; model '{ctx.model_name}' has none")
        max_tokens = params.seq_len * params.max_windows if params.max_windows else None
        stream = eval_token_stream(ctx.tokenizer, params.corpus, max_tokens)
        n_windows = stream.numel() // params.seq_len
        if n_windows == 0:
            raise HarnessError(
                f"corpus '{params.corpus}' has {stream.numel()} tokens, fewer than one window of {params.seq_len}"
            )
        windows = stream[: n_windows * params.seq_len].view(n_windows, params.seq_len)
        nlls = []
        for start in range(0, n_windows, params.batch_size):
            batch = windows[start : start + params.batch_size]
            nlls.append(token_nll(ctx.qmodel.logits(batch).cpu(), batch).flatten())
            ctx.progress(min(start + params.batch_size, n_windows), n_windows, "perplexity windows")
        nll = torch.cat(nlls).numpy()
        if not np.isfinite(nll).all():
            raise HarnessError(f"perplexity: {int((~np.isfinite(nll)).sum())} non-finite token NLLs (model output inf/nan)")
        tokens_sha1 = hashlib.sha1(windows.numpy().tobytes()).hexdigest()
        stem = f"nll-{params.corpus}-{params.seq_len}"
        np.save(ctx.artifact_dir / f"{stem}.npy", nll)
        (ctx.artifact_dir / f"{stem}.json").write_text(json.dumps({"tokens_sha1": tokens_sha1, "n": int(nll.size)}))
        ppl, se = ppl_with_stderr(nll)
        info = corpus_info(params.corpus, "eval")
        detail = {
            **params.model_dump(),
            "windows": n_windows,
            "corpus_sha256": info.get("sha256"),
            "tokens_sha1": tokens_sha1,
        }
        paired = paired_ratio(nll, tokens_sha1, ctx.reference_dir, stem)
        return paired_values(paired, params.protocol, detail) + [
            MetricValue("ppl", ppl, "ppl", n=int(nll.size), uncertainty=se, uncertainty_kind="stderr (token-level, delta method)",
                        protocol=params.protocol, params=detail),
            MetricValue("nll", float(nll.mean()), "nats/token", n=int(nll.size),
                        uncertainty=float(nll.std(ddof=1) / math.sqrt(nll.size)), uncertainty_kind="stderr (token-level)",
                        protocol=params.protocol, params=detail),
        ]


def paired_ratio(nll: np.ndarray, tokens_sha1: str, reference_dir, stem: str) -> dict | None:
    """Paired ln-PPL-ratio against the reference cell's NLLs on the very same tokens, if present."""
    if reference_dir is None:
        return None
    meta, values = reference_dir / f"{stem}.json", reference_dir / f"{stem}.npy"
    if not (meta.exists() and values.exists()):
        return None
    if json.loads(meta.read_text()).get("tokens_sha1") != tokens_sha1:
        return None  # not the same tokens: no pairing
    diff = nll - np.load(values)
    ln_ratio = float(diff.mean())
    se = float(diff.std(ddof=1) / math.sqrt(diff.size)) if diff.size > 1 else float("nan")
    return {"ln_ratio": ln_ratio, "ln_se": se, "n": int(diff.size), "reference_cell": reference_dir.name}


def paired_values(paired: dict | None, protocol: str, detail: dict) -> list[MetricValue]:
    if paired is None:
        return []
    ratio = math.exp(paired["ln_ratio"])
    params = {**detail, "reference_cell": paired["reference_cell"]}
    kind = "stderr (paired per-token differences vs the reference, delta method)"
    return [
        MetricValue("ppl_ratio", ratio, "x", n=paired["n"], uncertainty=ratio * paired["ln_se"],
                    uncertainty_kind=kind, protocol=protocol, params=params),
        MetricValue("ln_ppl_ratio", paired["ln_ratio"], "nats/token", n=paired["n"], uncertainty=paired["ln_se"],
                    uncertainty_kind="stderr (paired per-token differences vs the reference)", protocol=protocol, params=params),
    ]
