"""Perplexity under a named protocol; each protocol is one function in PROTOCOLS.

"gptq" (the GPTQ/AWQ papers' protocol): the evaluation text joined with blank lines, tokenized
once, cut into non-overlapping windows of `seq_len` tokens; every token but the first of a window
is predicted; perplexity = exp(mean token NLL).

"lm-eval" (lm-evaluation-harness, `loglikelihood_rolling`): each document on its own, prefixed
with the BOS token (EOS if none) and cut into lm-eval's disjoint rolling windows of `seq_len`
(`get_rolling_token_windows(context_len=1)` + `make_disjoint_window`): every token of the document
is predicted exactly once. Adds lm-eval's word_perplexity = exp(sum NLL / words),
byte_perplexity = exp(sum NLL / UTF-8 bytes) and bits_per_byte = sum NLL / bytes / ln 2.

"llama.cpp" (tools/perplexity/perplexity.cpp): the joined text tokenized once (BOS first if the
tokenizer adds one), cut into chunks of n_ctx = `seq_len` tokens (default 512), the first token of
each chunk replaced by BOS (if the tokenizer adds one), and only the second half scored: logits at
positions n_ctx/2 .. n_ctx-2 predict the next token, n_ctx - 1 - n_ctx/2 tokens per chunk.

Uncertainty is the token-level standard error of the mean NLL carried through exp (delta method),
as llama.cpp reports it; tokens within a window are correlated, so read it as a lower bound. The
word/byte metrics carry a document-level ratio-estimator error. Per-token NLLs are saved for
paired comparisons with the reference cell (same protocol, same tokens)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field

from harness.errors import HarnessError
from harness.metrics.base import CellContext, Measurement, MeasurementParams, MetricValue
from harness.metrics.meaning import quality
from harness.metrics.paired import MDE_PROTOCOL, stderr_mde
from harness.metrics.scoring import BatchTokens, Row
from harness.models.corpora import corpus_info, eval_token_stream, load_texts

Protocol = Literal["gptq", "lm-eval", "llama.cpp"]
DEFAULT_SEQ_LEN: dict[str, int] = {"gptq": 2048, "lm-eval": 2048, "llama.cpp": 512}


class PerplexityParams(MeasurementParams):
    protocol: Protocol = "gptq"
    corpus: str = "boolq-wiki"
    seq_len: int | None = Field(None, gt=1, description="window / context length (None: the protocol's default)")
    max_windows: int | None = Field(
        None, gt=0,
        description="cap (None: the whole corpus): gptq windows, llama.cpp chunks; lm-eval: whole documents up to "
                    "seq_len * max_windows tokens")
    batch_tokens: BatchTokens = Field("auto", description="padded tokens per forward pass ('auto': sized to the device)")

    def resolved_seq_len(self) -> int:
        return self.seq_len or DEFAULT_SEQ_LEN[self.protocol]


def token_nll(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """NLL of ids[:, 1:] under logits[:, :-1], shape (batch, seq-1), float64 on the host: the
    plain definition, kept as the check of the device scorer (harness/metrics/scoring.py)."""
    logp = F.log_softmax(logits[:, :-1].double(), dim=-1)
    return -logp.gather(-1, ids[:, 1:, None]).squeeze(-1)


def ppl_with_stderr(nll: np.ndarray) -> tuple[float, float]:
    mean = float(nll.mean())
    se = float(nll.std(ddof=1) / math.sqrt(nll.size)) if nll.size > 1 else float("nan")
    ppl = math.exp(mean)
    return ppl, ppl * se


@dataclass
class Scored:
    """What a protocol returns: the NLL of every scored token (in a fixed order), a fingerprint of
    the scored token ids (pairs runs on the same tokens), and protocol-specific values/details."""

    nll: np.ndarray
    tokens_sha1: str
    detail: dict = field(default_factory=dict)
    extra: list[MetricValue] = field(default_factory=list)


def _sha1(*arrays) -> str:
    h = hashlib.sha1()
    for a in arrays:
        h.update(np.asarray(a, dtype=np.int64).tobytes())
    return h.hexdigest()


def _window_nll(ctx: CellContext, windows: torch.Tensor, first_scored: int, params: PerplexityParams,
                what: str) -> np.ndarray:
    """NLL of every scored token of every window, window after window (float64)."""
    scores = ctx.scorer.windows(windows, first_scored, params.batch_tokens, what)
    return np.concatenate([s.nll for s in scores])


def _gptq(ctx: CellContext, params: PerplexityParams) -> Scored:
    seq_len = params.resolved_seq_len()
    max_tokens = seq_len * params.max_windows if params.max_windows else None
    stream = eval_token_stream(ctx.tokenizer, params.corpus, max_tokens)
    n_windows = stream.numel() // seq_len
    if n_windows == 0:
        raise HarnessError(f"corpus '{params.corpus}' has {stream.numel()} tokens, fewer than one window of {seq_len}")
    windows = stream[: n_windows * seq_len].view(n_windows, seq_len)
    nll = _window_nll(ctx, windows, 0, params, "perplexity windows")
    return Scored(nll, hashlib.sha1(windows.numpy().tobytes()).hexdigest(), {"windows": n_windows})


# --- lm-eval -----------------------------------------------------------------------------------------

def rolling_windows(tokens: list[int], prefix_token: int, max_seq_len: int) -> list[tuple[list[int], list[int]]]:
    """lm-eval's get_rolling_token_windows(context_len=1) followed by make_disjoint_window:
    (context, continuation) pairs whose continuations cover `tokens` once, in order."""
    if not tokens:
        return []
    first = min(max_seq_len, len(tokens))
    pairs = [([prefix_token] + tokens[: first - 1], tokens[:first])]
    predicted = first
    while predicted < len(tokens):
        n_pred = min(len(tokens) - predicted, max_seq_len)  # pred_len = max_seq_len - context_len + 1
        end = predicted + n_pred
        pairs.append((tokens[end - max_seq_len - 1 : end - 1], tokens[end - n_pred : end]))
        predicted += n_pred
    return [(ctx_[: len(ctx_) - (len(cont) - 1)], cont) for ctx_, cont in pairs]


def count_words(doc: str) -> int:
    """lm-eval's Task.count_words."""
    return len(re.split(r"\s+", doc))


