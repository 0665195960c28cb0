"""The record schema, declared once. One row per metric value; tables, plots and gates are all
derived from records. A failed cell is one row with status 'failed' and its reason."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class CellIdentity(BaseModel):
    """What a cell is: the same identity in two runs means comparable numbers."""

    model_config = ConfigDict(frozen=True)

    cell_id: str
    suite: str
    model: str
    backend: str
    variant: str
    variant_params: dict[str, Any] = Field(default_factory=dict)
    device: str
    hardware_profile: str = "unknown"
    is_reference: bool = False


class Record(CellIdentity):
    run_id: str
    attempt: int = 1  # a resumed run runs a failed cell again: its records get the next attempt
    measurement: str  # e.g. "perplexity", "footprint", "quantize", "cell"
    metric: str  # e.g. "ppl", "weight_bytes", "bits_per_weight", "seconds", "status"
    value: float | None = None
    unit: str = ""
    n: int | None = None  # sample count behind the value (tokens, windows, documents)
    uncertainty: float | None = None
    uncertainty_kind: str | None = None  # "stderr" (1 sigma) unless stated
    protocol: str | None = None
    params: dict[str, Any] = Field(default_factory=dict)
    # what the metric means, stamped from its measurement's declaration (harness.metrics.meaning):
    # +1 higher is better, -1 lower, 0 neither; quality | size | speed | cost | diagnostic | bookkeeping.
    # None in runs written before declarations: readers ask harness.metrics.meaning.record_spec.
    direction: int | None = None
    kind: str | None = None
    status: Literal["ok", "failed", "skipped"] = "ok"
    error: str | None = None
    provenance: dict[str, Any] = Field(default_factory=dict)  # per-cell: backend versions, kernel
    time: str = Field(default_factory=utc_now)


RECORD_COLUMNS = list(Record.model_fields)


def record_corpus(params: Any) -> str:
    """The corpus a record was measured on ('' when none), from its params."""
    p = params if isinstance(params, dict) else {}
    return str(p.get("dataset") or p.get("corpus") or "")


def measurement_instance(protocol: Any, params: Any) -> str:
    """Which of a suite's measurements a record came from when the suite measures one metric
    twice (perplexity on boolq-wiki and on lambada, or under two protocols): 'protocol|corpus'.
    Reports draw one frontier per instance and gates compare a cell only with its own instance."""
    missing = protocol is None or (isinstance(protocol, float) and protocol != protocol)  # None or pandas NaN
    return f"{'' if missing else protocol}|{record_corpus(params)}"


def instance_label(instance: str) -> str:
    """'gptq|lambada' -> 'gptq, lambada' (either part may be empty)."""
    return ", ".join(part for part in instance.split("|") if part)
