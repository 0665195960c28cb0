"""The answer first: for each model and hardware profile, the best cell within each size budget the
suite spans, by the suite's most sensitive quality metric, with the cells it is not significantly
better than, its speed where measured, and a sentence naming the Pareto cells.

"Most sensitive" is measured, not assumed: among the one-value-per-cell quality metrics with a
direction (their declarations, harness.metrics.meaning), the one whose values across the quantized
cells span the most recorded standard errors (span / median uncertainty). "Not significantly
better" is a two-sided z test on the two cells' recorded uncertainties taken as independent
(|a - b| / sqrt(ua^2 + ub^2) < Z_ALPHA): conservative, since cells scored on the same tokens share
much of their noise (`harness compare` pairs them per item and is sharper)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pandas as pd

from harness.metrics.meaning import MetricSpec, spec_for
from harness.metrics.paired import Z_ALPHA
from harness.results.records import instance_label, measurement_instance
from harness.reports.common import Table, fmt, fmt_unc, missing, ok_metric, pareto_front, sort_key
from harness.reports.sections import Section

BITS = "bits_per_weight"
# Budgets in bits per weight; a budget is shown when it admits a cell the smaller one did not.
BUDGET_LADDER: tuple[float, ...] = (2.5, 3.5, 4.5, 5.5, 6.5, 8.5, 16.5, 32.5)
SPEED_PREFERENCE = ("decode_tokens_s", "prefill_tokens_s")


@dataclass(frozen=True)
class Score:
    cell_id: str
    label: str  # backend:variant
    bits: float
    value: float
    uncertainty: float | None
    n: int | None
    speed: float | None = None

    def text(self) -> str:
        return f"{self.label} ({fmt(self.bits, 3)} bits, {fmt_unc(self.value, self.uncertainty)})"


@dataclass(frozen=True)
class MetricChoice:
    measurement: str
    metric: str
    instance: str | None  # protocol|corpus when the suite measured the metric more than once
    spec: MetricSpec
    sensitivity: float | None  # span / median uncertainty over the quantized cells

    @property
    def name(self) -> str:
        tail = f" [{instance_label(self.instance)}]" if self.instance else ""
        return f"{self.measurement}/{self.metric}{tail}"

    def better(self, a: float, b: float) -> bool:
        return a < b if self.spec.direction < 0 else a > b


@dataclass
class Verdict:
    model: str
    profile: str
    choice: MetricChoice
    reference: Score | None
    budgets: list[tuple[float, Score, list[Score], int]] = field(default_factory=list)  # budget, best, ties, pool size
    pareto: list[Score] = field(default_factory=list)
    speed_metric: str | None = None
    speed_unit: str = ""
    speed_pareto: list[Score] = field(default_factory=list)
    reference_label: str | None = None  # the reference cell, also when it has no value of the metric (KLD)


def significantly_better(a: Score, b: Score, choice: MetricChoice) -> bool:
    """a beats b beyond noise: in the better direction and |a - b| / sqrt(ua^2 + ub^2) >= Z_ALPHA.
    With no uncertainty on either side only a strict difference counts (exact metrics)."""
    if not choice.better(a.value, b.value):
        return False
    ua, ub = (0.0 if missing(s.uncertainty) else float(s.uncertainty) for s in (a, b))
    se = math.hypot(ua, ub)
    return True if se == 0 else abs(a.value - b.value) / se >= Z_ALPHA


def _sensitivity(rows: pd.DataFrame) -> float | None:
    vals = rows["value"].astype(float)
    uncs = [float(u) for u in rows["uncertainty"] if not missing(u) and float(u) > 0]
    if len(vals) < 2 or not uncs:
        return None
    return float((vals.max() - vals.min()) / pd.Series(uncs).median())


def metric_choices(ok: pd.DataFrame) -> list[MetricChoice]:
    """Every candidate verdict metric of one model/profile, most sensitive first."""
    out = []
    quantized = ok[~ok["is_reference"].astype(bool)]
    for (meas, metric), g in quantized.groupby(["measurement", "metric"], sort=True):
        first = g.iloc[0]
        spec = spec_for(meas, metric, first.get("direction"), first.get("kind"))
        if (spec is None or spec.kind != "quality" or spec.direction == 0 or spec.restates or spec.detail
                or "@" in metric):
            continue
        keys = sorted(g["instance"].unique())
        for key in keys:
            rows = g[g["instance"] == key].drop_duplicates(subset="cell_id", keep="last")
            if len(rows) >= 2:
                out.append(MetricChoice(meas, metric, key if len(keys) > 1 else None, spec, _sensitivity(rows)))
    return sorted(out, key=lambda c: (c.sensitivity is None, -(c.sensitivity or 0.0), c.name))


def _speed_metric(ok: pd.DataFrame) -> str | None:
    names = []
    for (meas, metric), g in ok.groupby(["measurement", "metric"], sort=True):
        first = g.iloc[0]
        spec = spec_for(meas, metric, first.get("direction"), first.get("kind"))
        if spec is not None and spec.kind == "speed" and spec.direction > 0 and "@" not in metric:
            names.append(metric)
    preferred = [m for m in SPEED_PREFERENCE if m in names]
    return (preferred or sorted(names) or [None])[0]


def _scores(ok: pd.DataFrame, choice: MetricChoice, speed_metric: str | None) -> list[Score]:
    rows = ok[(ok["measurement"] == choice.measurement) & (ok["metric"] == choice.metric)]
    if choice.instance is not None:
        rows = rows[rows["instance"] == choice.instance]
    rows = rows.drop_duplicates(subset="cell_id", keep="last")
    bits = ok_metric(ok, None, BITS).set_index("cell_id")["value"]
    speed = ok_metric(ok, None, speed_metric).set_index("cell_id")["value"] if speed_metric else pd.Series(dtype=float)
    out = []
    for r in rows.itertuples():
        if r.cell_id not in bits.index:
            continue
        out.append(Score(r.cell_id, f"{r.backend}:{r.variant}", float(bits[r.cell_id]), float(r.value),
                         None if missing(r.uncertainty) else float(r.uncertainty),
                         None if missing(r.n) else int(r.n),
                         float(speed[r.cell_id]) if r.cell_id in speed.index else None))
    return out


def _budgets(cands: list[Score], choice: MetricChoice) -> list[tuple[float, Score, list[Score], int]]:
    out, seen = [], -1
    for budget in BUDGET_LADDER:
        pool = [s for s in cands if s.bits <= budget]
        if len(pool) == seen or not pool:
            continue
        seen = len(pool)
        best = pool[0]
        for s in pool[1:]:
            if choice.better(s.value, best.value):
                best = s
        ties = [s for s in pool if s is not best and not significantly_better(best, s, choice)]
        out.append((budget, best, ties, len(pool)))
    return out


def verdicts(df: pd.DataFrame) -> list[Verdict]:
    """One verdict per (model, hardware profile) with at least two comparable quantized cells."""
    if df.empty:
        return []
    bad = set(df.loc[df["status"] != "ok", "cell_id"])
    ok = df[(df["status"] == "ok") & df["value"].notna() & ~df["cell_id"].isin(bad)]
    ok = ok.assign(instance=[measurement_instance(pr, pa) for pr, pa in zip(ok["protocol"], ok["params"])],
                   hardware_profile=ok["hardware_profile"].fillna("").astype(str))
    out = []
    for (model, profile), g in ok.groupby(["model", "hardware_profile"], sort=True):
        choices = metric_choices(g)
        if not choices:
            continue
        choice = choices[0]
        speed_metric = _speed_metric(g)
        scores = _scores(g, choice, speed_metric)
        refs = set(g.loc[g["is_reference"].astype(bool), "cell_id"])
        cands = [s for s in scores if s.cell_id not in refs]
        if len(cands) < 2:
            continue
        v = Verdict(str(model), profile, choice, next((s for s in scores if s.cell_id in refs), None),
                    _budgets(cands, choice), speed_metric=speed_metric,
                    speed_unit=next((str(u) for u in g.loc[g["metric"] == speed_metric, "unit"] if u), ""))
        lower = choice.spec.direction < 0
        v.pareto = [cands[i] for i in pareto_front([(s.bits, s.value) for s in cands], lower)]
        timed = [s for s in cands if s.speed is not None]
        if len(timed) >= 2:
            v.speed_pareto = [timed[i] for i in pareto_front([(-s.speed, s.value) for s in timed], lower)]
        ref_rows = g[g["is_reference"].astype(bool)]
        v.reference_label = v.reference.label if v.reference else (
            f"{ref_rows.iloc[0]['backend']}:{ref_rows.iloc[0]['variant']}" if len(ref_rows) else None)
        out.append(v)
    return out


def _table(v: Verdict) -> Table:
    """One verdict's rows: a budget each. The ratio column only where the reference has the metric."""
    with_ratio = v.reference is not None and bool(v.reference.value)
    headers = ["budget (bits/weight)", "best cell", "bits/weight", f"{v.choice.metric} ± unc (n)"]
    headers += [f"÷ reference {v.choice.metric}"] if with_ratio else []
    headers += ["not significantly better than"] + ([f"speed ({v.speed_metric})"] if v.speed_metric else []) + ["cells in budget"]
    rows = []
    for budget, best, ties, pool in v.budgets:
        row = [(f"≤ {budget:g}", sort_key(budget)), (best.label, ""), (fmt(best.bits, 3), sort_key(best.bits)),
               (fmt_unc(best.value, best.uncertainty) + (f" (n={best.n})" if best.n else ""), sort_key(best.value))]
        if with_ratio:
            ratio = best.value / v.reference.value
            row.append((f"{ratio:.4f}", sort_key(ratio)))
        row += [(", ".join(t.label for t in ties) if ties else "— (better than the rest beyond noise)", ""),
                *([("" if best.speed is None else fmt(best.speed), sort_key(best.speed))] if v.speed_metric else []),
                (str(pool), sort_key(pool))]
        rows.append(row)
    return Table(headers, rows, caption=f"{v.model} on {v.profile or 'this hardware'}, ranked by {v.choice.name}")