def ratio_stderr(num: np.ndarray, den: np.ndarray) -> float:
    """Standard error of sum(num)/sum(den) over independent units (delta method)."""
    n = num.size
    if n < 2:
        return float("nan")
    r = num.sum() / den.sum()
    return float(np.sqrt(((num - r * den) ** 2).sum() / (n * (n - 1))) / den.mean())


def _token_ids(tok, texts: list[str], batch: int = 256):
    """(text, token ids) of each text, lazily: a fast tokenizer takes a batch in one call (the
    2,638 boolq-wiki eval passages with SmolLM2's tokenizer on 2 cores: 0.37 s, one by one 0.82 s),
    on all the machine's cores (see `tokenizer_threads`)."""
    step = batch if getattr(tok, "is_fast", False) else 1
    for start in range(0, len(texts), step):
        chunk = texts[start:start + step]
        with tokenizer_threads():
            ids = tok(chunk, add_special_tokens=False)["input_ids"] if step > 1 else [tok(chunk[0], add_special_tokens=False)["input_ids"]]
        yield from zip(chunk, ids)


@contextlib.contextmanager
def tokenizer_threads():
    """A fast tokenizer's batch call on its own thread pool: the harness sets
    TOKENIZERS_PARALLELISM=false for the process (no fork warnings, no pool beside the model's
    threads), which made tokenizing single-threaded: ~0.4 s of a 7B scoring pass on the H200 that
    takes ~11 s. Results are the same either way (each text is encoded on its own)."""
    before = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = before


