"""`harness check RUN [--baseline RUN]`: the suite's gates judged noise-aware, for CI; with no
gates declared and a baseline, the default regression gate (every quality metric, by its declared
direction, not worse than the baseline beyond noise).

Builds on harness.ci.gates: the same GateSpec (from the suite the run was made with, run.json, or
from --gates FILE), evaluated with z > 0 so that a bound is violated only beyond the combined
uncertainty of the cell, its reference and its baseline. A cell that failed is a violation too: a
crash in CI is a regression, not a missing number. The verdicts go to the terminal and, optionally,
to JUnit XML."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from pydantic import ValidationError

from harness.ci.compare import compare_runs, fmt_delta, fmt_value, run_summary
from harness.errors import HarnessError
from harness.ci.gates import GateResult, GateSpec, evaluate
from harness.metrics.meaning import spec_for
from harness.results.run_dir import RunDir


@dataclass
class CheckResult:
    run: dict
    baseline: dict | None
    results: list[GateResult] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def failed(self) -> list[GateResult]:
        return [r for r in self.results if not r.passed]

    @property
    def passed(self) -> bool:
        return not self.failed


def _gate_list(raw, where: str) -> list[GateSpec]:
    if isinstance(raw, dict):
        raw = raw.get("gates", [])
    if not isinstance(raw, list):
        raise HarnessError(f"{where}: gates must be a list of {{metric: ..., max/min/...: ...}}")
    out = []
    for i, g in enumerate(raw):
        try:
            out.append(GateSpec.model_validate(g))
        except ValidationError as exc:
            first = exc.errors()[0]
            loc = ".".join(str(p) for p in first.get("loc", ()))
            raise HarnessError(f"{where}: gates[{i}]{'.' + loc if loc else ''}: {first['msg']}") from None
    return out


def load_gates(run: RunDir, gates_file: str | Path | None = None) -> list[GateSpec]:
    """Gates from --gates FILE (a list, or a suite YAML with `gates:`), else from the run's suite."""
    if gates_file is not None:
        path = Path(gates_file)
        try:
            raw = yaml.safe_load(path.read_text())
        except OSError as exc:
            raise HarnessError(f"cannot read gates file '{path}': {exc.strerror or exc}") from None
        except yaml.YAMLError as exc:
            raise HarnessError(f"gates file '{path}' is not valid YAML: {str(exc).splitlines()[0]}") from None
        return _gate_list(raw, str(path))
    suite = run.run_info().get("suite")
    return _gate_list((suite or {}).get("gates", []) if isinstance(suite, dict) else [], f"{run.path}/run.json suite")


def failed_cells(run: RunDir) -> list[GateResult]:
    out = []
    for r in run.current_records():
        if r.measurement == "cell" and r.status == "failed":
            out.append(GateResult("cell runs", f"{r.model} {r.backend}:{r.variant}", None, False, f"cell failed: {r.error}"))
    return out


DEFAULT_GATE = "default regression gate"


def default_gate(base: RunDir, run: RunDir, z: float) -> list[GateResult]:
    """With no gates declared: every quality metric (as its measurement declares it, with a better
    direction) of every cell both runs measured must not be worse than in the baseline beyond z
    standard errors (paired per token or per item where both scored the same ones). A variant
    swapped in under the same backend is judged against the one it replaced."""
    cmp = compare_runs(base, run, z=z, match_swapped=True)
    out = []
    for d in cmp.deltas:
        spec = spec_for(d.measurement, d.metric)
        if d.kind != "quality" or d.direction == 0 or d.delta is None or (spec and spec.restates):
            continue  # restatements (nll of ppl) are judged once, under the metric they restate
        worse = d.verdict == "regression"
        how = fmt_delta(d) + ("" if d.z is not None else ", no uncertainty recorded: not judged")
        detail = (f"worse than the baseline beyond {z:g} sigma: {fmt_value(d.base, d.base_sigma)} -> "
                  f"{fmt_value(d.cand, d.cand_sigma)} ({how})" if worse else f"{d.verdict}: {how}")
        out.append(GateResult(f"{DEFAULT_GATE}: {d.measurement}/{d.metric}", f"{d.model} {d.cell}", d.cand, not worse,
                              detail))
    if not out:
        out.append(GateResult(DEFAULT_GATE, "-", None, False, "no quality metric measured by both runs on the same cells"))
    return out


def check_run(run: str | Path, baseline: str | Path | None = None, z: float = 2.0,
              gates_file: str | Path | None = None, allow_failed_cells: bool = False) -> CheckResult:
    t0 = time.perf_counter()
    rd = RunDir(run)
    gates = load_gates(rd, gates_file)
    if not gates and baseline is None:
        raise HarnessError(f"no gates to check: the suite of '{rd.path}' declares no `gates:`; pass --baseline RUN "
                           "for the default regression gate, or --gates FILE")
    if z < 0:
        raise HarnessError(f"--z must be >= 0 (got {z:g})")
    base_rd = RunDir(baseline) if baseline is not None else None
    base_records = base_rd.current_records() if base_rd is not None else None
    if base_rd is not None:
        base_rd.run_info()
    results = evaluate(gates, rd.current_records(), base_records, z=z) if gates else default_gate(base_rd, rd, z)
    if not allow_failed_cells:
        results += failed_cells(rd)
    return CheckResult(run_summary(rd), run_summary(base_rd) if base_rd else None, results, time.perf_counter() - t0)


def junit_properties(res: CheckResult, z: float) -> dict[str, str]:
    props = {"run_id": res.run["run_id"], "git_sha": res.run["git_sha"], "hardware_profile": res.run["hardware_profile"],
             "z": f"{z:g}"}
    if res.baseline:
        props |= {"baseline_run_id": res.baseline["run_id"], "baseline_git_sha": res.baseline["git_sha"]}
    return {k: str(v) for k, v in props.items()}
