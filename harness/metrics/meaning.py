"""What a metric means, declared where it is produced.

Every measurement lists the metrics it emits as `MetricSpec`s (`Measurement.metrics`); the worker
stamps each record with its declaration's direction and kind, and refuses a metric nobody declared.
Whatever judges or draws a value reads the declaration, never the metric's name: compare (which
change is a regression), gates and the default regression gate of `harness check`, the report's
cell table and frontiers, the frontier explorer.

- direction: +1 higher is better, -1 lower is better, 0 neither (a signed difference to the
  reference, a count of layers, a percentile kept for its shape);
- kind: `quality` (what the model computes), `size` (bytes, bits), `speed` (rates and latencies),
  `cost` (energy, peak memory), `diagnostic` (per-layer probes, percentiles: shown, not judged by
  the default gate), `bookkeeping` (wall times of the harness's own phases: never judged);
- exact: counted, not sampled (sizes read from storage): any change is real;
- headline: a quality metric that can be a frontier's y axis, with the figure's label and what its
  samples are (tokens, examples);
- restates: the name of the metric this one restates (nll restates ppl): drawn once;
- detail: a distribution detail (a percentile): kept in the records, no column of the cell table.

A declaration's `pattern` is the metric's name, or an fnmatch pattern for names that carry a slice
(`acc@*`, `kld_p*`). Records written before declarations existed are read through the registry
(`spec_for`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from fnmatch import fnmatch
from numbers import Real
from typing import Iterable, Literal

from harness.errors import HarnessError
from harness.metrics import MEASUREMENTS

Kind = Literal["quality", "size", "speed", "cost", "diagnostic", "bookkeeping"]
KINDS: tuple[str, ...] = ("quality", "size", "speed", "cost", "diagnostic", "bookkeeping")


@dataclass(frozen=True)
class MetricSpec:
    pattern: str
    direction: int
    kind: Kind
    exact: bool = False
    headline: str | None = None  # frontier y-axis label (quality metrics that summarise a cell)
    samples: str = ""  # what n counts, for the figure's hover text: "tokens", "examples"
    restates: str | None = None
    detail: bool = False  # a distribution detail (a percentile): kept in the records, no table column

    def __post_init__(self) -> None:
        if self.direction not in (-1, 0, 1):
            raise ValueError(f"metric '{self.pattern}': direction must be -1, 0 or +1")
        if self.kind not in KINDS:
            raise ValueError(f"metric '{self.pattern}': kind must be one of {', '.join(KINDS)}")

    def matches(self, metric: str) -> bool:
        return metric == self.pattern or fnmatch(metric, self.pattern)

    @property
    def judged(self) -> bool:
        """Worth a verdict in a comparison (bookkeeping times are shown, never judged)."""
        return self.kind != "bookkeeping"


def quality(pattern: str, direction: int, **kw) -> MetricSpec:
    return MetricSpec(pattern, direction, "quality", **kw)


def lookup(specs: Iterable[MetricSpec], metric: str) -> MetricSpec | None:
    """The declaration of `metric`: an exact name first, then the first pattern that matches."""
    specs = tuple(specs)
    for s in specs:
        if s.pattern == metric:
            return s
    for s in specs:
        if s.matches(metric):
            return s
    return None


# What the harness itself emits beside the measurements (harness.run.worker, harness.run.runner).
MEASURED_BY_EVERY_CELL: dict[str, tuple[MetricSpec, ...]] = {
    "cell": (MetricSpec("*", 0, "bookkeeping"),),
    "timing": (MetricSpec("*_s", -1, "bookkeeping"),),
    "quantize": (MetricSpec("seconds", -1, "bookkeeping"),),
    "footprint": (MetricSpec("weight_bytes", -1, "size", exact=True),
                  MetricSpec("bits_per_weight", -1, "size", exact=True)),
}
# every measurement's own wall time and tokens read per second (harness.run.worker.measurement_timing)
MEASUREMENT_TIMING: tuple[MetricSpec, ...] = (MetricSpec("wall_s", -1, "bookkeeping"),
                                              MetricSpec("tokens_per_s", +1, "bookkeeping"))


def stamp(measurement: str, value, declared: Iterable[MetricSpec]) -> dict:
    """A MetricValue as a dict with its direction and kind: the value's own where it carries them
    (lm-eval's higher_is_better), else its declaration's. A metric nobody declared is an error: its
    meaning would otherwise be guessed, and a regression in it never flagged."""
    out = asdict(value)
    spec = lookup(declared, value.metric)
    direction = value.direction if value.direction is not None else (spec.direction if spec else None)
    kind = value.kind or (spec.kind if spec else None)
    if direction is None or kind is None:
        raise HarnessError(f"measurement '{measurement}' emitted metric '{value.metric}', which it does not declare "
                           "(add a MetricSpec to its `metrics`: harness/metrics/meaning.py)")
    out["direction"], out["kind"] = direction, kind
    return out


def declarations(measurement: str) -> tuple[MetricSpec, ...]:
    """Everything `measurement` (a registry name or one of the harness's own groups) declares."""
    if measurement in MEASURED_BY_EVERY_CELL:
        return MEASURED_BY_EVERY_CELL[measurement]
    if measurement not in MEASUREMENTS.names():
        return ()
    try:
        return tuple(MEASUREMENTS.get(measurement).metrics) + MEASUREMENT_TIMING
    except HarnessError:  # its module cannot be imported here (an optional dependency)
        return ()


def spec_for(measurement: str, metric: str, direction: int | None = None, kind: str | None = None) -> MetricSpec | None:
    """A record's meaning: what it was stamped with when written, else its measurement's declaration
    (runs written before the stamp), else None (a measurement this version no longer knows)."""
    declared = lookup(declarations(measurement), metric)
    stamped = kind in KINDS and isinstance(direction, Real) and direction == direction  # pandas: NaN, numpy ints
    if stamped:
        base = declared or MetricSpec(metric, int(direction), kind)  # type: ignore[arg-type]
        return replace(base, direction=int(direction), kind=kind)  # type: ignore[arg-type]
    return declared


def record_spec(r) -> MetricSpec | None:
    """spec_for a Record (or anything with measurement, metric, direction, kind)."""
    return spec_for(r.measurement, r.metric, getattr(r, "direction", None), getattr(r, "kind", None))
