"""Statistics, assignment and the transition table of cloud.rollouts (no I/O)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from cloud._exceptions import PolicyError
from cloud.rollouts import (
    TRANSITIONS,
    CohortSamples,
    Gate,
    Policy,
    RolloutState,
    bucket,
    evaluate,
    parse_selector,
)
from cloud.rollouts._gates import FAIL, ab_report
from cloud.rollouts._policy import load_policy
from cloud.rollouts._stats import mann_whitney_u, norm_ppf, psi, two_proportion_z


def test_mann_whitney_known_values() -> None:
    # R: wilcox.test(6:10, 1:5, alternative="greater", exact=FALSE, correct=TRUE) -> W = 25, p = 0.006092
    r = mann_whitney_u([6, 7, 8, 9, 10], [1, 2, 3, 4, 5])
    assert r.statistic == 25 and r.p_value == pytest.approx(0.0060923, abs=1e-6)
    assert mann_whitney_u([1, 2, 3, 4, 5], [6, 7, 8, 9, 10]).p_value == pytest.approx(0.996692, abs=1e-5)
    # ties: x = [1,2,2,3], y = [2,3,3,4]; tie groups 2 (x3) and 3 (x3) shrink the variance
    r = mann_whitney_u([2, 3, 3, 4], [1, 2, 2, 3])
    var = 16 / 12 * (9 - (24 + 24) / 56)
    assert r.statistic == 13 and r.p_value == pytest.approx(0.5 * math.erfc((13 - 8 - 0.5) / math.sqrt(var) / math.sqrt(2)))


def test_mann_whitney_is_close_to_the_exact_distribution() -> None:
    x, y = [3.1, 4.5, 5.2, 6.0, 7.7, 8.1, 9.4, 9.9], [1.0, 2.2, 2.9, 3.5, 4.1, 5.0, 6.3, 7.0]
    values = np.array(x + y)
    u_obs = mann_whitney_u(x, y).statistic
    count = total = 0
    for idx in itertools.combinations(range(16), 8):
        total += 1
        count += mann_whitney_u(values[list(idx)], np.delete(values, list(idx))).statistic >= u_obs
    assert mann_whitney_u(x, y).p_value == pytest.approx(count / total, abs=0.01)


def test_two_proportion_and_psi() -> None:
    r = two_proportion_z(30, 100, 20, 100)
    assert r.z == pytest.approx(1.63299, abs=1e-4) and r.p_value == pytest.approx(0.05124, abs=1e-4)
    assert two_proportion_z(0, 50, 0, 50).p_value == 1.0
    assert psi({0: 50, 1: 50}, {0: 50, 1: 50}) == 0.0
    # textbook: 0.5/0.5 -> 0.6/0.4: (0.1 ln 1.2) + (-0.1 ln 0.8) = 0.040546
    assert psi({0: 50, 1: 50}, {0: 60, 1: 40}) == pytest.approx(0.0405465, abs=1e-6)
    assert norm_ppf(0.975) == pytest.approx(1.959964, abs=1e-6)


def test_assignment_is_consistent_and_cohorts_grow_monotonically() -> None:
    devices = [f"dev-{i}" for i in range(2000)]
    buckets = {d: bucket(d, "salt-1") for d in devices}
    assert buckets == {d: bucket(d, "salt-1") for d in devices}  # stable
    previous: set[str] = set()
    for step in (1, 5, 25, 50, 100):
        cohort = {d for d, b in buckets.items() if b < step * 100}
        assert previous <= cohort
        assert abs(len(cohort) / len(devices) - step / 100) < 0.03
        previous = cohort
    assert len(previous) == len(devices)
    other = {d for d in devices if bucket(d, "salt-2") < 500}
    assert other != {d for d, b in buckets.items() if b < 500}  # another rollout draws other devices


def test_selector_and_policy_parsing(tmp_path) -> None:  # noqa: ANN001
    s = parse_selector("env=prod,hw=pi4")
    assert s.tags == {"env": "prod"} and s.hardware_profile == "pi4"
    assert parse_selector("devices=a;b").devices == {"a", "b"}
    with pytest.raises(PolicyError, match="not key=value"):
        parse_selector("env")
    bad = tmp_path / "p.yaml"
    bad.write_text("steps: [50, 5]\n")
    with pytest.raises(PolicyError, match="steps"):
        load_policy(bad)
    for name in ("canary", "phased", "bluegreen", "ab", "shadow"):
        assert isinstance(load_policy(f"configs/rollouts/{name}.yaml"), Policy)


def test_transition_table_is_closed_and_every_state_is_reachable() -> None:
    reachable, frontier = {RolloutState.PROMOTING, RolloutState.PENDING_APPROVAL}, [RolloutState.PROMOTING,
                                                                                   RolloutState.PENDING_APPROVAL]
    while frontier:
        s = frontier.pop()
        for (src, _), dst in TRANSITIONS.items():
            if src is s and dst not in reachable:
                reachable.add(dst)
                frontier.append(dst)
    assert reachable == set(RolloutState)
    for (src, _), _dst in TRANSITIONS.items():
        assert src not in (RolloutState.ROLLED_BACK, RolloutState.ABORTED)  # final


POLICY = Policy(min_samples=200, gates=(Gate(metric="latency_p95", threshold=0.10),
                                        Gate(metric="error_rate", threshold=0.01)))


def _cohort(rng: np.random.Generator, n: int, scale: float = 1.0, error_rate: float = 0.01) -> CohortSamples:
    lat = rng.lognormal(mean=np.log(2000), sigma=0.3, size=n) * scale
    return CohortSamples(latencies=list(lat), predictions=n, errors=int(rng.binomial(n, error_rate)))


def test_aa_runs_do_not_fail() -> None:
    """50 A/A evaluations (same distribution both sides, a 5 % cohort): false-fail rate <= 5 %."""
    rng = np.random.default_rng(11)
    fails = sum(any(v.verdict == FAIL for v in evaluate(POLICY, _cohort(rng, 300), _cohort(rng, 5700)))
                for _ in range(50))
    print(f"A/A false-fail rate: {fails}/50")
    assert fails / 50 <= 0.05


def test_latency_regression_of_20_percent_in_a_5_percent_cohort_is_caught() -> None:
    rng = np.random.default_rng(5)
    needed = None
    for n in (25, 50, 100, 200, 400, 800):
        policy = Policy(min_samples=n, gates=(Gate(metric="latency_p95", threshold=0.10),))
        caught = sum(evaluate(policy, _cohort(rng, n, scale=1.2), _cohort(rng, n * 19))[0].verdict == FAIL
                     for _ in range(20))
        if caught >= 18:  # 90 % power
            needed = n
            break
    print(f"+20 % latency caught with 90 % power from {needed} canary samples")
    assert needed is not None and needed <= 800


def test_ab_report_declares_a_winner_only_when_significant() -> None:
    rng = np.random.default_rng(2)
    same = ab_report(_cohort(rng, 500), _cohort(rng, 500), 0.95, 100)
    assert same["latency_mean_us"]["ci"][0] < 0 < same["latency_mean_us"]["ci"][1] and same["winner"] is None
    faster = ab_report(_cohort(rng, 500, scale=0.8), _cohort(rng, 500), 0.95, 100)
    assert faster["latency_mean_us"]["winner"] == "candidate"


def test_ab_report_compares_accuracy_from_feedback() -> None:
    better = ab_report(CohortSamples(labeled=2000, correct=1900), CohortSamples(labeled=2000, correct=1780), 0.95, 100)
    acc = better["accuracy"]
    assert acc["winner"] == "candidate" and acc["ci"][0] > 0 and abs(acc["difference"] - 0.06) < 1e-9
    assert better["winner"] == "candidate"
    tie = ab_report(CohortSamples(labeled=300, correct=270), CohortSamples(labeled=300, correct=272), 0.95, 100)
    assert tie["accuracy"]["winner"] is None and tie["accuracy"]["ci"][0] < 0 < tie["accuracy"]["ci"][1]
    few = ab_report(CohortSamples(labeled=50, correct=50), CohortSamples(labeled=50, correct=10), 0.95, 100)
    assert "accuracy" not in few and few["winner"] is None


def test_always_valid_p_value_by_hand() -> None:
    from cloud.rollouts._stats import always_valid_p, effective_n

    n = effective_n(150, 1350)
    assert n == pytest.approx(135.0)
    r = n * 0.2 ** 2  # tau = 0.2
    want = math.exp(-(-0.5 * math.log1p(r) + r * 3.2 ** 2 / (2 * (1 + r))))
    assert always_valid_p(3.2, n) == pytest.approx(want)
    assert always_valid_p(-3.2, n) == 1.0  # one-sided: no evidence the other way
    assert always_valid_p(0.5, n) == 1.0  # a likelihood ratio below 1 is no evidence


def test_repeated_looks_inflate_a_fixed_test_but_not_the_always_valid_one() -> None:
    """A/A streams looked at 40 times each: the share of streams that ever cross alpha."""
    from cloud.rollouts._stats import always_valid_p, norm_sf

    rng = np.random.default_rng(5)
    paths, looks, per_look = 2000, 40, 25
    sums = np.cumsum(rng.standard_normal((paths, looks * per_look)), axis=1)
    ns = np.arange(per_look, looks * per_look + 1, per_look)
    z = sums[:, ns - 1] / np.sqrt(ns)  # the z-statistic at each look
    fixed = (np.vectorize(norm_sf)(z) < 0.05).any(axis=1).mean()
    seq = (np.vectorize(always_valid_p)(z, np.broadcast_to(ns, z.shape)) < 0.05).any(axis=1).mean()
    assert fixed > 0.15  # one-sided 5 % test looked at 40 times: far above 5 %
    assert seq <= 0.05
    # and it still finds a real effect: delta = 0.3 standard deviations
    shifted = sums + 0.3 * np.arange(1, looks * per_look + 1)
    zs = shifted[:, ns - 1] / np.sqrt(ns)
    assert (np.vectorize(always_valid_p)(zs, np.broadcast_to(ns, zs.shape)) < 0.05).any(axis=1).mean() > 0.99


def test_fixed_policies_judge_each_statistical_gate_once_per_step() -> None:
    """Under ``test: fixed`` the first conclusive latency verdict of a step is kept, even if
    later evidence would say otherwise (one look per test)."""
    from types import SimpleNamespace

    from cloud.rollouts._gates import Verdict
    from cloud.rollouts._service import _lock_verdicts

    first, locks = _lock_verdicts(SimpleNamespace(step=0, result={}), [Verdict("latency_p95", "pass", {"p_value": 0.4}),
                                        Verdict("accuracy", "inconclusive", {}), Verdict("psi", "pass", {})])
    assert [v.verdict for v in first] == ["pass", "inconclusive", "pass"]
    assert set(locks["verdicts"]) == {"latency_p95"}  # psi is not a test; accuracy was not judged yet
    later = SimpleNamespace(step=0, result={"gate_locks": locks})
    second, locks2 = _lock_verdicts(later, [Verdict("latency_p95", "fail", {"p_value": 0.001}),
                                            Verdict("accuracy", "fail", {"p_value": 0.01}),
                                            Verdict("psi", "fail", {})])
    assert [v.verdict for v in second] == ["pass", "fail", "fail"]
    assert second[0].evidence["judged_once"] is True and second[0].evidence["p_value"] == 0.4
    assert set(locks2["verdicts"]) == {"latency_p95", "accuracy"}
    later.step = 1  # a new step judges again
    third, _ = _lock_verdicts(later, [Verdict("latency_p95", "fail", {"p_value": 0.001})])
    assert third[0].verdict == "fail"
