"""A/A rollouts on simulated devices: the same network on both sides must not be rolled back.

The whole system (Mosquitto, a coordinator on SQLite, the rollout engine, simulated
devices with their own MQTT sessions) runs four canary rollouts at once, each on its own
group of devices, of a release that only differs by its version string. The measured
false-rollback rate over 50 runs comes from ``bench/bench_rollouts_aa.py`` (README); here
a small run must complete its rollouts, with every gate judged on real evidence.
"""

from __future__ import annotations

from pathlib import Path

from bench.bench_rollouts_aa import run_aa, wilson_upper

from ..conftest import Broker


def test_wilson_upper_bound() -> None:
    assert wilson_upper(0, 50) == wilson_upper(0, 50)  # deterministic
    assert abs(wilson_upper(0, 50) - 0.0713) < 1e-3  # the textbook value for 0/50
    assert abs(wilson_upper(5, 100) - 0.1118) < 1e-3
    assert wilson_upper(0, 0) == 1.0


def test_aa_canary_rollouts_complete(broker: Broker, tmp_path: Path) -> None:
    report = run_aa(tmp_path, broker.url, groups=4, rounds=1, devices_per_group=20, progress=lambda m: None)
    assert report["runs"] == 4 and sum(report["outcomes"].values()) == 4
    # each A/A run completes unless a gate fails by chance (a few % per run at most): at most one
    assert report["false_rollbacks"] <= 1, report
    assert report["outcomes"].get("completed", 0) >= 3
