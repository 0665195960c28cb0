"""Paired comparisons of two models on the same items: flips, McNemar's exact test, and the
minimum detectable effect (MDE) a comparison had at its sample size.

Why: overall accuracy can hold while individual answers flip correct <-> wrong (Dutta et al.
2024, "Accuracy is not all you need"); and a comparison that could not have detected a 5-point
drop says nothing when it finds none. Every comparison the harness records carries its MDE, so
the report can mark the underpowered ones instead of presenting them as findings.

MDE convention (MDE_PROTOCOL): the smallest true effect a two-sided test at alpha = 0.05 detects
with 80% power, (z_0.975 + z_0.8) = 2.80 standard errors of the paired difference. For accuracy
on paired items the standard error is sqrt(psi / n) with psi the observed discordance (flip)
rate; McNemar's exact test cannot reject with fewer than 6 discordant items (2 x 0.5^6 = 0.031),
so the detectable accuracy change is never below 6 / n."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats

ALPHA, POWER = 0.05, 0.80
Z_ALPHA = float(stats.norm.ppf(1 - ALPHA / 2))  # 1.96: a two-sided test at ALPHA
Z_MDE = Z_ALPHA + float(stats.norm.ppf(POWER))  # 2.80
MIN_DISCORDANT = 6  # smallest count McNemar's exact test can call significant at alpha 0.05
MDE_PROTOCOL = ("minimum detectable effect: two-sided alpha 0.05, power 0.8 (2.80 standard errors of the paired "
                "difference; tasks: at least 6 discordant items, McNemar's exact test)")
UNDERPOWERED_RECOVERY_POINTS = 5.0  # a task comparison that cannot see a 5-point recovery drop is underpowered


@dataclass(frozen=True)
class Flips:
    """Outcomes of the same n items under a reference and a candidate."""

    n: int
    correct_to_wrong: int
    wrong_to_correct: int

    @property
    def discordant(self) -> int:
        return self.correct_to_wrong + self.wrong_to_correct

    @property
    def rate(self) -> float:
        return self.discordant / self.n if self.n else float("nan")

    @property
    def stderr(self) -> float:
        p = self.rate
        return math.sqrt(p * (1 - p) / self.n) if self.n else float("nan")

    @property
    def interval95(self) -> tuple[float, float]:
        """Wilson score interval of the flip rate."""
        return wilson(self.discordant, self.n)

    @property
    def mcnemar_p(self) -> float:
        return mcnemar_exact(self.correct_to_wrong, self.wrong_to_correct)

    def as_params(self) -> dict:
        lo, hi = self.interval95
        return {"correct_to_wrong": self.correct_to_wrong, "wrong_to_correct": self.wrong_to_correct,
                "flip_rate_ci95": [lo, hi], "mcnemar_p": self.mcnemar_p,
                "mcnemar_protocol": "exact (binomial on the discordant items, two-sided)"}


def flips(reference: np.ndarray, candidate: np.ndarray) -> Flips:
    """Flips between two boolean outcome vectors over the same items."""
    reference, candidate = np.asarray(reference, dtype=bool), np.asarray(candidate, dtype=bool)
    if reference.shape != candidate.shape:
        raise ValueError(f"flips need outcomes of the same items ({reference.shape} vs {candidate.shape})")
    return Flips(int(reference.size), int((reference & ~candidate).sum()), int((~reference & candidate).sum()))


def mcnemar_exact(b: int, c: int) -> float:
    """McNemar's exact two-sided p-value: the discordant pairs b, c under Binomial(b + c, 1/2)."""
    if b + c == 0:
        return 1.0
    return float(stats.binomtest(min(b, c), b + c, 0.5).pvalue)


def wilson(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    if n == 0:
        return (float("nan"), float("nan"))
    z = float(stats.norm.ppf(0.5 + confidence / 2))
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def accuracy_mde(f: Flips) -> float:
    """Smallest paired accuracy change (fraction) detectable on these items."""
    if not f.n:
        return float("nan")
    return max(Z_MDE * math.sqrt(f.rate / f.n), MIN_DISCORDANT / f.n)


def recovery_mde(f: Flips, reference_accuracy: float) -> float | None:
    """Smallest recovery drop (percentage points of the reference's accuracy) detectable here."""
    if not reference_accuracy or not f.n:
        return None
    return float(100 * accuracy_mde(f) / reference_accuracy)


def stderr_mde(stderr: float | None) -> float | None:
    """MDE of a mean difference with this standard error (KLD, ln ppl ratio, ...)."""
    return None if stderr is None or not math.isfinite(stderr) else float(Z_MDE * stderr)


def underpowered_recovery(mde_points: float | None) -> bool:
    return mde_points is None or not math.isfinite(mde_points) or mde_points > UNDERPOWERED_RECOVERY_POINTS
