"""Compare two runs cell by cell: deltas with significance, regressions and improvements flagged.

Cells are matched by identity (cell_id: a hash of model, backend variant, device, measurements and
calibration), metrics by (measurement, metric). A delta is significant when it exceeds z standard
errors. Where both runs scored the very same tokens (the per-token NLL artifacts of perplexity
carry a token hash), ppl / nll / ppl_ratio deltas are paired: the standard error comes from the
per-token differences, which cancels the shared text difficulty and is far tighter than the two
error bars combined. Otherwise both sides' recorded uncertainties are combined in quadrature.

Runs are keyed by the harness git sha and hardware profile in run.json, so a baseline can be found
as "the latest run of this suite at `main` on this hardware profile" (resolve_base)."""

from __future__ import annotations

import json
import math
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from harness.errors import HarnessError
from harness.metrics.meaning import record_spec
from harness.results.records import Record
from harness.results.run_dir import RunDir

PAIRED_METRICS = ("ppl", "nll", "ppl_ratio", "ln_ppl_ratio")
QUIET = ("same", "noise", "unjudged", "swapped")  # verdicts that need no attention


def exact(r: Record) -> bool:
    """Values that carry no noise (sizes counted from storage): any change is real. Every other
    value without a recorded uncertainty cannot be judged and is only shown."""
    spec = record_spec(r)
    return bool(spec and spec.exact)


def record_sigma(r: Record) -> float | None:
    """A record's 1-sigma uncertainty; for perf records without one, the standard error of the
    raw per-repeat timings in params['samples_s'], carried over as a relative error."""
    if r.uncertainty is not None and math.isfinite(r.uncertainty):
        return float(r.uncertainty)
    samples = r.params.get("samples_s") if isinstance(r.params, dict) else None
    if isinstance(samples, list) and len(samples) > 1 and r.value:
        s = np.asarray(samples, dtype=float)
        if s.mean() > 0:
            return abs(r.value) * float(s.std(ddof=1) / math.sqrt(s.size) / s.mean())
    return None


@dataclass
class Delta:
    model: str
    backend: str
    variant: str
    cell_id: str
    measurement: str
    metric: str
    unit: str
    base: float | None
    cand: float | None
    base_sigma: float | None = None
    cand_sigma: float | None = None
    sigma: float | None = None  # of cand - base
    z: float | None = None
    paired: bool = False
    direction: int = 0
    judged: bool = True  # False: bookkeeping (harness.metrics.meaning), shown but never flagged
    kind: str = ""  # the metric's declared kind: quality, size, speed, cost, diagnostic, bookkeeping
    detail: bool = False  # a distribution detail (percentile): in the table, not in the summary figure
    note: str = ""  # paired items: "flips 3 c→w / 1 w→c, McNemar p=0.62"
    verdict: str = "same"  # regression | improvement | changed | same | noise | unjudged | new | gone | failed | recovered | 'a -> b'

    @property
    def delta(self) -> float | None:
        return None if self.base is None or self.cand is None else self.cand - self.base

    @property
    def rel(self) -> float | None:
        d = self.delta
        return None if d is None or not self.base else d / abs(self.base)

    @property
    def cell(self) -> str:
        return f"{self.backend}:{self.variant}"


@dataclass
class Comparison:
    base: dict  # run.json summaries: run_id, suite, git_sha, hardware_profile, path
    cand: dict
    z: float
    deltas: list[Delta] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def flagged(self, verdict: str) -> list[Delta]:
        return [d for d in self.deltas if d.verdict == verdict]

    @property
    def regressions(self) -> list[Delta]:
        return self.flagged("regression") + self.flagged("failed")

    @property
    def improvements(self) -> list[Delta]:
        return self.flagged("improvement") + self.flagged("recovered")

    def to_json(self) -> dict:
        return {"base": self.base, "cand": self.cand, "z": self.z, "warnings": self.warnings,
                "deltas": [{**asdict(d), "delta": d.delta, "rel": d.rel} for d in self.deltas]}


def run_summary(rd: RunDir) -> dict:
    info = rd.run_info()
    suite = info.get("suite")
    prov = info.get("provenance") if isinstance(info.get("provenance"), dict) else {}
    return {"path": str(rd.path), "run_id": info.get("run_id"),
            "suite": suite.get("name") if isinstance(suite, dict) else suite,
            "git_sha": prov.get("git_sha", "unknown"), "hardware_profile": info.get("hardware_profile", "unknown"),
            "device_name": info.get("device_name"), "finished_at": info.get("finished_at")}


