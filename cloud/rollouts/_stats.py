"""The statistics of the gates, in numpy only (no scipy).

* :func:`mann_whitney_u`: one-sided Mann-Whitney U test ("is ``x`` stochastically larger
  than ``y``?") with the **normal approximation**, the **tie correction** of the variance
  and a 0.5 continuity correction: the same p-value as R's
  ``wilcox.test(x, y, alternative="greater", exact=FALSE, correct=TRUE)`` and scipy's
  ``mannwhitneyu(..., alternative="greater", method="asymptotic")``. Good from about ten
  samples a side; the gates ask for far more.
* :func:`two_proportion_z`: one-sided two-proportion z-test (is rate 1 > rate 2, or
  > rate 2 + a margin?).
* :func:`always_valid_p`: the p-value of a normal-mixture sequential probability ratio
  test (mSPRT; Robbins 1970, Johari et al. 2017) on an asymptotically normal z-statistic:
  valid at *every* look, so an engine that re-judges a step each tick as evidence
  accumulates keeps its false-alarm rate at alpha (a fixed-sample p-value checked at
  every tick does not).
* :func:`psi`: population stability index of two categorical distributions, with a small
  floor on empty bins so an unseen class gives a large but finite value.
* :func:`mean_diff_ci` / :func:`proportion_diff_ci`: normal (Welch / Wald) confidence
  intervals of a difference, used by A/B rollouts.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

#: Probability given to an empty bin by :func:`psi`.
PSI_FLOOR = 1e-4


def norm_sf(z: float) -> float:
    """P(Z > z) of a standard normal."""
    return 0.5 * math.erfc(z / math.sqrt(2.0))


def norm_ppf(p: float) -> float:
    """Inverse of the standard normal CDF (bisection on ``erfc``; |error| < 1e-9)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p}")
    lo, hi = -40.0, 40.0
    for _ in range(100):
        mid = (lo + hi) / 2
        if 1.0 - norm_sf(mid) < p:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


@dataclass(frozen=True, slots=True)
class TestResult:
    statistic: float
    z: float
    p_value: float


def rankdata(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Average ranks (1-based) of ``values`` and the sizes of the tie groups."""
    uniq, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    first = np.cumsum(counts) - counts  # ranks before each distinct value
    return (first + (counts + 1) / 2.0)[inverse], counts


def mann_whitney_u(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> TestResult:
    """One-sided test that ``x`` tends to be larger than ``y``; ``statistic`` is U of x."""
    a, b = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    n1, n2 = a.size, b.size
    if n1 == 0 or n2 == 0:
        raise ValueError("both samples need at least one value")
    ranks, ties = rankdata(np.concatenate([a, b]))
    u1 = float(ranks[:n1].sum() - n1 * (n1 + 1) / 2.0)
    n = n1 + n2
    tie_term = float((ties.astype(float) ** 3 - ties).sum()) / (n * (n - 1)) if n > 1 else 0.0
    var = n1 * n2 / 12.0 * ((n + 1) - tie_term)
    if var <= 0:  # every value equal: no evidence either way
        return TestResult(u1, 0.0, 1.0)
    z = (u1 - n1 * n2 / 2.0 - 0.5) / math.sqrt(var)
    return TestResult(u1, z, norm_sf(z))


#: Scale of the standardized effects the sequential test is tuned to detect fastest
#: (the standard deviation of the normal mixing distribution over the effect).
MSPRT_TAU = 0.2


def effective_n(n1: float, n2: float) -> float:
    """The sample size of a one-sample test with the information of two samples of n1 and n2."""
    return n1 * n2 / (n1 + n2) if n1 > 0 and n2 > 0 else 0.0


def always_valid_p(z: float, n_eff: float, tau: float = MSPRT_TAU, one_sided: bool = True) -> float:
    """Always-valid p-value of the normal-mixture SPRT for ``z`` from ``n_eff`` samples.

    With ``z = delta * sqrt(n_eff)`` for a standardized effect ``delta`` and the mixture
    ``delta ~ N(0, tau^2)``, the likelihood ratio against ``delta = 0`` is
    ``(1 + r)^-1/2 * exp(r z^2 / (2 (1 + r)))`` with ``r = n_eff tau^2``; by Ville's
    inequality it exceeds ``1/alpha`` at *any* look with probability at most ``alpha``
    under the null, so ``min(1, 1/ratio)`` is a p-value valid under optional stopping.
    ``one_sided``: evidence only for ``z > 0`` (the two-sided mixture, conservative)."""
    if one_sided and z <= 0:
        return 1.0
    if n_eff <= 0:
        return 1.0
    r = n_eff * tau * tau
    log_ratio = -0.5 * math.log1p(r) + r * z * z / (2.0 * (1.0 + r))
    return 1.0 if log_ratio <= 0 else math.exp(-log_ratio)


def two_proportion_z(x1: int, n1: int, x2: int, n2: int, margin: float = 0.0) -> TestResult:
    """One-sided z-test that the rate ``x1/n1`` exceeds ``x2/n2`` by more than ``margin``.

    ``margin == 0``: the classic pooled test. ``margin > 0``: the unpooled (Wald) test of
    H0 ``p1 - p2 <= margin``, so only a difference *larger than the margin* is significant."""
    if n1 <= 0 or n2 <= 0:
        raise ValueError("both groups need at least one trial")
    p1, p2 = x1 / n1, x2 / n2
    if margin == 0:
        pooled = (x1 + x2) / (n1 + n2)
        se = math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
    else:  # a floor of half an event per side keeps 0/n from giving se = 0
        q1, q2 = max(x1, 0.5) / n1, max(x2, 0.5) / n2
        se = math.sqrt(q1 * (1 - q1) / n1 + q2 * (1 - q2) / n2)
    if se == 0:  # both 0% or both 100%
        return TestResult(p1 - p2, 0.0, 1.0)
    z = (p1 - p2 - margin) / se
    return TestResult(p1 - p2, z, norm_sf(z))


def psi(expected: Mapping[int, int], actual: Mapping[int, int], floor: float = PSI_FLOOR) -> float:
    """Population stability index of ``actual`` against ``expected`` (counts per class)."""
    classes = sorted(set(expected) | set(actual))
    e = np.array([expected.get(c, 0) for c in classes], dtype=float)
    a = np.array([actual.get(c, 0) for c in classes], dtype=float)
    if e.sum() == 0 or a.sum() == 0:
        raise ValueError("both distributions need at least one observation")
    e = np.maximum(e / e.sum(), floor)
    a = np.maximum(a / a.sum(), floor)
    return float(((a - e) * np.log(a / e)).sum())


def mean_diff_ci(x: np.ndarray, y: np.ndarray, confidence: float) -> tuple[float, float, float]:
    """mean(x) - mean(y) and its Welch normal confidence interval (low, high)."""
    diff = float(x.mean() - y.mean())
    se = math.sqrt(x.var(ddof=1) / x.size + y.var(ddof=1) / y.size)
    half = norm_ppf(0.5 + confidence / 2) * se
    return diff, diff - half, diff + half


def proportion_diff_ci(x1: int, n1: int, x2: int, n2: int, confidence: float) -> tuple[float, float, float]:
    """p1 - p2 and its Wald confidence interval (low, high)."""
    p1, p2 = x1 / n1, x2 / n2
    se = math.sqrt(p1 * (1 - p1) / n1 + p2 * (1 - p2) / n2)
    half = norm_ppf(0.5 + confidence / 2) * se
    return p1 - p2, p1 - p2 - half, p1 - p2 + half
