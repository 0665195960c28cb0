"""Quality measurements, registered lazily by name."""

from __future__ import annotations

from harness.registry import Registry

MEASUREMENTS: Registry = Registry(
    "measurement",
    {
        "perplexity": "harness.metrics.perplexity:Perplexity",
    },
)


def get_measurement(name: str):
    return MEASUREMENTS.get(name)()