# -- paired per-token comparisons -----------------------------------------------------------------
def _nll(rd: RunDir, cell_id: str | None, params: dict) -> tuple[np.ndarray, str] | None:
    """A cell's saved per-token NLLs and their token hash, if both are there."""
    if not cell_id or "corpus" not in params or "seq_len" not in params:
        return None
    d = rd.path / "cells" / cell_id
    stem = f"nll-{params['corpus']}-{params['seq_len']}"
    npy, meta = d / f"{stem}.npy", d / f"{stem}.json"
    if not (npy.exists() and meta.exists()):
        return None
    try:
        sha = json.loads(meta.read_text()).get("tokens_sha1")
        return np.load(npy), sha
    except (OSError, ValueError):
        return None


def _per_token(rd: RunDir, r: Record, ref_id: str | None) -> tuple[np.ndarray, str] | None:
    """The per-token series whose mean is the record's log-value: a cell's NLLs for ppl/nll, the
    NLL difference to its reference cell (same tokens) for ppl_ratio/ln_ppl_ratio."""
    own = _nll(rd, r.cell_id, r.params)
    if own is None:
        return None
    if r.metric in ("ppl", "nll"):
        return own
    ref = _nll(rd, r.params.get("reference_cell") or ref_id, r.params)
    if ref is None or ref[1] != own[1] or ref[0].shape != own[0].shape:
        return None
    return own[0] - ref[0], own[1]


def paired_z(base_rd: RunDir, b: Record, cand_rd: RunDir, c: Record, base_ref: str | None, cand_ref: str | None) -> float | None:
    """z of the log-scale change from per-token differences on the same tokens, or None."""
    if c.metric not in PAIRED_METRICS:
        return None
    pb, pc = _per_token(base_rd, b, base_ref), _per_token(cand_rd, c, cand_ref)
    if pb is None or pc is None or pb[1] != pc[1] or pb[0].shape != pc[0].shape or pb[0].size < 2:
        return None
    return _z_of_differences(pc[0] - pb[0])


def _z_of_differences(diff: np.ndarray) -> float:
    """z of the mean of paired differences (per token, per item); +-inf for a change with no spread."""
    se = float(diff.std(ddof=1) / math.sqrt(diff.size))
    mean = float(diff.mean())
    if se == 0.0:
        return 0.0 if mean == 0.0 else math.copysign(math.inf, mean)
    return mean / se


def _task_outcomes(rd: RunDir, r: Record) -> tuple[np.ndarray, str] | None:
    """Per-item outcomes behind an acc@task / acc_norm@task record, and the items' signature."""
    metric, _, task = r.metric.partition("@")
    if metric not in ("acc", "acc_norm") or not task or not r.cell_id:
        return None
    shots = (r.params or {}).get("num_fewshot", 0)
    path = rd.path / "cells" / r.cell_id / f"task-{task}-{shots}shot.json"
    try:
        data = json.loads(path.read_text())
        return np.asarray(data[metric], dtype=bool), str(data.get("signature"))
    except (OSError, ValueError, KeyError):
        return None


def paired_items(base_rd: RunDir, b: Record, cand_rd: RunDir, c: Record) -> tuple[float, str] | None:
    """(z, note) of an accuracy change from the very same items in both runs: the paired standard
    error of the per-item differences, and the flips with McNemar's exact p; None when the items differ."""
    # lazy: `import harness.ci.compare` stays free of scipy
    from harness.metrics.paired import flips

    ob, oc = _task_outcomes(base_rd, b), _task_outcomes(cand_rd, c)
    if ob is None or oc is None or ob[1] != oc[1] or ob[0].shape != oc[0].shape or ob[0].size < 2:
        return None
    f = flips(ob[0], oc[0])
    z = _z_of_differences(oc[0].astype(float) - ob[0].astype(float))
    return z, f"flips {f.correct_to_wrong} c→w / {f.wrong_to_correct} w→c, McNemar p={f.mcnemar_p:.3g}"


# -- the comparison -------------------------------------------------------------------------------
def _cells(records: list[Record]) -> dict[str, str]:
    """cell_id -> status (ok / failed / skipped) from the driver's 'cell' records."""
    out: dict[str, str] = {}
    for r in records:
        if r.status != "ok":
            out[r.cell_id] = r.status if out.get(r.cell_id) != "failed" else "failed"
        else:
            out.setdefault(r.cell_id, "ok")
    return out


def _values(records: list[Record]) -> dict[tuple[str, str, str], Record]:
    return {(r.cell_id, r.measurement, r.metric): r for r in records if r.status == "ok" and r.value is not None}


def _refs(records: list[Record]) -> dict[str, str]:
    return {r.model: r.cell_id for r in records if r.is_reference}


