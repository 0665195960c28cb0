"""Flips, McNemar's exact test, Wilson intervals and minimum detectable effects
(harness.metrics.paired) on fixed data, checked against scipy's own implementations and values
worked by hand; the gate shorthands users of quantization CI expect."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from harness.ci.gates import GateSpec, evaluate
from harness.metrics.paired import (Z_MDE, accuracy_mde, flips, mcnemar_exact, recovery_mde, stderr_mde,
                                    underpowered_recovery, wilson)
from harness.results.records import Record

REF = np.array([1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 1, 0, 1, 0], dtype=bool)
CAND = np.array([1, 1, 0, 0, 0, 1, 0, 0, 0, 1, 0, 1, 0, 1, 0, 0, 1, 0, 1, 0], dtype=bool)


def test_flip_counts_and_mcnemar_exact():
    f = flips(REF, CAND)
    assert (f.n, f.correct_to_wrong, f.wrong_to_correct) == (20, 7, 1)
    assert f.rate == pytest.approx(8 / 20)
    # exact McNemar = two-sided binomial test of 1 of 8 discordant pairs at 1/2: 2 * (1 + 8) / 256
    assert f.mcnemar_p == pytest.approx(2 * 9 / 256)
    assert f.mcnemar_p == pytest.approx(stats.binomtest(1, 8, 0.5).pvalue)
    assert mcnemar_exact(10, 2) == pytest.approx(2 * (1 + 12 + 66) / 4096)
    assert mcnemar_exact(0, 0) == 1.0 and mcnemar_exact(3, 3) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        flips(REF, CAND[:-1])


def test_mcnemar_matches_statsmodels_where_installed():
    sm = pytest.importorskip("statsmodels.stats.contingency_tables")
    table = [[int((REF & CAND).sum()), 7], [1, int((~REF & ~CAND).sum())]]
    assert mcnemar_exact(7, 1) == pytest.approx(sm.mcnemar(table, exact=True).pvalue)


def test_wilson_interval_matches_scipy():
    for k, n in ((8, 20), (0, 16), (16, 16), (37, 200)):
        ci = stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
        assert wilson(k, n) == pytest.approx((ci.low, ci.high), abs=1e-12)
    lo, hi = flips(REF, CAND).interval95
    assert lo < 0.4 < hi


def test_minimum_detectable_effects():
    assert Z_MDE == pytest.approx(1.959964 + 0.841621, abs=1e-5)
    same = flips(REF, REF)
    assert accuracy_mde(same) == pytest.approx(6 / 20)  # no flips: McNemar needs 6 discordant items
    many = flips(np.ones(1000, bool), np.r_[np.zeros(100, bool), np.ones(900, bool)])
    assert accuracy_mde(many) == pytest.approx(Z_MDE * math.sqrt(0.1 / 1000))
    # with 16 items and a reference at 50%, a recovery drop below 75 points cannot be seen
    sixteen = flips(np.r_[np.ones(8, bool), np.zeros(8, bool)], np.r_[np.ones(8, bool), np.zeros(8, bool)])
    assert recovery_mde(sixteen, 0.5) == pytest.approx(100 * (6 / 16) / 0.5)
    assert underpowered_recovery(recovery_mde(sixteen, 0.5)) and not underpowered_recovery(4.0)
    assert recovery_mde(sixteen, 0.0) is None and underpowered_recovery(None)
    assert stderr_mde(0.01) == pytest.approx(Z_MDE * 0.01) and stderr_mde(float("nan")) is None


def _rec(variant: str, metric: str, value: float, ref: bool = False, unc: float | None = None) -> Record:
    return Record(cell_id=variant, suite="s", model="m", backend="rtn", variant=variant, device="cpu", is_reference=ref,
                  run_id="r", measurement="tasks" if "@" in metric else "divergence", metric=metric, value=value,
                  unit="", uncertainty=unc, protocol="p", params={})


def test_gate_shorthands():
    g = GateSpec.model_validate({"min_recovery": 95})
    assert (g.metric, g.min) == ("recovery@*", 95)
    assert GateSpec.model_validate({"min_recovery": 90, "task": "piqa"}).metric == "recovery@piqa"
    assert (GateSpec.model_validate({"max_flip_rate": 0.1}).metric, GateSpec.model_validate({"max_flip_rate": 0.1}).max) \
        == ("flip_rate@*", 0.1)
    assert GateSpec.model_validate({"max_kld": 0.05}).metric == "kld_mean"
    for bad in ({"max_kld": 0.05, "task": "piqa"}, {"min_recovery": 95, "metric": "acc"}, {"metric": "acc", "task": "x"},
                {"min_recovery": 95, "max_kld": 1}):
        with pytest.raises(ValueError):
            GateSpec.model_validate(bad)
    cells = [Record(cell_id=c, suite="s", model="m", backend="rtn", variant=c, device="cpu", run_id="r",
                    measurement="cell", metric="duration_s", value=1.0) for c in ("q",)]
    records = cells + [_rec("q", "recovery@piqa", 97.0, unc=1.0), _rec("q", "recovery@hellaswag", 91.0, unc=1.0),
                       _rec("q", "kld_mean", 0.02)]
    res = evaluate([GateSpec.model_validate({"min_recovery": 95}), GateSpec.model_validate({"max_kld": 0.05})], records)
    verdicts = {(r.gate.split(" ")[0], r.cell.split(" ")[-1]): r.passed for r in res}
    assert verdicts == {("recovery@*", "recovery@piqa"): True, ("recovery@*", "recovery@hellaswag"): False,
                        ("kld_mean", "rtn:q"): True}
