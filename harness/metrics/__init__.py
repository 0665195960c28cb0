"""Quality measurements, registered lazily by name."""

from __future__ import annotations

from harness.registry import Registry

MEASUREMENTS: Registry = Registry(
    "measurement",
    {
        "perplexity": "harness.metrics.perplexity:Perplexity",
        "divergence": "harness.metrics.divergence:Divergence",
    },
)


def get_measurement(name: str):
    return MEASUREMENTS.get(name)()