def swapped_cells(bcells: dict[str, str], ccells: dict[str, str], ident: dict[str, Record]) -> dict[str, str]:
    """candidate cell_id -> base cell_id for a variant swapped in: per model and backend, exactly one
    cell only in the base and one only in the candidate (a recipe changed under the same backend)."""
    slot = lambda cid: (ident[cid].model, ident[cid].backend)  # noqa: E731
    gone: dict[tuple, list[str]] = {}
    new: dict[tuple, list[str]] = {}
    for cid in bcells.keys() - ccells.keys():
        gone.setdefault(slot(cid), []).append(cid)
    for cid in ccells.keys() - bcells.keys():
        new.setdefault(slot(cid), []).append(cid)
    return {new[k][0]: gone[k][0] for k in new if len(new[k]) == 1 and len(gone.get(k, [])) == 1}


def compare_runs(base: str | Path | RunDir, cand: str | Path | RunDir, z: float = 2.0, min_change: float = 0.0,
                 match_swapped: bool = False) -> Comparison:
    """`z`: standard errors a delta must exceed to be significant; `min_change`: relative change
    below which a significant delta still counts as unchanged (e.g. 0.02 for speed measured on
    shared machines, where run-to-run drift exceeds the spread within a run); `match_swapped`:
    compare a variant swapped in with the one it replaced (swapped_cells)."""
    base_rd = base if isinstance(base, RunDir) else RunDir(base)
    cand_rd = cand if isinstance(cand, RunDir) else RunDir(cand)
    cmp = Comparison(run_summary(base_rd), run_summary(cand_rd), z)
    for key, what in (("suite", "suites"), ("hardware_profile", "hardware profiles")):
        if cmp.base[key] != cmp.cand[key]:
            cmp.warnings.append(f"different {what}: {cmp.base[key]} vs {cmp.cand[key]}"
                                + (" (speed deltas compare different hardware)" if key == "hardware_profile" else ""))
    brecs, crecs = base_rd.current_records(), cand_rd.current_records()
    bcells, ccells = _cells(brecs), _cells(crecs)
    bvals, cvals = _values(brecs), _values(crecs)
    brefs, crefs = _refs(brecs), _refs(crecs)
    ident = {r.cell_id: r for r in [*brecs, *crecs]}
    swaps = swapped_cells(bcells, ccells, ident) if match_swapped else {}

    for cid in dict.fromkeys([*ccells, *bcells]):  # candidate order first, then cells only the base has
        if cid in swaps.values():
            continue  # compared under the variant that replaced it
        r0 = ident[cid]
        bid = swaps.get(cid, cid)
        bs, cs = bcells.get(bid), ccells.get(cid)
        if cid in swaps:
            cmp.deltas.append(Delta(r0.model, r0.backend, f"{ident[bid].variant} -> {r0.variant}", cid, "cell", "status",
                                    "", None, None, verdict="swapped"))
        if bs != cs:
            verdict = ("new" if bs is None else "gone" if cs is None else "failed" if cs == "failed"
                       else "recovered" if bs == "failed" and cs == "ok" else f"{bs} -> {cs}")
            cmp.deltas.append(Delta(r0.model, r0.backend, r0.variant, cid, "cell", "status", "", None, None, verdict=verdict))
        for key in [k for k in cvals if k[0] == cid]:
            b, c = bvals.get((bid, *key[1:])), cvals.get(key)
            if b is None:
                continue  # a metric on one side only (a newer measurement): nothing to compare
            spec = record_spec(c)
            variant = c.variant if bid == cid else f"{b.variant} -> {c.variant}"
            d = Delta(c.model, c.backend, variant, cid, c.measurement, c.metric, c.unit, b.value, c.value,
                      record_sigma(b), record_sigma(c), direction=spec.direction if spec else 0,
                      judged=spec is None or spec.judged, kind=spec.kind if spec else "", detail=bool(spec and spec.detail))
            pz = paired_z(base_rd, b, cand_rd, c, brefs.get(b.model), crefs.get(c.model))
            items = paired_items(base_rd, b, cand_rd, c) if pz is None else None
            if items is not None:
                pz, d.note = items
            if pz is not None:
                d.paired, d.z = True, pz
                d.sigma = 0.0 if math.isinf(pz) else (abs(d.delta / pz) if pz else None)
            elif d.base_sigma is not None or d.cand_sigma is not None:
                d.sigma = math.hypot(d.base_sigma or 0.0, d.cand_sigma or 0.0)
                d.z = d.delta / d.sigma if d.sigma > 0 else (0.0 if d.delta == 0 else math.copysign(math.inf, d.delta))
            elif exact(c):  # sizes counted from storage: any change is real
                d.z = 0.0 if d.delta == 0 else math.copysign(math.inf, d.delta)
            d.verdict = _verdict(d, z, min_change)
            cmp.deltas.append(d)
    order = {"failed": 0, "regression": 1, "improvement": 2, "recovered": 3, "changed": 4, "new": 5, "gone": 6, "noise": 7, "unjudged": 8, "same": 9}
    cmp.deltas.sort(key=lambda d: (order.get(d.verdict, 9), d.model, d.cell, d.measurement, d.metric))
    return cmp


