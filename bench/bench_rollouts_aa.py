"""A/A rollouts: the false-rollback rate of whole canary rollouts on simulated devices.

    .venv/bin/python bench/bench_rollouts_aa.py [--groups 10] [--rounds 5] [--devices-per-group 20]

The whole system, nothing faked but the devices' hardware: Mosquitto, a coordinator on
SQLite (signed desired states over MQTT, ingestion, the rollout engine ticking every
0.2 s) and :class:`edgeml.sim.Simulator` devices, each with its own MQTT session,
running the model on every prediction and reporting a lognormal 2 ms "device" inference
time instead of this host's run time (its load is not a device's latency),
sending telemetry and labeled feedback for half of the predictions.

The fleet is split into ``groups`` of devices (tag ``group=gK``). Each round starts one
canary rollout per group at once (steps 10, 50, 100 %; the shipped canary policy's
gates: latency p95, error rate, PSI, accuracy, health; ``min_dwell_s`` 1 s and 150
samples per side to keep it short) of a release that is the *same network* as the one
the devices serve (A/A: only the version string differs). Every rollout that does not
complete is a false rollback (or a false pause). Printed as JSON: runs, outcomes, the
false-rollback rate with its 95 % Wilson upper bound, the gates that failed, and the
wall time per round.

:func:`run_aa` is also what ``tests/cloud/test_rollouts_aa.py`` runs, smaller.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

FLEET = "aa"
POLICY: dict[str, Any] = {
    "min_dwell_s": 1, "min_samples": 150, "confidence": 0.95, "on_fail": "rollback",
    "on_inconclusive": "wait", "inconclusive_timeout_s": None,
    "gates": [{"metric": "latency_p95", "threshold": 0.10}, {"metric": "error_rate", "threshold": 0.01},
              {"metric": "psi", "threshold": 0.2}, {"metric": "accuracy", "threshold": 0.02},
              {"metric": "health", "threshold": 0}],
}
TERMINAL = ("completed", "rolled_back", "paused", "aborted")


def wilson_upper(failures: int, n: int, z: float = 1.959964) -> float:
    """Upper end of the 95 % Wilson score interval of a proportion."""
    if n == 0:
        return 1.0
    p = failures / n
    centre = p + z * z / (2 * n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return min(1.0, (centre + half) / (1 + z * z / n))


def run_aa(workdir: Path, broker_url: str, *, groups: int, rounds: int, devices_per_group: int,
           rate: float = 10.0, timeout_s: float = 600.0, progress: Any = print) -> dict[str, Any]:
    import httpx

    from cloud._config import CloudConfig
    from cloud.coordinator import Coordinator
    from cloud.keys import generate_keys
    from edgeml._testing import models as modelgen
    from edgeml.protocol.signing import load_public_keys
    from edgeml.sim import Faults, Simulator

    os.environ["EDGEML_ROLLOUTS_TICK_S"] = "0.2"
    keys = workdir / "keys"
    generate_keys(keys)
    config = CloudConfig(broker_url=broker_url, db=f"sqlite://{workdir}/cloud.db", http_addr="127.0.0.1:0",
                         artifact_dir=workdir / "artifacts", signing_key=keys / "fleet.key")
    coordinator = Coordinator(config).start()
    http = httpx.Client(base_url=coordinator.url, timeout=30)
    sim = None
    try:
        deadline = time.monotonic() + 10
        while not coordinator.desired.is_leader and time.monotonic() < deadline:
            time.sleep(0.05)
        # the same network (seed 0) under every version: an A/A comparison
        versions = ["1.0.0"] + [f"1.0.{k}" for k in range(1, rounds + 1)]
        paths = {v: modelgen.build_onnx_mlp(workdir / f"mlp-{v}.onnx", version=v) for v in versions}
        for version, path in paths.items():
            with path.open("rb") as fh:
                r = http.post("/v1/models", data={"name": "mlp", "version": version}, files={"file": (path.name, fh)})
            r.raise_for_status()
        n = groups * devices_per_group
        with coordinator.store.transaction(write=True) as tx:
            for i in range(n):
                tx.upsert_device(FLEET, f"sim-{i:05d}", tags={"group": f"g{i // devices_per_group}"})
        sim = Simulator(broker_url, paths["1.0.0"], devices=n, fleet=FLEET, rate=rate, workdir=workdir / "sim",
                        faults=Faults(service_time_us=2000.0, accuracy={"*": 0.9}),
                        public_keys=load_public_keys(keys / "fleet.pub"), feedback_rate=0.5)
        sim.start()
        _wait(lambda: sim.stats()["connected"] == n, 60, "every simulated device connected")
        runs: list[dict[str, Any]] = []
        round_s: list[float] = []
        for k in range(1, rounds + 1):
            t0 = time.monotonic()
            ids = []
            for g in range(groups):
                r = http.post("/v1/rollouts", json={"model": f"mlp@1.0.{k}", "strategy": "canary",
                                                    "target": f"group=g{g}", "steps": [10, 50, 100],
                                                    "policy": POLICY, "fleet": FLEET, "actor": "aa-bench"})
                r.raise_for_status()
                ids.append(r.json()["id"])
            states: dict[str, dict[str, Any]] = {}

            def done(ids: list[str] = ids, states: dict[str, dict[str, Any]] = states) -> bool:
                for rid in ids:
                    if rid not in states:
                        doc = http.get(f"/v1/rollouts/{rid}").json()
                        if doc["state"] in TERMINAL:
                            states[rid] = doc
                return len(states) == len(ids)

            try:
                _wait(done, timeout_s, f"round {k}: {groups} rollouts finished")
            except TimeoutError as exc:
                stuck = {rid: (d := http.get(f"/v1/rollouts/{rid}").json())["state"] + f" step {d['step']}: "
                         f"{(d.get('result') or {}).get('last_evaluation', {}).get('gates')}"
                         for rid in ids if rid not in states}
                raise TimeoutError(f"{exc}; unfinished: {stuck}") from None
            round_s.append(time.monotonic() - t0)
            for rid in ids:
                doc = states[rid]
                failed = sorted({v["gate"] for v in doc.get("verdicts", []) if v["verdict"] == "fail"})
                runs.append({"id": rid, "round": k, "state": doc["state"], "step": doc["step"], "failed": failed})
            outcome = Counter(r["state"] for r in runs if r["round"] == k)
            progress(f"round {k}/{rounds}: {dict(outcome)} in {round_s[-1]:.1f} s")
        false = [r for r in runs if r["state"] != "completed"]
        return {
            "runs": len(runs), "groups": groups, "rounds": rounds, "devices": n, "rate_per_device": rate,
            "outcomes": dict(Counter(r["state"] for r in runs)),
            "false_rollbacks": len(false),
            "false_rollback_rate": len(false) / len(runs),
            "false_rollback_rate_upper95": round(wilson_upper(len(false), len(runs)), 4),
            "failed_gates": dict(Counter(g for r in false for g in r["failed"])),
            "round_s": [round(s, 1) for s in round_s],
            "policy": POLICY,
        }
    finally:
        if sim is not None:
            sim.stop()
        http.close()
        coordinator.stop()


def _wait(check: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.2)
    raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--groups", type=int, default=10, help="rollouts run at once (one per group)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--devices-per-group", type=int, default=20)
    parser.add_argument("--rate", type=float, default=10.0, help="predictions per second per device")
    args = parser.parse_args()
    from edgeml._testing.broker import MosquittoBroker

    with tempfile.TemporaryDirectory(prefix="edgeml-aa-") as tmp:
        broker = MosquittoBroker(Path(tmp) / "broker").start()
        try:
            report = run_aa(Path(tmp), broker.url, groups=args.groups, rounds=args.rounds,
                            devices_per_group=args.devices_per_group, rate=args.rate,
                            progress=lambda m: print(m, file=sys.stderr, flush=True))
        finally:
            broker.stop()
    print(json.dumps(report))
    return 0 if report["false_rollback_rate"] <= 0.05 else 1


if __name__ == "__main__":
    sys.exit(main())