def _lm_eval(ctx: CellContext, params: PerplexityParams) -> Scored:
    seq_len = params.resolved_seq_len()
    tok = ctx.tokenizer
    prefix = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    if prefix is None:
        raise HarnessError("perplexity protocol lm-eval needs a BOS or EOS token as the rolling-window prefix")
    budget = seq_len * params.max_windows if params.max_windows else None
    docs: list[str] = []
    all_ids: list[list[int]] = []
    used = 0
    for doc, ids in _token_ids(tok, load_texts(params.corpus, "eval")):
        if budget is not None and docs and used + len(ids) > budget:
            break
        docs.append(doc)
        all_ids.append(ids)
        used += len(ids)
    rows = [(k, (context + cont)[-(seq_len + 1):][:-1], cont)
            for k, ids in enumerate(all_ids) for context, cont in rolling_windows(ids, prefix, seq_len)]
    scored = [s.nll for s in ctx.scorer.rows([Row.of(r, c) for _, r, c in rows], params.batch_tokens, "perplexity windows")]
    n_windows = len(rows)
    nll = np.concatenate(scored)  # rows are in document order, windows in text order
    doc_nll = np.bincount([k for k, _, _ in rows], weights=[part.sum() for part in scored], minlength=len(docs))
    words = [count_words(d) for d in docs]
    nbytes = [len(d.encode("utf-8")) for d in docs]
    total, doc_nll_a = float(nll.sum()), doc_nll
    w, b = np.asarray(words, dtype=np.float64), np.asarray(nbytes, dtype=np.float64)
    detail = {"documents": len(docs), "windows": n_windows, "words": int(w.sum()), "bytes": int(b.sum()),
              "prefix_token": int(prefix)}
    per_word, per_byte = total / w.sum(), total / b.sum()
    se_w, se_b = ratio_stderr(doc_nll_a, w), ratio_stderr(doc_nll_a, b)
    kind = "stderr (document-level ratio estimator, delta method)"
    extra = [
        MetricValue("word_perplexity", math.exp(per_word), "ppl/word", n=len(docs), uncertainty=math.exp(per_word) * se_w,
                    uncertainty_kind=kind, protocol="lm-eval"),
        MetricValue("byte_perplexity", math.exp(per_byte), "ppl/byte", n=len(docs), uncertainty=math.exp(per_byte) * se_b,
                    uncertainty_kind=kind, protocol="lm-eval"),
        MetricValue("bits_per_byte", per_byte / math.log(2), "bits/byte", n=len(docs), uncertainty=se_b / math.log(2),
                    uncertainty_kind=kind, protocol="lm-eval"),
    ]
    return Scored(nll, _sha1(*all_ids, [len(i) for i in all_ids]), detail, extra)


# --- llama.cpp ---------------------------------------------------------------------------------------

