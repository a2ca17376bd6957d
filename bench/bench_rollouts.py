"""Rollout engine benchmark: 1,000 devices in a real store, synthetic telemetry, no agents.

    .venv/bin/python bench/bench_rollouts.py [--devices 1000] [--store sqlite|postgresql]

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
  catch +20 % latency, +2 points of error rate (5 % -> 7 %) and -2 points of accuracy
  (92 % -> 90 %, labeled feedback records).

The desired-state writer is simulated (no signing, no MQTT) in those runs. The ``sim``
run (``--sim-devices 1000``, ``0`` to skip) is the whole system: a real coordinator
(SQLite, signed desired states over MQTT, ingestion, the engine ticking every 0.2 s),
Mosquitto, and :class:`edgeml.sim.Simulator` devices (one MQTT session each, 2
predictions/s, half of them labeled by feedback, a 2 ms simulated inference time):

* ``good``: a good model over steps 5, 25, 100 with ``min_dwell_s: 0``:
  ``time_to_100_s`` from the start request until every simulated device serves it;
* ``bad``: +50 % latency, rolled back in the 5 % step;
* ``evidence_to_decision_s`` per decision: from the moment the last sample a gate
  needed (``min_samples`` per side, predictions and feedback) was committed by the
  ingestor to the engine's audited decision. It includes the tick interval, and, when
  the first sufficient sample does not decide yet, the wait for more evidence.
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

    def deploy_many(self, fleet: str, items: list[tuple[str, str | None, str | None]]) -> dict[str, Any]:
        return {device: self.deploy(fleet, device, model, shadow) for device, model, shadow in items}


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

    def needed(make: Any, gate: Gate, test: str = "fixed") -> int | None:
        for n in (25, 50, 100, 200, 400, 800, 1600, 3200, 6400):
            policy = Policy(min_samples=n, gates=(gate,), test=test)
            if sum(evaluate(policy, *make(n))[0].verdict == "fail" for _ in range(20)) >= 18:
                return n
        return None

    def latency(n: int) -> tuple[CohortSamples, CohortSamples]:
        lat = lambda k, s: list(rng.lognormal(np.log(2000), 0.25, k) * s)  # noqa: E731
        return CohortSamples(latencies=lat(n, 1.2)), CohortSamples(latencies=lat(19 * n, 1.0))

    def errors(n: int) -> tuple[CohortSamples, CohortSamples]:
        return (CohortSamples(predictions=n, errors=int(rng.binomial(n, 0.07))),
                CohortSamples(predictions=19 * n, errors=int(rng.binomial(19 * n, 0.05))))

    def accuracy(n: int) -> tuple[CohortSamples, CohortSamples]:
        return (CohortSamples(labeled=n, correct=int(rng.binomial(n, 0.90))),
                CohortSamples(labeled=19 * n, correct=int(rng.binomial(19 * n, 0.92))))

    out["latency_+20pct_threshold_10pct"] = needed(latency, Gate(metric="latency_p95", threshold=0.10))
    out["accuracy_-2pts_threshold_0"] = needed(accuracy, Gate(metric="accuracy", threshold=0.0))
    out["error_rate_+2pts_threshold_0"] = needed(errors, Gate(metric="error_rate", threshold=0.0))
    # the same with always-valid p-values (test: sequential): the price of looking at every tick
    out["sequential"] = {
        "latency_+20pct_threshold_10pct": needed(latency, Gate(metric="latency_p95", threshold=0.10), "sequential"),
        "accuracy_-2pts_threshold_0": needed(accuracy, Gate(metric="accuracy", threshold=0.0), "sequential"),
        "error_rate_+2pts_threshold_0": needed(errors, Gate(metric="error_rate", threshold=0.0), "sequential"),
    }
    return out


SIM_POLICY = {"min_dwell_s": 0, "min_samples": 200, "gates": [
    {"metric": "latency_p95", "threshold": 0.1}, {"metric": "psi", "threshold": 0.2},
    {"metric": "accuracy", "threshold": 0.02}, {"metric": "health", "threshold": 0}]}


def sim_run(devices: int, tmp: Path) -> dict[str, Any]:
    """The whole system on ``devices`` simulated agents (see the module docstring)."""
    import os

    import httpx

    from cloud._config import CloudConfig
    from cloud.coordinator import Coordinator
    from cloud.keys import generate_keys
    from edgeml._testing.broker import MosquittoBroker
    from edgeml._testing.models import build_onnx_mlp
    from edgeml.protocol.signing import load_public_keys
    from edgeml.sim import Faults, Simulator

    broker = MosquittoBroker(tmp / "broker").start()
    generate_keys(tmp / "keys")
    os.environ["EDGEML_ROLLOUTS_TICK_S"] = "0.2"
    coordinator = Coordinator(CloudConfig(broker_url=broker.url, db=f"sqlite://{tmp}/sim.db",
                                          http_addr="127.0.0.1:0", artifact_dir=tmp / "artifacts",
                                          signing_key=tmp / "keys" / "fleet.key")).start()
    http = httpx.Client(base_url=coordinator.url, timeout=60)
    sim = None
    try:
        _until(lambda: coordinator.desired.is_leader, 10)
        models = {v: build_onnx_mlp(tmp / f"mlp-{v}.onnx", version=v) for v in ("1.0.0", "1.1.0", "2.0.0")}
        for version, path in models.items():
            with path.open("rb") as fh:
                http.post("/v1/models", data={"name": "mlp", "version": version},
                          files={"file": (path.name, fh)}).raise_for_status()
        with coordinator.store.transaction(write=True) as tx:
            for i in range(devices):
                tx.upsert_device("simfleet", f"sim-{i:05d}", tags={"env": "prod"})
        sim = Simulator(broker.url, models["1.0.0"], devices=devices, fleet="simfleet", rate=2.0,
                        workdir=tmp / "sim", public_keys=load_public_keys(tmp / "keys" / "fleet.pub"),
                        feedback_rate=0.5, faults=Faults(latency_factor={"2.0.0": 1.5}, service_time_us=2000.0))
        t = time.perf_counter()
        sim.start()
        _until(lambda: sim.stats()["connected"] == devices, 120)
        _until(lambda: _reported(coordinator, "simfleet") == devices, 120)
        out: dict[str, Any] = {"devices": devices, "connect_s": round(time.perf_counter() - t, 2)}
        for name, model in (("good", "mlp@1.1.0"), ("bad", "mlp@2.0.0")):
            t = time.perf_counter()
            rid = http.post("/v1/rollouts", json={"model": model, "strategy": "canary", "target": "env=prod",
                                                  "steps": [5, 25, 100], "policy": SIM_POLICY, "fleet": "simfleet",
                                                  "actor": "bench"}).json()["id"]
            final = _until(lambda rid=rid: _final(http, rid), 300)
            done_s = time.perf_counter() - t
            want = model.partition("@")[2] if name == "good" else "1.1.0"
            _until(lambda want=want: sim.stats()["versions"] == {want: devices}, 120)
            out[name] = {
                "state": final["state"], "steps_reached": final["step"] + 1,
                "rollout_done_s": round(done_s, 2),
                ("time_to_100_s" if name == "good" else "time_to_all_back_s"): round(time.perf_counter() - t, 2),
                "evidence_to_decision_s": _evidence_to_decision(coordinator, final, SIM_POLICY["min_samples"]),
                "verdicts": {v["gate"]: v["verdict"] for v in final["verdicts"][-4:]},
                "timeline_s": [[a["action"], round(a["ts"] - final["audit"][0]["ts"], 2)] for a in final["audit"]],
            }
        stats = sim.stats()
        out["records_acked"] = stats["acked"]
        return out
    finally:
        if sim is not None:
            sim.stop()
        http.close()
        coordinator.stop()
        broker.stop()


def _until(predicate: Any, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.05)
    raise TimeoutError("the simulated fleet did not get there")


def _reported(coordinator: Any, fleet: str) -> int:
    with coordinator.store.transaction() as tx:
        return sum(1 for d in tx.list_devices(fleet) if d.reported_state)


def _final(http: Any, rid: str) -> dict[str, Any] | None:
    doc = http.get(f"/v1/rollouts/{rid}").json()
    return doc if doc["state"] in ("completed", "rolled_back", "paused", "aborted") else None


def _evidence_to_decision(coordinator: Any, status: dict[str, Any], need: int) -> list[dict[str, Any]]:
    """For each decision of the engine: when its evidence was complete, and when it acted."""
    name, _, version = status["model"].partition("@")
    out = []
    audit = status["audit"]
    with coordinator.store.transaction() as tx:
        joined = dict(tx.execute("SELECT device_id, joined_step FROM rollout_devices WHERE rollout_id = ?",
                                 (status["id"],)).fetchall())
        for i, entry in enumerate(audit):
            if entry["action"] not in ("promote", "rollback") or entry["actor"] != "engine":
                continue
            start = [a for a in audit[:i] if a["action"] == "step_started"][-1]
            started, step = start["ts"], start["evidence"]["step"]
            cohorts = {d: "canary" if j is not None and j <= step else "baseline" for d, j in joined.items()}
            rows = tx.execute("SELECT device_id, kind, received_at, body FROM telemetry WHERE fleet = ? AND ts >= ? "
                              "AND kind IN ('prediction', 'feedback') ORDER BY received_at",
                              (status["fleet"], started)).fetchall()
            gates = entry["evidence"].get("gates") or {}
            deciding = [g for g, v in gates.items() if v == ("fail" if entry["action"] == "rollback" else "pass")]
            kinds = {"feedback" if g == "accuracy" else "prediction" for g in deciding if g != "health"}
            counts: dict[str, int] = {}
            ready: dict[str, float] = {}
            for device, kind, received, body in rows:
                cohort = cohorts.get(device)
                b = json.loads(body)
                if cohort is None or kind not in kinds or received > entry["ts"] \
                        or (b.get("model") == name and b.get("version") == version) != (cohort == "canary"):
                    continue
                key = f"{cohort}/{kind}"
                counts[key] = counts.get(key, 0) + 1
                if counts[key] == need:
                    ready[key] = received
            evidence_at = max(ready.values()) if len(ready) == 2 * len(kinds) else None
            out.append({"decision": entry["action"], "gates": deciding,
                        "seconds": round(entry["ts"] - evidence_at, 3) if evidence_at else None,
                        "step_to_decision_s": round(entry["ts"] - started, 3), "samples_at_decision": counts})
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--devices", type=int, default=1000)
    ap.add_argument("--per-device", type=int, default=20, help="prediction records per device per round")
    ap.add_argument("--store", default=None, help="store URL (default: a SQLite file in a temp dir)")
    ap.add_argument("--sim-devices", type=int, default=1000, help="simulated agents of the end-to-end run (0: skip)")
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
        sim = sim_run(args.sim_devices, Path(tmp)) if args.sim_devices else None
    print(json.dumps({"devices": args.devices, "setup_s": round(setup, 2), "good": good, "bad": bad,
                      "detection_samples_90pct_power": detection(np.random.default_rng(7)), "sim": sim}, indent=2))


if __name__ == "__main__":
    main()
