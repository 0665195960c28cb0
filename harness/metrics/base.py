"""The measurement contract: a named measurement with typed parameters that turns a quantized
model into metric values. Each value carries its unit, sample count, uncertainty and protocol;
the worker adds the cell's identity and provenance to make it a Record."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict

from harness.metrics.meaning import MetricSpec


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
    # where a metric's meaning is only known when it is produced (lm-eval reports higher_is_better
    # per metric): overrides the measurement's declaration (harness.metrics.meaning)
    direction: int | None = None
    kind: str | None = None


@dataclass
class CellContext:
    """What a measurement may use. `progress(done, total, what)` feeds the driver's progress bar.
    `scorer` (harness.metrics.scoring.Scorer) scores text on the cell's model and is shared by
    the cell's measurements; `is_reference`: this cell is its model's reference (it stores what
    comparing cells read: per-token NLLs, reference log-probabilities, greedy continuations)."""

    qmodel: Any  # adapters.base.QuantizedModel
    tokenizer: Any
    model_name: str
    artifact_dir: Path
    reference_dir: Path | None = None  # the reference cell's artifacts (absent if it has not run)
    # builds the reference QuantizedModel (cached): only for measurements that need both models
    # layer by layer (outliers, sensitivity); everything else reads what the reference cell stored
    reference_model: Callable[[], Any] | None = None
    progress: Callable[[int, int, str], None] = lambda done, total, what: None
    is_reference: bool = False
    scorer: Any = None

    def __post_init__(self) -> None:
        if self.scorer is None:
            from harness.metrics.scoring import Scorer

            self.scorer = Scorer(self.qmodel, self.progress)


class Measurement(ABC):
    name: ClassVar[str]
    Params: ClassVar[type[MeasurementParams]]
    # what a model must have for it: real (trained) weights, and a tokenizer; `shape:` models (random
    # init, no tokenizer: harness.perf.shape_models) take only measurements that need neither (planner)
    needs_real_weights: ClassVar[bool] = True
    needs_tokenizer: ClassVar[bool] = True
    tasks: ClassVar[tuple[str, ...]] = ("causal-lm",)  # model kinds it can measure; others are refused at plan time
    # its values are timings: nothing of the harness's own may run beside its cell (no next worker
    # warming up: harness.run.executor.LocalExecutor)
    timed: ClassVar[bool] = False
    # loads the reference model beside the cell's own (layer-by-layer diagnostics); everything
    # else reads what the reference cell stored
    needs_reference_model: ClassVar[bool] = False
    # what each metric it emits means (direction, kind, exact, headline): harness.metrics.meaning.
    # The worker refuses a metric that is not declared here.
    metrics: ClassVar[tuple[MetricSpec, ...]] = ()

    @abstractmethod
    def run(self, ctx: CellContext, params: MeasurementParams) -> list[MetricValue]: ...

    def check_inputs(self, params: MeasurementParams) -> None:
        """Raise HarnessError (one line) if what this measurement reads cannot be had here: at plan
        time, before any model loads. By default the `corpus` it names (files, packages)."""
        corpus = getattr(params, "corpus", None)
        if isinstance(corpus, str):
            from harness.models.corpora import check_corpus

            check_corpus(corpus)

    def reference_windows(self, ctx: CellContext, params: MeasurementParams) -> torch.Tensor | None:
        """Token windows (n, S) whose reference log-probabilities comparing cells will read: the
        reference cell records them in whichever of its measurements scores them first."""
        return None
