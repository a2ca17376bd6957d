"""Gates: canary against baseline over the same window, each verdict with its evidence.

:class:`CohortSamples` is what one cohort produced during the window (built from the
telemetry table by :func:`collect`); :func:`evaluate` judges every gate of a policy and
returns one :class:`Verdict` per gate: ``pass``, ``fail`` or ``inconclusive`` (too few
samples on a side), with the counts, statistics, p-values and thresholds behind it.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ._policy import Gate, Policy
from ._stats import (
    always_valid_p,
    effective_n,
    mann_whitney_u,
    mean_diff_ci,
    norm_ppf,
    proportion_diff_ci,
    psi,
    two_proportion_z,
)

PASS, FAIL, INCONCLUSIVE = "pass", "fail", "inconclusive"


@dataclass
class CohortSamples:
    """One cohort's telemetry over the evaluation window."""

    latencies: list[float] = field(default_factory=list)
    predictions: int = 0  # from metrics records (predictions_total deltas); else the prediction records
    errors: int = 0  # prediction_errors_total deltas
    top1: Counter[int] = field(default_factory=Counter)
    shadow_compared: int = 0
    shadow_agreed: float = 0.0
    shadow_latency_p95: list[float] = field(default_factory=list)
    primary_latency_p95: list[float] = field(default_factory=list)
    labeled: int = 0  # feedback records that say whether the prediction was correct
    correct: int = 0
    devices: int = 0
    unhealthy: list[str] = field(default_factory=list)

    @property
    def trials(self) -> int:
        return max(self.predictions, len(self.latencies))


@dataclass(frozen=True, slots=True)
class Verdict:
    gate: str
    verdict: str
    evidence: dict[str, Any]


_SEQ = {"sequential": "; always-valid p-value (normal-mixture SPRT: valid at every look)", "fixed": ""}


def _p(policy: Policy, z: float, fixed: float, n: dict[str, int]) -> float:
    """The p-value a gate decides on: always-valid for a step judged at every tick."""
    if policy.test == "fixed":
        return fixed
    return always_valid_p(z, effective_n(n["canary"], n["baseline"]))


def _fixed(policy: Policy, p: float) -> dict[str, float]:
    return {"fixed_sample_p_value": p} if policy.test == "sequential" else {}


def _short(gate: Gate, policy: Policy, n: dict[str, int]) -> Verdict | None:
    need = policy.samples_for(gate)
    if min(n.values()) < need:
        return Verdict(gate.metric, INCONCLUSIVE, {"samples": n, "min_samples": need, "why": "not enough samples"})
    return None


def latency_gate(gate: Gate, policy: Policy, canary: CohortSamples, baseline: CohortSamples) -> Verdict:
    n = {"canary": len(canary.latencies), "baseline": len(baseline.latencies)}
    if (short := _short(gate, policy, n)) is not None:
        return short
    c, b = np.asarray(canary.latencies), np.asarray(baseline.latencies)
    test = mann_whitney_u(c, b * (1.0 + gate.threshold))  # H0: canary <= baseline grown by the threshold
    p95c, p95b = float(np.percentile(c, 95)), float(np.percentile(b, 95))
    growth = p95c / p95b - 1.0 if p95b > 0 else math.inf
    p = _p(policy, test.z, test.p_value, n)
    failed = p < policy.alpha and growth > gate.threshold
    return Verdict(gate.metric, FAIL if failed else PASS, {
        "samples": n, "test": "mann-whitney-u one-sided against baseline x (1 + threshold) "
                              "(normal approx., tie correction)" + _SEQ[policy.test],
        "u": test.statistic, "z": round(test.z, 4), "p_value": p, **_fixed(policy, test.p_value),
        "alpha": policy.alpha,
        "p95_us": {"canary": p95c, "baseline": p95b}, "p95_growth": growth, "threshold": gate.threshold,
        "median_us": {"canary": float(np.median(c)), "baseline": float(np.median(b))},
    })


def error_rate_gate(gate: Gate, policy: Policy, canary: CohortSamples, baseline: CohortSamples) -> Verdict:
    n = {"canary": canary.trials, "baseline": baseline.trials}
    if (short := _short(gate, policy, n)) is not None:
        return short
    test = two_proportion_z(canary.errors, n["canary"], baseline.errors, n["baseline"], margin=gate.threshold)
    rates = {"canary": canary.errors / n["canary"], "baseline": baseline.errors / n["baseline"]}
    p = _p(policy, test.z, test.p_value, n)
    failed = p < policy.alpha
    return Verdict(gate.metric, FAIL if failed else PASS, {
        "samples": n, "errors": {"canary": canary.errors, "baseline": baseline.errors}, "rates": rates,
        "test": "two-proportion z one-sided, H0: difference <= threshold" + _SEQ[policy.test], "z": round(test.z, 4),
        "p_value": p, **_fixed(policy, test.p_value),
        "alpha": policy.alpha, "difference": test.statistic, "threshold": gate.threshold,
    })


def psi_gate(gate: Gate, policy: Policy, canary: CohortSamples, baseline: CohortSamples) -> Verdict:
    n = {"canary": sum(canary.top1.values()), "baseline": sum(baseline.top1.values())}
    if (short := _short(gate, policy, n)) is not None:
        return short
    value = psi(dict(baseline.top1), dict(canary.top1))
    return Verdict(gate.metric, FAIL if value > gate.threshold else PASS, {
        "samples": n, "psi": value, "threshold": gate.threshold,
        "top1": {"canary": _shares(canary.top1), "baseline": _shares(baseline.top1)},
    })


