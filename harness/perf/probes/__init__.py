"""Calibration probes: achievable ceilings measured on the spot, one module per probe.

A probe returns `Ceiling`s (a rate, its unit, spread, repeats and how it was measured). The
roofline uses the measured ceilings; datasheet peaks (harness.hardware) are shown beside them."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from harness.registry import Registry

PROBES: Registry = Registry(
    "probe",
    {
        "copy": "harness.perf.probes.copy:probe",
        "gemm": "harness.perf.probes.gemm:probe",
    },
)


@dataclass
class Ceiling:
    name: str  # "memory_bandwidth", "gemm_bf16", ...
    value: float | None  # bytes/s or FLOP/s (OP/s for ints); None: not measurable here (see note)
    unit: str
    n: int = 0
    spread: float | None = None  # IQR/2 of the per-repeat rates
    protocol: str = ""
    samples_s: list[float] = field(default_factory=list)
    note: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def run_probes(device: str, quick: bool = False, names: list[str] | None = None) -> dict[str, Ceiling]:
    """Every registered probe (or `names`) on `device`; a probe that cannot run says why in `note`."""
    out: dict[str, Ceiling] = {}
    for name in names or PROBES.names():
        for ceiling in PROBES.get(name)(device, quick=quick):
            out[ceiling.name] = ceiling
    return out
