"""Suite gates: pass/fail thresholds on metric values, evaluated from a run's records.

A gate names a metric and a bound: absolute (`max`, `min`) or relative to the same model's
reference cell (`max_ratio`, `min_ratio`) or to the same cell in a baseline run
(`max_baseline_ratio`, `min_baseline_ratio`: e.g. decode tok/s >= 0.95 x baseline), over the cells
matching `cells` (fnmatch patterns on 'backend:variant'; default every non-reference cell).

`harness run` evaluates with z=0: plain value comparisons. `harness check` passes z > 0: a bound is
violated only when the value misses it by more than z standard errors, the error combining every
side's recorded uncertainty (the cell, its reference, its baseline) — noise is not a regression."""

from __future__ import annotations

import math
from dataclasses import dataclass
from fnmatch import fnmatch

from pydantic import BaseModel, ConfigDict, Field, model_validator

from harness.results.records import Record, instance_label, measurement_instance, record_corpus


# Shorthands users of quantization CI expect (llm-compressor fails a model below 95% recovery per
# metric): `{min_recovery: 95}` (optionally `task: hellaswag`), `{max_flip_rate: 0.1}`, `{max_kld: 0.05}`.
SHORTHANDS = {"min_recovery": ("recovery@{task}", "min"), "max_flip_rate": ("flip_rate@{task}", "max"),
              "max_kld": ("kld_mean", "max")}


class GateSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    metric: str = Field(description="a metric name, or an fnmatch pattern (recovery@*)")
    measurement: str | None = None
    corpus: str | None = Field(None, description="only records measured on this corpus (a suite may measure a metric on two)")
    cells: list[str] = Field(default_factory=lambda: ["*"])
    max: float | None = None
    min: float | None = None
    max_ratio: float | None = Field(None, gt=0, description="value / reference value must be <= this")
    min_ratio: float | None = Field(None, gt=0)
    max_baseline_ratio: float | None = Field(None, gt=0, description="value / baseline run's value must be <= this")
    min_baseline_ratio: float | None = Field(None, gt=0)

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, raw):
        if not isinstance(raw, dict):
            return raw
        given = [k for k in SHORTHANDS if k in raw]
        if not given:
            if "task" in raw:
                raise ValueError("'task' goes with min_recovery or max_flip_rate")
            return raw
        if len(given) > 1 or "metric" in raw:
            raise ValueError(f"use one of {', '.join(SHORTHANDS)} alone, without 'metric'")
        raw = dict(raw)
        template, bound = SHORTHANDS[given[0]]
        task = raw.pop("task", None)
        if task is not None and "{task}" not in template:
            raise ValueError(f"'task' does not apply to {given[0]}")
        value = raw.pop(given[0])
        return {**raw, "metric": template.format(task=task or "*"), bound: value}

    @model_validator(mode="after")
    def _one_bound(self):
        if all(v is None for v in (self.max, self.min, self.max_ratio, self.min_ratio,
                                   self.max_baseline_ratio, self.min_baseline_ratio)):
            raise ValueError("a gate needs at least one of max, min, max_ratio, min_ratio, "
                             "max_baseline_ratio, min_baseline_ratio")
        return self

    @property
    def baseline_only(self) -> bool:
        return all(v is None for v in (self.max, self.min, self.max_ratio, self.min_ratio))

    def describe(self) -> str:
        bounds = [f"{k} {v:g}" for k, v in (("<=", self.max), (">=", self.min),
                                            ("<= ref x", self.max_ratio), (">= ref x", self.min_ratio),
                                            ("<= baseline x", self.max_baseline_ratio),
                                            (">= baseline x", self.min_baseline_ratio)) if v is not None]
        return f"{self.metric} {' and '.join(bounds)} on {','.join(self.cells)}"


@dataclass
class GateResult:
    gate: str
    cell: str
    value: float | None
    passed: bool
    detail: str
    skipped: bool = False  # nothing to judge (e.g. a baseline bound without a baseline): passes, shown as skipped


def _matches(r: Record, gate: GateSpec) -> bool:
    if gate.corpus is not None and record_corpus(r.params) != gate.corpus:
        return False
    return (r.metric == gate.metric or fnmatch(r.metric, gate.metric)) and (gate.measurement is None or r.measurement == gate.measurement)


def _instance(r: Record) -> str:
    return measurement_instance(r.protocol, r.params)


def _ratio(v: Record, ref: Record) -> tuple[float, float | None]:
    """v / ref with the uncertainty of both sides (relative errors in quadrature; unpaired, so
    conservative where the two share noise)."""
    from harness.ci.compare import record_sigma  # recorded stderr, or the spread of params.samples_s

    ratio = v.value / ref.value
    sv, sr = record_sigma(v), record_sigma(ref)
    if sv is None and sr is None:
        return ratio, None
    rel = math.hypot((sv or 0.0) / v.value if v.value else 0.0, (sr or 0.0) / ref.value)
    return ratio, abs(ratio) * rel


