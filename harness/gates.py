"""Suite gates: pass/fail thresholds on metric values, evaluated from a run's records.

A gate names a metric and a bound: absolute (`max`, `min`) or relative to the same model's
reference cell (`max_ratio`, `min_ratio`), over the cells matching `cells` (fnmatch patterns on
'backend:variant'; default every non-reference cell). This is the plain form: it compares values
and reports the margin; noise-aware verdicts (paired uncertainty) come with `harness check`."""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatch

from pydantic import BaseModel, ConfigDict, Field, model_validator

from harness.records import Record


class GateSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    metric: str
    measurement: str | None = None
    cells: list[str] = Field(default_factory=lambda: ["*"])
    max: float | None = None
    min: float | None = None
    max_ratio: float | None = Field(None, gt=0, description="value / reference value must be <= this")
    min_ratio: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _one_bound(self):
        if all(v is None for v in (self.max, self.min, self.max_ratio, self.min_ratio)):
            raise ValueError("a gate needs at least one of max, min, max_ratio, min_ratio")
        return self

    def describe(self) -> str:
        bounds = [f"{k} {v:g}" for k, v in (("<=", self.max), (">=", self.min),
                                            ("<= ref x", self.max_ratio), (">= ref x", self.min_ratio)) if v is not None]
        return f"{self.metric} {' and '.join(bounds)} on {','.join(self.cells)}"


@dataclass
class GateResult:
    gate: str
    cell: str
    value: float | None
    passed: bool
    detail: str


def _matches(r: Record, gate: GateSpec) -> bool:
    return r.metric == gate.metric and (gate.measurement is None or r.measurement == gate.measurement)


def evaluate(gates: list[GateSpec], records: list[Record]) -> list[GateResult]:
    ok_cells = {r.cell_id for r in records if r.measurement == "cell" and r.status == "ok"}
    results: list[GateResult] = []
    for gate in gates:
        rows = [r for r in records if _matches(r, gate) and r.status == "ok" and r.cell_id in ok_cells]
        if not rows:
            results.append(GateResult(gate.describe(), "-", None, False, f"no successful records of metric '{gate.metric}'"))
            continue
        refs = {r.model: r.value for r in rows if r.is_reference}
        for r in rows:
            name = f"{r.backend}:{r.variant}"
            if r.is_reference or not any(fnmatch(name, p) for p in gate.cells):
                continue
            failures, parts = [], []
            if gate.max is not None and r.value > gate.max:
                failures.append(f"{r.value:.4g} > max {gate.max:g}")
            if gate.min is not None and r.value < gate.min:
                failures.append(f"{r.value:.4g} < min {gate.min:g}")
            if gate.max_ratio is not None or gate.min_ratio is not None:
                ref = refs.get(r.model)
                if not ref:
                    failures.append("no reference value for a ratio gate")
                else:
                    ratio = r.value / ref
                    parts.append(f"ratio {ratio:.4f}")
                    if gate.max_ratio is not None and ratio > gate.max_ratio:
                        failures.append(f"ratio {ratio:.4f} > {gate.max_ratio:g} (by {ratio - gate.max_ratio:+.4f})")
                    if gate.min_ratio is not None and ratio < gate.min_ratio:
                        failures.append(f"ratio {ratio:.4f} < {gate.min_ratio:g} (by {ratio - gate.min_ratio:+.4f})")
            detail = "; ".join(failures) if failures else (", ".join(parts) or f"{r.value:.4g}")
            results.append(GateResult(gate.describe(), f"{r.model} {name}", r.value, not failures, detail))
    return results