def _verdict(d: Delta, z: float, min_change: float = 0.0) -> str:
    if d.delta == 0:
        return "same"
    if not d.judged or d.z is None:
        return "unjudged"  # bookkeeping times, or no uncertainty to judge a change by
    if abs(d.z) <= z or (d.rel is not None and abs(d.rel) < min_change):
        return "noise"
    if d.direction == 0:
        return "changed"
    return "improvement" if d.direction * d.delta > 0 else "regression"


# -- finding the baseline -------------------------------------------------------------------------
def git_rev(ref: str, repo: str | Path = ".") -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--verify", f"{ref}^{{commit}}"], cwd=repo, capture_output=True,
                             text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as exc:
        raise HarnessError(f"cannot run git to resolve '{ref}': {exc}") from None
    if out.returncode != 0:
        raise HarnessError(f"git cannot resolve '{ref}' in {Path(repo).resolve()}: {out.stderr.strip() or 'unknown ref'}")
    return out.stdout.strip()


def resolve_base(runs_root: str | Path, ref: str, cand: str | Path, repo: str | Path = ".") -> RunDir:
    """The latest finished run under runs_root of the candidate's suite and hardware profile whose
    harness git sha is `ref` (a branch, tag or sha; resolved with git rev-parse). Runs from a dirty
    checkout do not count: they are not that commit."""
    sha = git_rev(ref, repo)
    want = run_summary(RunDir(cand))
    root = Path(runs_root)
    if not root.is_dir():
        raise HarnessError(f"runs root '{root}' is not a directory")
    found = []
    for run_json in root.glob("*/run.json"):
        rd = RunDir(run_json.parent)
        try:
            s = run_summary(rd)
        except HarnessError:
            continue
        if (s["git_sha"] == sha and s["hardware_profile"] == want["hardware_profile"] and s["suite"] == want["suite"]
                and s["finished_at"] and rd.path.resolve() != Path(cand).resolve()):
            found.append((s["finished_at"], rd))
    if not found:
        raise HarnessError(f"no finished run of suite '{want['suite']}' on hardware profile '{want['hardware_profile']}' "
                           f"at {ref} ({sha[:12]}) under '{root}'")
    return max(found, key=lambda t: t[0])[1]


# -- text output ----------------------------------------------------------------------------------
def fmt_value(v: float | None, sigma: float | None = None) -> str:
    if v is None:
        return "-"
    text = f"{v:.5g}" if abs(v) < 1e6 else f"{v:,.0f}"
    return text + (f" ± {sigma:.2g}" if sigma is not None else "")


def fmt_delta(d: Delta) -> str:
    if d.delta is None:
        return d.verdict
    rel = f" ({d.rel:+.2%})" if d.rel is not None else ""
    zt = "" if d.z is None else (f", z={d.z:+.1f}" if math.isfinite(d.z) else ", exact")
    return f"{d.delta:+.4g}{rel}{zt}{' paired' if d.paired else ''}{f' ({d.note})' if d.note else ''}"


def markdown(cmp: Comparison, limit: int = 50) -> str:
    """A summary for a pull-request comment: headline counts, then every flagged delta."""
    b, c = cmp.base, cmp.cand
    regs, imps = cmp.regressions, cmp.improvements
    icon = "❌" if regs else "✅"
    lines = [
        f"### {icon} qharness compare: {len(regs)} regression(s), {len(imps)} improvement(s)",
        "",
        f"base `{b['run_id']}` ({str(b['git_sha'])[:12]}, {b['hardware_profile']}) → "
        f"candidate `{c['run_id']}` ({str(c['git_sha'])[:12]}, {c['hardware_profile']}); "
        f"significant = beyond {cmp.z:g} standard errors (paired per-token where both scored the same tokens).",
    ]
    lines += [f"> ⚠️ {w}" for w in cmp.warnings]
    shown = [d for d in cmp.deltas if d.verdict not in QUIET]
    if shown:
        lines += ["", "| verdict | model | cell | metric | base | candidate | delta |", "|---|---|---|---|---|---|---|"]
        for d in shown[:limit]:
            lines.append(f"| {d.verdict} | {d.model} | `{d.cell}` | {d.measurement}/{d.metric} | {fmt_value(d.base, d.base_sigma)} "
                         f"| {fmt_value(d.cand, d.cand_sigma)} | {fmt_delta(d)} |")
        if len(shown) > limit:
            lines.append(f"\n… and {len(shown) - limit} more (see the HTML comparison).")
    quiet = sum(d.verdict in QUIET for d in cmp.deltas)
    lines += ["", f"{quiet} other value(s) unchanged, within noise, or not judged (wall times, values without uncertainty)."]
    return "\n".join(lines) + "\n"
