"""Rollout engine benchmark: 1,000 devices in a real store, synthetic telemetry, no agents.

    /work/venv/bin/python bench/bench_rollouts.py [--devices 1000] [--store sqlite|postgresql]

Devices are registered in a SQLite (or PostgreSQL) store; a simulated edge applies
each desired state at once and reports it (the ingestor's write), and every round
inserts prediction records for every device into the telemetry table (the canary on
the candidate, the baseline on the current model). The engine (``RolloutService``)
ticks as fast as it can with ``min_dwell_s: 0``. Printed as JSON:

* ``good``: a good model from 1 % to 100 % over steps 1, 5, 25, 50, 100: wall time, ticks,
  time spent in ticks, rows of telemetry judged;
* ``bad``: a model with +20 % latency, rolled back at the first judged step;
  ``evidence_to_decision_s`` is the time of the tick that judged and acted, measured
  from the moment the deciding telemetry was committed;
* ``detection``: canary samples needed (90 % power, 5 % cohort, baseline 19x larger) to
  catch +20 % latency, and +2 points of error rate (5 % -> 7 %).

The desired-state writer is simulated (no signing, no MQTT): signing and publishing
1,000 documents is measured by the desired-state benchmarks, not here.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cloud.registry.models import ModelRegistry  # noqa: E402
from cloud.rollouts import CohortSamples, Gate, Policy, RolloutService, evaluate  # noqa: E402
from cloud.store import ModelRecord, Store, TelemetryBatchIn, open_store  # noqa: E402

FLEET = "bench"
_seq = itertools.count(1)


class SimulatedEdge:
    def __init__(self, store: Store) -> None:
        self.store = store
        self.is_leader = True
        self.active: dict[str, str] = {}
        self.revisions: dict[str, int] = {}

    def deploy(self, fleet: str, device: str, model: str | None, shadow: str | None = None) -> dict[str, Any]:
        rev = self.revisions[device] = self.revisions.get(device, 0) + 1
        self.active[device] = model or ""
        name, _, version = (model or "@").partition("@")
        with self.store.transaction(write=True) as tx:
            tx.set_reported_state(fleet, device, {"applied_revision": rev, "active": {"name": name, "version": version},
                                                  "update": {"state": "idle", "result": "success"}})
        return {"revision": rev}


def _model(version: str) -> ModelRecord:
    return ModelRecord(name="mlp", version=version, format="onnx", runtime="onnxruntime", quantization="float32",
                       size=1, sha256=uuid.uuid4().hex * 2, inputs=[], outputs=[], metrics={}, params={},
                       metadata={}, parent=None, dataset_hash=None, signature_key_id=None, created_at=time.time())


def feed(store: Store, edge: SimulatedEdge, rng: np.random.Generator, per_device: int, slow: str | None) -> int:
    now = time.time()
    batches = []
    for device, ref in edge.active.items():
        name, _, version = ref.partition("@")
        scale = 1.2 if version == slow else 1.0
        lat = rng.lognormal(np.log(2000), 0.25, per_device) * scale
        top1 = rng.choice(3, per_device, p=[0.5, 0.3, 0.2])
        batches.append(TelemetryBatchIn(FLEET, device, "s", [
            {"seq": next(_seq), "ts": now, "kind": "prediction", "model": name, "version": version,
             "latency_us": float(lat[i]), "summary": {"output": "probs", "top1": int(top1[i]), "mean": 0.3}}
            for i in range(per_device)]))
    store.insert_many(batches)
    return per_device * len(batches)


def run(store: Store, edge: SimulatedEdge, model: str, slow: str | None, per_device: int) -> dict[str, Any]:
    service = RolloutService(store, edge, ModelRegistry(store, None, None))
    policy = {"min_dwell_s": 0, "min_samples": 200, "gates": [
        {"metric": "latency_p95", "threshold": 0.1}, {"metric": "psi", "threshold": 0.2},
        {"metric": "health", "threshold": 0}]}
    rng = np.random.default_rng(1)
    t0 = time.perf_counter()
    rid = service.start(model, "canary", "env=prod", steps=[1, 5, 25, 50, 100], policy=policy, actor="bench",
                        fleet=FLEET)["id"]
    ticks, tick_s, rows, decisions = 0, 0.0, 0, []
    state = "promoting"
    while state in ("promoting", "running", "rolling_back"):
        before = service.status(rid)["state"]
        t = time.perf_counter()
        service.tick()
        dt = time.perf_counter() - t
        ticks, tick_s = ticks + 1, tick_s + dt
        state = service.status(rid)["state"]
        if before == "running" and state != "running":
            decisions.append(dt)
        if state == "running":
            rows += feed(store, edge, rng, per_device, slow)
        if ticks > 500:
            break
    doc = service.status(rid)
    return {"state": state, "wall_s": round(time.perf_counter() - t0, 3), "ticks": ticks,
            "tick_s": round(tick_s, 3), "telemetry_rows": rows, "steps_reached": doc["step"] + 1,
            "evidence_to_decision_s": [round(d, 4) for d in decisions],
            "verdicts": {v["gate"]: v["verdict"] for v in doc["verdicts"][-3:]}}


def detection(rng: np.random.Generator) -> dict[str, Any]:
    out: dict[str, Any] = {}

    def needed(make: Any, gate: Gate) -> int | None:
        for n in (25, 50, 100, 200, 400, 800, 1600, 3200, 6400):
            policy = Policy(min_samples=n, gates=(gate,))
            if sum(evaluate(policy, *make(n))[0].verdict == "fail" for _ in range(20)) >= 18:
                return n
        return None

    def latency(n: int) -> tuple[CohortSamples, CohortSamples]:
        lat = lambda k, s: list(rng.lognormal(np.log(2000), 0.25, k) * s)  # noqa: E731
        return CohortSamples(latencies=lat(n, 1.2)), CohortSamples(latencies=lat(19 * n, 1.0))

    def errors(n: int) -> tuple[CohortSamples, CohortSamples]:
        return (CohortSamples(predictions=n, errors=int(rng.binomial(n, 0.07))),
                CohortSamples(predictions=19 * n, errors=int(rng.binomial(19 * n, 0.05))))

    out["latency_+20pct_threshold_10pct"] = needed(latency, Gate(metric="latency_p95", threshold=0.10))
    out["error_rate_+2pts_threshold_0"] = needed(errors, Gate(metric="error_rate", threshold=0.0))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--devices", type=int, default=1000)
    ap.add_argument("--per-device", type=int, default=20, help="prediction records per device per round")
    ap.add_argument("--store", default=None, help="store URL (default: a SQLite file in a temp dir)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        store = open_store(args.store or f"sqlite://{tmp}/bench.db?synchronous=normal")
        for v in ("1.0.0", "2.0.0", "3.0.0"):
            store.insert_model(_model(v))
        edge = SimulatedEdge(store)
        t = time.perf_counter()
        with store.transaction(write=True) as tx:
            for i in range(args.devices):
                tx.upsert_device(FLEET, f"dev-{i:04d}", tags={"env": "prod"})
        for i in range(args.devices):
            edge.deploy(FLEET, f"dev-{i:04d}", "mlp@1.0.0")
        setup = time.perf_counter() - t
        good = run(store, edge, "mlp@2.0.0", None, args.per_device)
        bad = run(store, edge, "mlp@3.0.0", "3.0.0", args.per_device)
        store.close()
    print(json.dumps({"devices": args.devices, "setup_s": round(setup, 2), "good": good, "bad": bad,
                      "detection_samples_90pct_power": detection(np.random.default_rng(7))}, indent=2))


if __name__ == "__main__":
    main()
