"""The measurement contract: a named measurement with typed parameters that turns a quantized
model into metric values. Each value carries its unit, sample count, uncertainty and protocol;
the worker adds the cell's identity and provenance to make it a Record."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict


class MeasurementParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass
class MetricValue:
    metric: str
    value: float | None
    unit: str
    n: int | None = None
    uncertainty: float | None = None
    uncertainty_kind: str | None = None
    protocol: str | None = None
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class CellContext:
    """What a measurement may use. `progress(done, total, what)` feeds the driver's progress bar."""

    qmodel: Any  # adapters.base.QuantizedModel
    tokenizer: Any
    model_name: str
    artifact_dir: Path
    reference_dir: Path | None = None  # the reference cell's artifacts (absent if it has not run)
    reference_model: Callable[[], Any] | None = None  # builds the reference QuantizedModel (cached)
    progress: Callable[[int, int, str], None] = lambda done, total, what: None


class Measurement(ABC):
    name: ClassVar[str]
    Params: ClassVar[type[MeasurementParams]]
    needs_tokenizer: ClassVar[bool] = True
    tasks: ClassVar[tuple[str, ...]] = ("causal-lm",)  # model kinds it can measure; others are refused at plan time

    @abstractmethod
    def run(self, ctx: CellContext, params: MeasurementParams) -> list[MetricValue]: ...
