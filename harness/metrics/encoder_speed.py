"""Sentence-encoder speed on the cell's device (the "BERT on CPU" case): sentences per second.

Per batch size: the first `batch_size` BoolQ validation questions (eval split), tokenized once
outside the clock (padded to the longest in the batch); `warmup` untimed calls, then `repeats`
timed calls of `embed` (encoder + pooling). Reported per batch size: latency (median seconds per
batch, uncertainty IQR/2, raw per-repeat seconds in params["samples_s"]) and throughput
(sentences/s at the median, IQR/2 of the per-repeat rates). Threads are whatever torch uses in
the worker (ORT sessions are given the same number), recorded with each value."""

from __future__ import annotations

import statistics
import time

from pydantic import Field, field_validator

from harness.metrics.base import CellContext, Measurement, MeasurementParams, MetricValue
from harness.metrics.meaning import MetricSpec
from harness.models.encoders import tokenize
from harness.perf.timing import half_iqr

PROTOCOL = "encoder-cpu-latency: warm-up, then per-repeat wall clock of embed() on a pre-tokenized batch"


class EncoderSpeedParams(MeasurementParams):
    batch_sizes: tuple[int, ...] = (1, 32)
    warmup: int = Field(2, ge=0)
    repeats: int = Field(10, gt=1)

    @field_validator("batch_sizes")
    @classmethod
    def _positive(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if not value or any(b < 1 for b in value):
            raise ValueError("batch sizes must be positive integers")
        return value


class EncoderSpeed(Measurement):
    timed = True
    name = "encoder-speed"
    metrics = (MetricSpec("latency_b*", -1, "speed"), MetricSpec("throughput_b*", +1, "speed"))
    Params = EncoderSpeedParams
    tasks = ("encoder",)

    def run(self, ctx: CellContext, params: EncoderSpeedParams) -> list[MetricValue]:
        import torch

        # lazy: `import harness.metrics.encoder_speed` stays free of numpy
        from harness.metrics.embedding import boolq_pairs

        questions, _, _ = boolq_pairs(max(params.batch_sizes))
        out: list[MetricValue] = []
        for i, bs in enumerate(params.batch_sizes):
            batch = tokenize(ctx.tokenizer, questions[:bs])
            for _ in range(params.warmup):
                ctx.qmodel.embed(batch)
            seconds = []
            for _ in range(params.repeats):
                t0 = time.perf_counter()
                ctx.qmodel.embed(batch)
                seconds.append(time.perf_counter() - t0)
            ctx.progress(i + 1, len(params.batch_sizes), "encoder speed")
            detail = {"batch_size": bs, "warmup": params.warmup, "repeats": params.repeats,
                      "padded_tokens": int(batch["input_ids"].numel()), "threads": torch.get_num_threads()}
            rates = [bs / s for s in seconds]
            out += [
                MetricValue(f"latency_b{bs}", statistics.median(seconds), "s", n=len(seconds),
                            uncertainty=half_iqr(seconds), uncertainty_kind="IQR/2 over repeats", protocol=PROTOCOL,
                            params={**detail, "samples_s": seconds}),
                MetricValue(f"throughput_b{bs}", statistics.median(rates), "sentences/s", n=len(seconds),
                            uncertainty=half_iqr(rates), uncertainty_kind="IQR/2 over repeats", protocol=PROTOCOL,
                            params=detail),
            ]
        return out