def _check(label: str, value: float, sigma: float | None, bound: float | None, upper: bool, z: float,
           failures: list[str], notes: list[str]) -> None:
    """One bound: a miss beyond z sigma fails; a miss within it is noted as noise."""
    if bound is None:
        return
    miss = value - bound if upper else bound - value
    if miss <= 0:
        return
    op = ">" if upper else "<"
    text = f"{label}{value:.4g} {op} {bound:g} (by {value - bound:+.4g})"
    allowed = z * sigma if sigma is not None and math.isfinite(sigma) else 0.0
    if miss > allowed:
        failures.append(text + (f", beyond {z:g} sigma = {allowed:.2g}" if allowed else ""))
    else:
        notes.append(f"within noise: {text}, {z:g} sigma = {allowed:.2g}")


def evaluate(gates: list[GateSpec], records: list[Record], baseline: list[Record] | None = None,
             z: float = 0.0) -> list[GateResult]:
    """Judge every gate on every matching cell. `baseline`: another run's records, matched by cell
    identity (cell_id) for the baseline bounds; `z`: how many standard errors a miss must exceed."""
    # lazy: `import harness.ci.gates` stays free of numpy
    from harness.ci.compare import record_sigma
    ok_cells = {r.cell_id for r in records if r.measurement == "cell" and r.status == "ok"}
    base_ok = {r.cell_id for r in baseline or [] if r.measurement == "cell" and r.status == "ok"}
    results: list[GateResult] = []
    for gate in gates:
        if gate.baseline_only and baseline is None:
            results.append(GateResult(gate.describe(), "-", None, True, "no baseline run given (harness check --baseline RUN)",
                                      skipped=True))
            continue
        rows = [r for r in records if _matches(r, gate) and r.status == "ok" and r.cell_id in ok_cells]
        if not rows:
            results.append(GateResult(gate.describe(), "-", None, False, f"no successful records of metric '{gate.metric}'"))
            continue
        # a cell is compared with the reference / baseline value of its own measurement instance
        refs = {(r.model, r.metric, _instance(r)): r for r in rows if r.is_reference}
        bases = {(r.cell_id, r.metric, _instance(r)): r for r in baseline or []
                 if _matches(r, gate) and r.status == "ok" and r.cell_id in base_ok}
        several = len({_instance(r) for r in rows}) > 1
        for r in rows:
            name = f"{r.backend}:{r.variant}"
            if r.is_reference or not any(fnmatch(name, p) for p in gate.cells):
                continue
            instance = _instance(r)
            failures: list[str] = []
            notes: list[str] = []
            parts: list[str] = []
            sigma = record_sigma(r)
            _check("", r.value, sigma, gate.max, True, z, failures, notes)
            _check("", r.value, sigma, gate.min, False, z, failures, notes)
            if gate.max_ratio is not None or gate.min_ratio is not None:
                ref = refs.get((r.model, r.metric, instance))
                if ref is None or not ref.value:
                    failures.append("no reference value for a ratio gate")
                else:
                    ratio, sigma = _ratio(r, ref)
                    parts.append(f"ratio {ratio:.4f}")
                    _check("ratio ", ratio, sigma, gate.max_ratio, True, z, failures, notes)
                    _check("ratio ", ratio, sigma, gate.min_ratio, False, z, failures, notes)
            skipped = False
            if baseline is not None and (gate.max_baseline_ratio is not None or gate.min_baseline_ratio is not None):
                base = bases.get((r.cell_id, r.metric, instance))
                if base is None or not base.value:
                    parts.append("not in the baseline run: baseline bound not checked")
                    skipped = gate.baseline_only
                else:
                    ratio, sigma = _ratio(r, base)
                    parts.append(f"baseline ratio {ratio:.4f}" + (f" ± {sigma:.2g}" if sigma is not None else ""))
                    _check("baseline ratio ", ratio, sigma, gate.max_baseline_ratio, True, z, failures, notes)
                    _check("baseline ratio ", ratio, sigma, gate.min_baseline_ratio, False, z, failures, notes)
            detail = "; ".join(failures) if failures else (", ".join(parts + notes) or f"{r.value:.4g}")
            where = f" [{instance_label(instance)}]" if several else ""
            where += f" {r.metric}" if r.metric != gate.metric else ""  # a pattern gate (recovery@*): which metric
            results.append(GateResult(gate.describe(), f"{r.model} {name}{where}", r.value, not failures, detail,
                                      skipped=skipped and not failures))
    return results