def shadow_gate(gate: Gate, policy: Policy, canary: CohortSamples, baseline: CohortSamples) -> Verdict:
    n = {"canary": canary.shadow_compared}
    if (short := _short(gate, policy, n)) is not None:
        return short
    rate = canary.shadow_agreed / canary.shadow_compared
    z = norm_ppf(1 - policy.alpha / 2)
    upper = min(1.0, rate + z * math.sqrt(max(rate * (1 - rate), 1e-12) / canary.shadow_compared))
    verdict = FAIL if upper < gate.threshold else PASS if rate >= gate.threshold else INCONCLUSIVE
    return Verdict(gate.metric, verdict, {
        "samples": n, "agreement": rate, "upper_bound": upper, "confidence": policy.confidence,
        "threshold": gate.threshold,
        "latency_p95_us": {"shadow": _mean(canary.shadow_latency_p95), "primary": _mean(canary.primary_latency_p95)},
    })


def accuracy_gate(gate: Gate, policy: Policy, canary: CohortSamples, baseline: CohortSamples) -> Verdict:
    n = {"canary": canary.labeled, "baseline": baseline.labeled}
    if (short := _short(gate, policy, n)) is not None:
        return short
    # H0: baseline - canary <= threshold; a significant excess is a material drop
    test = two_proportion_z(baseline.correct, n["baseline"], canary.correct, n["canary"], margin=gate.threshold)
    acc = {"canary": canary.correct / n["canary"], "baseline": baseline.correct / n["baseline"]}
    p = _p(policy, test.z, test.p_value, n)
    failed = p < policy.alpha
    return Verdict(gate.metric, FAIL if failed else PASS, {
        "samples": n, "correct": {"canary": canary.correct, "baseline": baseline.correct}, "accuracy": acc,
        "test": "two-proportion z one-sided, H0: baseline - canary accuracy <= threshold" + _SEQ[policy.test],
        "z": round(test.z, 4), "p_value": p, **_fixed(policy, test.p_value), "alpha": policy.alpha, "drop": test.statistic, "threshold": gate.threshold,
    })


def health_gate(gate: Gate, policy: Policy, canary: CohortSamples, baseline: CohortSamples) -> Verdict:
    failed = len(canary.unhealthy) > gate.threshold
    return Verdict(gate.metric, FAIL if failed else PASS, {
        "devices": canary.devices, "unhealthy": sorted(canary.unhealthy), "threshold": gate.threshold,
    })


GATES = {"latency_p95": latency_gate, "error_rate": error_rate_gate, "psi": psi_gate,
         "shadow_agreement": shadow_gate, "health": health_gate, "accuracy": accuracy_gate}


def evaluate(policy: Policy, canary: CohortSamples, baseline: CohortSamples,
             metrics: Iterable[str] | None = None) -> list[Verdict]:
    """Every gate of the policy (or only those whose metric is in ``metrics``)."""
    wanted = None if metrics is None else set(metrics)
    return [GATES[g.metric](g, policy, canary, baseline) for g in policy.gates if wanted is None or g.metric in wanted]


def overall(verdicts: Sequence[Verdict]) -> str:
    kinds = {v.verdict for v in verdicts}
    return FAIL if FAIL in kinds else INCONCLUSIVE if INCONCLUSIVE in kinds else PASS


def ab_report(canary: CohortSamples, baseline: CohortSamples, confidence: float, min_samples: int) -> dict[str, Any]:
    """A/B: differences (B = candidate minus A = current) of mean latency, error rate and
    accuracy (labeled feedback) with confidence intervals; a metric names a winner only when
    its interval excludes zero, and the report names one only when no metric disagrees."""
    report: dict[str, Any] = {"confidence": confidence}
    c, b = np.asarray(canary.latencies), np.asarray(baseline.latencies)
    if min(c.size, b.size) >= max(min_samples, 2):
        diff, lo, hi = mean_diff_ci(c, b, confidence)
        winner = "candidate" if hi < 0 else "current" if lo > 0 else None
        report["latency_mean_us"] = {"difference": diff, "ci": [lo, hi], "samples": [int(c.size), int(b.size)],
                                     "winner": winner}
    if min(canary.trials, baseline.trials) >= min_samples:
        diff, lo, hi = proportion_diff_ci(canary.errors, canary.trials, baseline.errors, baseline.trials, confidence)
        winner = "candidate" if hi < 0 else "current" if lo > 0 else None
        report["error_rate"] = {"difference": diff, "ci": [lo, hi], "samples": [canary.trials, baseline.trials],
                                "winner": winner}
    if min(canary.labeled, baseline.labeled) >= min_samples:  # higher is better here
        diff, lo, hi = proportion_diff_ci(canary.correct, canary.labeled, baseline.correct, baseline.labeled,
                                          confidence)
        winner = "candidate" if lo > 0 else "current" if hi < 0 else None
        report["accuracy"] = {"difference": diff, "ci": [lo, hi], "samples": [canary.labeled, baseline.labeled],
                              "winner": winner}
    winners = {m["winner"] for m in report.values() if isinstance(m, dict) and m.get("winner")}
    report["winner"] = winners.pop() if len(winners) == 1 else None
    return report


def _shares(counts: Counter[int]) -> dict[str, float]:
    total = sum(counts.values()) or 1
    return {str(k): v / total for k, v in sorted(counts.items())}


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None
