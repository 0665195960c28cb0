"""Timers as context managers returning small result objects, and repeat statistics.

On CUDA a timer records device events around the region (device work is asynchronous: a host
clock would time the launch, not the work); on CPU it reads `time.perf_counter`. The clock is
injectable so tests can check the statistics against a sleep-based fake."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

UNCERTAINTY_KIND = "IQR/2 over repeats (half the inter-quartile range of per-repeat times)"


@dataclass
class Elapsed:
    """Filled in when the `with` block ends (on CUDA, after synchronising the end event)."""

    seconds: float = float("nan")


class Timer:
    """`with Timer(device) as t: work(); t.seconds`. `clock` overrides the host clock (tests)."""

    def __init__(self, device: str = "cpu", clock: Callable[[], float] | None = None):
        self.cuda = str(device).startswith("cuda") and clock is None
        self.clock = clock or time.perf_counter
        self.result = Elapsed()

    def __enter__(self) -> Elapsed:
        if self.cuda:
            import torch

            self._start = torch.cuda.Event(enable_timing=True)
            self._end = torch.cuda.Event(enable_timing=True)
            self._start.record()
        else:
            self._t0 = self.clock()
        return self.result

    def __exit__(self, *exc) -> None:
        if self.cuda:
            self._end.record()
            self._end.synchronize()
            self.result.seconds = self._start.elapsed_time(self._end) / 1e3
        else:
            self.result.seconds = self.clock() - self._t0


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default), q in [0, 100]."""
    xs = sorted(values)
    if not xs:
        return float("nan")
    pos = (len(xs) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def half_iqr(values: list[float]) -> float:
    """Half the interquartile range (linear percentiles): the spread every timing is reported with."""
    return (percentile(values, 75) - percentile(values, 25)) / 2 if values else float("nan")


@dataclass
class Samples:
    """Per-repeat seconds (warm-up excluded) and their summary."""

    seconds: list[float] = field(default_factory=list)
    warmup: int = 0

    @property
    def n(self) -> int:
        return len(self.seconds)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds) if self.seconds else float("nan")

    @property
    def half_iqr(self) -> float:
        return half_iqr(self.seconds)

    def p(self, q: float) -> float:
        return percentile(self.seconds, q)

    def rate_spread(self, work: float) -> tuple[float, float]:
        """(work / median time, IQR/2 of work / time): e.g. tokens/s and its spread."""
        rates = [work / s for s in self.seconds if s > 0]
        if not rates:
            return float("nan"), float("nan")
        return statistics.median(rates), half_iqr(rates)


def repeat(fn: Callable[[], object], device: str = "cpu", warmup: int = 1, repeats: int = 5,
           clock: Callable[[], float] | None = None) -> Samples:
    """Run `fn` warmup + repeats times; time each repeat on its own."""
    for _ in range(warmup):
        fn()
    out = Samples(warmup=warmup)
    for _ in range(repeats):
        with Timer(device, clock) as t:
            fn()
        out.seconds.append(t.seconds)
    return out


def synchronize(device: str) -> None:
    if str(device).startswith("cuda"):
        import torch

        torch.cuda.synchronize()