def _sentences(v: Verdict) -> list[str]:
    why = (f"the quantized cells span {v.choice.sensitivity:.0f} standard errors on it" if v.choice.sensitivity
           else "no quality metric recorded an uncertainty")
    better = "lower" if v.choice.spec.direction < 0 else "higher"
    if v.reference is not None:
        ref = f"; the reference {v.reference.label} scores {fmt_unc(v.reference.value, v.reference.uncertainty)}"
    else:
        ref = f", measured against the reference {v.reference_label}" if v.reference_label else ""
    out = [f"{v.model} on {v.profile or 'this hardware'}: ranked by {v.choice.name} ({better} is better; chosen "
           f"because {why}){ref}.",
           f"Pareto cells, bits per weight vs {v.choice.metric}: " + "; ".join(s.text() for s in v.pareto) + "."]
    if v.speed_pareto:
        out.append(f"Pareto cells, {v.speed_metric} vs {v.choice.metric}: "
                   + "; ".join(f"{s.label} ({fmt(s.speed)} {v.speed_unit}, {fmt_unc(s.value, s.uncertainty)})".replace(" ,", ",")
                               for s in v.speed_pareto) + ".")
    return out


def build(df: pd.DataFrame, info: dict) -> Section | None:
    vs = verdicts(df)
    if not vs:
        return None
    return Section(
        title="The answer",
        intro=(f"Best cell within each size budget by the most sensitive quality metric, and the cells it is not "
               f"significantly better than (two-sided z < {Z_ALPHA:.2f} on the recorded uncertainties taken as "
               "independent: conservative, since cells share their tokens; `harness compare` pairs them and is "
               "sharper). A budget is listed when it admits a cell the smaller one did not."),
        tables=[_table(v) for v in vs],
        notes=[s for v in vs for s in _sentences(v)],
    )
