"""What a training backend (QAT) did, as records: the loss of every step, steps, wall time, and
the held-out loss of the float, PTQ (fake-quantized, untrained) and QAT models, from which
recovery = (loss_ptq - loss_qat) / (loss_ptq - loss_float). A cell whose adapter did not train
emits nothing, so the measurement can sit in any suite."""

from __future__ import annotations

import math

from harness.metrics.base import CellContext, MeasurementParams, Measurement, MetricValue
from harness.metrics.meaning import MetricSpec, quality

PROTOCOL = "qat: next-token loss on calibration windows (held-out ones for holdout_loss_*)"


class TrainingParams(MeasurementParams):
    pass


def training_values(training: dict) -> list[MetricValue]:
    tokens = training.get("tokens_per_step")
    detail = {k: training.get(k) for k in ("lr", "batch_size", "seq_len", "train_windows", "holdout_windows",
                                           "holdout_disjoint", "train_windows_dropped_overlap", "calibration_stream_tokens",
                                           "distinct_train_tokens", "epochs_over_distinct_tokens") if k in training}
    out = [MetricValue("train_loss", loss, "nats/token", n=tokens, protocol=PROTOCOL, params={"step": i + 1, **detail})
           for i, loss in enumerate(training.get("losses", []))]
    out += [MetricValue("train_steps", float(training["steps"]), "steps", protocol=PROTOCOL, params=detail),
            MetricValue("train_seconds", training["train_seconds"], "s", n=1, protocol="wall clock, one run", params=detail)]
    holdout = training.get("holdout_loss") or {}
    for kind, v in holdout.items():
        out.append(MetricValue(f"holdout_loss_{kind}", v["mean"], "nats/token", n=v["n"], uncertainty=v["stderr"],
                               uncertainty_kind="stderr (token-level)", protocol=PROTOCOL, params=detail))
    if {"float", "ptq", "qat"} <= holdout.keys():
        gap = holdout["ptq"]["mean"] - holdout["float"]["mean"]
        rec = (holdout["ptq"]["mean"] - holdout["qat"]["mean"]) / gap if abs(gap) > 0 else math.nan
        out.append(MetricValue("holdout_recovery", rec, "fraction", n=holdout["qat"]["n"],
                               protocol="(loss_ptq - loss_qat) / (loss_ptq - loss_float) on held-out calibration "
                                        "windows; unstable when the PTQ gap is within noise",
                               params={**detail, "ptq_gap_nats": gap}))
    return out


class Training(Measurement):
    name = "training"
    metrics = (MetricSpec("train_loss", -1, "diagnostic"), MetricSpec("train_steps", 0, "bookkeeping"),
               MetricSpec("train_seconds", -1, "bookkeeping"), quality("holdout_loss_*", -1), quality("holdout_recovery", +1))
    Params = TrainingParams
    needs_tokenizer = False

    def run(self, ctx: CellContext, params: MeasurementParams) -> list[MetricValue]:
        training = (getattr(ctx.qmodel, "info", None) or {}).get("training")
        return training_values(training) if training else []
