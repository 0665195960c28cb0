"""Image-classifier quality on the model's held-out test split (harness.models.vision), against the float
reference on the very same images.

- `accuracy`: top-1 accuracy on the test split (never trained or calibrated on), with its binomial
  standard error sqrt(p(1-p)/n), n and the Wilson 95% interval in params;
- for every cell but the reference, paired with the reference's predictions on the same images:
  `agreement` (top-1 prediction equal to the reference's; binomial stderr, Wilson interval),
  `accuracy_delta` (cell - reference; stderr of the paired per-image differences, McNemar's exact
  p, the minimum detectable effect), `flip_rate` (images whose correctness flipped, either way)
  and `kld_mean` (mean KL(reference || cell) of the softmax over the 10 classes, nats; stderr).

The reference cell saves its logits (`classification.npz`, with a hash of the images); comparing
cells read them, or run the reference live when its folder has none (same images checked)."""

from __future__ import annotations

import hashlib
import math
from typing import Literal

import numpy as np
import torch
from pydantic import Field

from harness.errors import HarnessError
from harness.metrics.base import CellContext, Measurement, MeasurementParams, MetricValue
from harness.metrics.meaning import quality
from harness.metrics.paired import MDE_PROTOCOL, accuracy_mde, flips, wilson
from harness.models.vision import dataset_of
from harness.models.zoo import resolve_model

PROTOCOL = "top-1 on the held-out test split (hash split of the training recipe)"
FILE = "classification.npz"


class ClassificationParams(MeasurementParams):
    split: Literal["test"] = "test"  # only the held-out split is scored
    batch_size: int = Field(256, gt=0)


def predict(qmodel, images: torch.Tensor, batch_size: int, progress=None) -> np.ndarray:
    out = []
    for start in range(0, images.shape[0], batch_size):
        out.append(qmodel.classify(images[start:start + batch_size]).float().cpu().numpy())
        if progress:
            progress(min(start + batch_size, images.shape[0]), images.shape[0], "classifying test images")
    logits = np.concatenate(out)
    if not np.isfinite(logits).all():
        raise HarnessError("classification: the model produced non-finite logits")
    return logits


def _sem(x: np.ndarray) -> float:
    return float(x.std(ddof=1) / math.sqrt(x.size)) if x.size > 1 else float("nan")


def _binomial(metric: str, hits: np.ndarray, detail: dict, protocol: str) -> MetricValue:
    n, k = int(hits.size), int(hits.sum())
    p = k / n
    lo, hi = wilson(k, n)
    return MetricValue(metric, p, "fraction", n=n, uncertainty=math.sqrt(p * (1 - p) / n),
                       uncertainty_kind="binomial stderr sqrt(p(1-p)/n)", protocol=protocol,
                       params={**detail, "correct": k, "wilson95": [lo, hi]})


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(1, keepdims=True)
    return x - np.log(np.exp(x).sum(1, keepdims=True))


def paired_values(logits: np.ndarray, ref_logits: np.ndarray, labels: np.ndarray, detail: dict) -> list[MetricValue]:
    ours, theirs = logits.argmax(1), ref_logits.argmax(1)
    correct, ref_correct = ours == labels, theirs == labels
    f = flips(ref_correct, correct)
    diff = correct.astype(np.float64) - ref_correct.astype(np.float64)
    ref_logp, logp = log_softmax(ref_logits), log_softmax(logits)
    kld = (np.exp(ref_logp) * (ref_logp - logp)).sum(1)
    paired = "stderr (paired per-image differences vs the reference)"
    vs = "vs the reference's predictions on the same images"
    return [
        _binomial("agreement", ours == theirs, detail, f"top-1 agreement {vs}"),
        MetricValue("accuracy_delta", float(diff.mean()), "fraction", n=f.n, uncertainty=_sem(diff),
                    uncertainty_kind=paired, protocol=PROTOCOL,
                    params={**detail, **f.as_params(), "mde": accuracy_mde(f), "mde_protocol": MDE_PROTOCOL}),
        MetricValue("flip_rate", f.rate, "fraction", n=f.n, uncertainty=f.stderr,
                    uncertainty_kind="binomial stderr of the flip rate", protocol=f"correct<->wrong flips {vs}",
                    params={**detail, **f.as_params()}),
        MetricValue("kld_mean", float(kld.mean()), "nats", n=int(kld.size), uncertainty=_sem(kld),
                    uncertainty_kind="stderr (image-level)", protocol=f"KL(reference || cell) of the class softmax {vs}",
                    params={**detail, "kld_max": float(kld.max())}),
    ]


class Classification(Measurement):
    name = "classification"
    needs_tokenizer = False
    needs_reference_model = True  # only when the reference cell saved no logits
    tasks = ("vision",)
    Params = ClassificationParams
    metrics = (
        quality("accuracy", +1, headline="held-out accuracy", samples="images"),
        quality("agreement", +1),
        quality("accuracy_delta", 0),
        quality("flip_rate", -1),
        quality("kld_mean", -1),
    )

    def run(self, ctx: CellContext, params: ClassificationParams) -> list[MetricValue]:
        source = resolve_model(ctx.model_name, prepare=False)
        images, labels = dataset_of(source, params.split)
        sha1 = hashlib.sha1(images.numpy().tobytes() + labels.numpy().tobytes()).hexdigest()
        logits = predict(ctx.qmodel, images, params.batch_size, ctx.progress)
        labels_np = labels.numpy()
        np.savez(ctx.artifact_dir / FILE, logits=logits, labels=labels_np, images_sha1=np.array(sha1))
        detail = {"split": params.split, "images": int(labels_np.size), "images_sha1": sha1,
                  "recipe_hash": source.meta.get("recipe_hash")}
        out = [_binomial("accuracy", logits.argmax(1) == labels_np, detail, PROTOCOL)]
        reference = self._reference(ctx, images, sha1, params)
        if reference is None:
            return out
        ref_logits, where = reference
        return out + paired_values(logits, ref_logits, labels_np, {**detail, "reference": where})

    @staticmethod
    def _reference(ctx: CellContext, images: torch.Tensor, sha1: str, params: ClassificationParams):
        """(reference logits, where from), or None for the reference cell / a suite without one."""
        folder = ctx.reference_dir
        if ctx.is_reference:
            return None
        if folder is not None and (folder / FILE).exists():
            with np.load(folder / FILE) as z:
                if str(z["images_sha1"]) == sha1:
                    return z["logits"], f"cell {folder.name}"
        if ctx.reference_model is None:
            return None
        return predict(ctx.reference_model(), images, params.batch_size), "live"