def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer puts BOS in front by default (llama.cpp's llama_vocab_get_add_bos)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == bos


def llama_cpp_chunks(text_ids: torch.Tensor, n_ctx: int, bos: int | None) -> torch.Tensor:
    """perplexity.cpp's chunks: tokens = [BOS] + text (if BOS), n_chunk = len // n_ctx, and the
    first token of every chunk overwritten by BOS (if BOS)."""
    tokens = torch.cat([torch.tensor([bos]), text_ids]) if bos is not None else text_ids
    n_chunk = tokens.numel() // n_ctx
    chunks = tokens[: n_chunk * n_ctx].view(n_chunk, n_ctx).clone()
    if bos is not None:
        chunks[:, 0] = bos
    return chunks


def _llama_cpp(ctx: CellContext, params: PerplexityParams) -> Scored:
    n_ctx = params.resolved_seq_len()
    bos = ctx.tokenizer.bos_token_id if adds_bos(ctx.tokenizer) else None
    max_tokens = n_ctx * params.max_windows - (bos is not None) if params.max_windows else None
    chunks = llama_cpp_chunks(eval_token_stream(ctx.tokenizer, params.corpus, max_tokens), n_ctx, bos)
    if chunks.shape[0] == 0:
        raise HarnessError(f"corpus '{params.corpus}' has fewer tokens than one llama.cpp chunk of {n_ctx}")
    first = n_ctx // 2
    nll = _window_nll(ctx, chunks, first, params, "perplexity chunks")
    return Scored(nll, hashlib.sha1(chunks.numpy().tobytes()).hexdigest(),
                  {"chunks": int(chunks.shape[0]), "bos": bos, "first_scored": first})


PROTOCOLS: dict[str, Callable[[CellContext, PerplexityParams], Scored]] = {
    "gptq": _gptq,
    "lm-eval": _lm_eval,
    "llama.cpp": _llama_cpp,
}


class Perplexity(Measurement):
    name = "perplexity"
    metrics = (quality("ppl", -1, headline="Perplexity", samples="tokens"),
               quality("nll", -1, restates="ppl"),
               quality("ppl_ratio", -1), quality("ln_ppl_ratio", -1, restates="ppl_ratio"),
               quality("word_perplexity", -1), quality("byte_perplexity", -1), quality("bits_per_byte", -1))
    Params = PerplexityParams

    def run(self, ctx: CellContext, params: PerplexityParams) -> list[MetricValue]:
        if ctx.tokenizer is None:
            raise HarnessError(f"perplexity needs a tokenizer; model '{ctx.model_name}' has none")
        seq_len = params.resolved_seq_len()
        scored = PROTOCOLS[params.protocol](ctx, params)
        nll = scored.nll
        if not np.isfinite(nll).all():
            raise HarnessError(f"perplexity: {int((~np.isfinite(nll)).sum())} non-finite token NLLs (model output inf/nan)")
        # gptq keeps its historical artifact name, so older reference cells still pair
        corpus = re.sub(r"[^A-Za-z0-9._-]+", "_", params.corpus)  # file:PATH corpora name a file, not a folder
        stem = f"nll-{corpus}-{seq_len}" if params.protocol == "gptq" else f"nll-{params.protocol}-{corpus}-{seq_len}"
        np.save(ctx.artifact_dir / f"{stem}.npy", nll)
        (ctx.artifact_dir / f"{stem}.json").write_text(json.dumps({"tokens_sha1": scored.tokens_sha1, "n": int(nll.size)}))
        ppl, se = ppl_with_stderr(nll)
        info = corpus_info(params.corpus, "eval")
        detail = {
            **params.model_dump(),
            "seq_len": seq_len,
            **scored.detail,
            "corpus_sha256": info.get("sha256"),
            "tokens_sha1": scored.tokens_sha1,
        }
        for value in scored.extra:
            value.params = {**detail, **value.params}
        paired = paired_ratio(nll, scored.tokens_sha1, ctx.reference_dir, stem)
        return paired_values(paired, params.protocol, detail) + [
            MetricValue("ppl", ppl, "ppl", n=int(nll.size), uncertainty=se, uncertainty_kind="stderr (token-level, delta method)",
                        protocol=params.protocol, params=detail),
            MetricValue("nll", float(nll.mean()), "nats/token", n=int(nll.size),
                        uncertainty=float(nll.std(ddof=1) / math.sqrt(nll.size)), uncertainty_kind="stderr (token-level)",
                        protocol=params.protocol, params=detail),
        ] + scored.extra


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
    mde = stderr_mde(paired["ln_se"])
    params = {**detail, "reference_cell": paired["reference_cell"], "mde": None if mde is None else math.expm1(mde),
              "mde_unit": "relative change of the ratio", "mde_protocol": MDE_PROTOCOL}
    kind = "stderr (paired per-token differences vs the reference, delta method)"
    return [
        MetricValue("ppl_ratio", ratio, "x", n=paired["n"], uncertainty=ratio * paired["ln_se"],
                    uncertainty_kind=kind, protocol=protocol, params=params),
        MetricValue("ln_ppl_ratio", paired["ln_ratio"], "nats/token", n=paired["n"], uncertainty=paired["ln_se"],
                    uncertainty_kind="stderr (paired per-token differences vs the reference)", protocol=protocol, params=params),
    ]
