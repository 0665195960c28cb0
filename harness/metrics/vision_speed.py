"""Image-classifier latency on the cell's device (CPU): percentiles over repeats, per batch size.

Per batch size: the first `batch_size` test images as one float32 tensor, built outside the
clock; `warmup` untimed calls, then `repeats` timed calls of `classify` (the whole runtime call:
torch forward, or the ORT / ExecuTorch / LiteRT session including its numpy conversion).
Reported per batch size: `latency_p50_b{n}` (median seconds per call; uncertainty IQR/2; raw
per-repeat seconds in params["samples_s"]), `latency_p90_b{n}` and `throughput_b{n}` (images/s
at the median). Threads: torch's in the worker; ORT and LiteRT are given the same number and
ExecuTorch's XNNPACK uses its own pool; each value records torch's."""

from __future__ import annotations

import statistics
import time

import numpy as np
from pydantic import Field, field_validator

from harness.metrics.base import CellContext, Measurement, MeasurementParams, MetricValue
from harness.metrics.meaning import MetricSpec
from harness.models.vision import dataset_of
from harness.models.zoo import resolve_model
from harness.perf.timing import half_iqr

PROTOCOL = "vision-cpu-latency: warm-up, then per-repeat wall clock of classify() on a pre-built batch of test images"


class VisionSpeedParams(MeasurementParams):
    batch_sizes: tuple[int, ...] = (1, 64)
    warmup: int = Field(10, ge=0)
    repeats: int = Field(100, gt=4)

    @field_validator("batch_sizes")
    @classmethod
    def _positive(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if not value or any(b < 1 for b in value):
            raise ValueError("batch sizes must be positive integers")
        return value


def time_calls(fn, warmup: int, repeats: int) -> list[float]:
    for _ in range(warmup):
        fn()
    seconds = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - t0)
    return seconds


class VisionSpeed(Measurement):
    timed = True
    name = "vision-speed"
    needs_tokenizer = False
    tasks = ("vision",)
    Params = VisionSpeedParams
    metrics = (MetricSpec("latency_p50_b*", -1, "speed"), MetricSpec("latency_p90_b*", -1, "speed", detail=True),
               MetricSpec("throughput_b*", +1, "speed"))

    def run(self, ctx: CellContext, params: VisionSpeedParams) -> list[MetricValue]:
        import torch

        images, _ = dataset_of(resolve_model(ctx.model_name, prepare=False), "test")
        if max(params.batch_sizes) > images.shape[0]:
            from harness.errors import HarnessError

            raise HarnessError(f"vision-speed: batch size {max(params.batch_sizes)} > the {images.shape[0]} test images")
        out: list[MetricValue] = []
        for i, bs in enumerate(params.batch_sizes):
            batch = images[:bs].clone()
            seconds = time_calls(lambda: ctx.qmodel.classify(batch), params.warmup, params.repeats)
            ctx.progress(i + 1, len(params.batch_sizes), "vision speed")
            detail = {"batch_size": bs, "warmup": params.warmup, "repeats": params.repeats,
                      "threads": torch.get_num_threads()}
            rates = [bs / s for s in seconds]
            spread = {"uncertainty": half_iqr(seconds), "uncertainty_kind": "IQR/2 over repeats"}
            out += [
                MetricValue(f"latency_p50_b{bs}", statistics.median(seconds), "s", n=len(seconds), protocol=PROTOCOL,
                            params={**detail, "samples_s": seconds}, **spread),
                MetricValue(f"latency_p90_b{bs}", float(np.percentile(seconds, 90)), "s", n=len(seconds),
                            protocol=PROTOCOL, params=detail),
                MetricValue(f"throughput_b{bs}", statistics.median(rates), "images/s", n=len(seconds),
                            uncertainty=half_iqr(rates), uncertainty_kind="IQR/2 over repeats", protocol=PROTOCOL,
                            params=detail),
            ]
        return out
