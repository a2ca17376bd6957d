"""The rollout engine on a real store (SQLite and PostgreSQL), with simulated devices.

Only the outermost edge is simulated: :class:`SimulatedDevices` stands where the signed
desired states and the agents are (it applies each document at once and reports it in
the store, as the ingestor would); telemetry is inserted into the real telemetry table.
The end-to-end run with real agents and Mosquitto is in ``test_rollouts_e2e.py``.
"""

from __future__ import annotations

import itertools
import time
from typing import Any

import numpy as np
import pytest

from cloud import Store
from cloud._exceptions import InvalidTransition, NotFound, PolicyError
from cloud.registry.models import ModelRegistry
from cloud.rollouts import RolloutService
from cloud.store import ModelRecord

FLEET = "plant"
FAST = {"min_dwell_s": 0, "min_samples": 40,
        "gates": [{"metric": "latency_p95", "threshold": 0.1}, {"metric": "error_rate", "threshold": 0.02},
                  {"metric": "psi", "threshold": 0.2}, {"metric": "health", "threshold": 0}]}


class SimulatedDevices:
    """Devices that apply every desired state at once and report it (the ingestor's write)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.is_leader = True
        self.revisions: dict[str, int] = {}
        self.calls: list[tuple[str, str | None, str | None]] = []

    def deploy(self, fleet: str, device: str, model: str | None, shadow: str | None = None) -> dict[str, Any]:
        self.calls.append((device, model, shadow))
        rev = self.revisions[device] = self.revisions.get(device, 0) + 1
        name, _, version = (model or "none@none").partition("@")
        with self.store.transaction(write=True) as tx:
            tx.set_reported_state(fleet, device, {
                "applied_revision": rev, "active": {"name": name, "version": version},
                "update": {"state": "idle", "result": "success", "target": {"name": name, "version": version}},
            })
        return {"revision": rev}

    def deploy_many(self, fleet: str, items: list[tuple[str, str | None, str | None]]) -> dict[str, Any]:
        return {device: self.deploy(fleet, device, model, shadow) for device, model, shadow in items}

    def active(self, device: str) -> str:
        with self.store.transaction() as tx:
            a = tx.get_device(FLEET, device).reported_state["active"]
        return f"{a['name']}@{a['version']}"


def _model(version: str) -> ModelRecord:
    return ModelRecord(name="mlp", version=version, format="onnx", runtime="onnxruntime", quantization="float32",
                       size=1, sha256=version.replace(".", "").ljust(64, "0"), inputs=[], outputs=[], metrics={},
                       params={}, metadata={}, parent=None, dataset_hash=None, signature_key_id=None,
                       created_at=time.time())


@pytest.fixture
def world(store: Store) -> tuple[RolloutService, SimulatedDevices]:
    for v in ("1.0.0", "2.0.0", "3.0.0"):
        store.insert_model(_model(v))
    devices = SimulatedDevices(store)
    for i in range(40):
        store.upsert_device(FLEET, f"dev-{i:02d}", tags={"env": "prod" if i < 36 else "dev"})
        store.set_status(FLEET, f"dev-{i:02d}", {"state": "online"})
        devices.deploy(FLEET, f"dev-{i:02d}", "mlp@1.0.0")
    devices.calls.clear()
    return RolloutService(store, devices, ModelRegistry(store, None, None)), devices


_seq = itertools.count(1)


def feed(store: Store, devices: SimulatedDevices, n: int = 20, bad: str | None = None, seed: int = 0) -> None:
    """Each device serves ``n`` predictions of the model it runs; ``bad`` answers other classes."""
    rng = np.random.default_rng(seed)
    now = time.time()
    for dev in devices.revisions:
        name, _, version = devices.active(dev).partition("@")
        p = [0.1, 0.1, 0.8] if version == bad else [0.5, 0.3, 0.2]
        records = [{"seq": next(_seq), "ts": now, "kind": "prediction", "model": name, "version": version,
                    "latency_us": float(rng.lognormal(np.log(2000), 0.2)),
                    "summary": {"output": "probs", "top1": int(rng.choice(3, p=p)), "mean": 0.33}}
                   for _ in range(n)]
        store.insert_telemetry(FLEET, dev, "s1", records)


def drive(service: RolloutService, devices: SimulatedDevices, rid: str, bad: str | None = None,
          rounds: int = 30) -> dict[str, Any]:
    for i in range(rounds):
        service.tick()
        status = service.status(rid)
        if status["state"] not in ("running", "promoting", "rolling_back"):
            return status
        feed(service.store, devices, bad=bad, seed=i)
    return service.status(rid)


def test_a_good_model_is_promoted_step_by_step_to_100(world: tuple[RolloutService, SimulatedDevices]) -> None:
    service, devices = world
    r = service.start("mlp@2.0.0", "canary", "env=prod", steps=[25, 50, 100], policy=FAST, actor="ana", fleet=FLEET)
    assert r["state"] == "promoting" and r["baseline"] == "mlp@1.0.0"
    status = drive(service, devices, r["id"])
    assert status["state"] == "completed", status["reason"]
    assert {devices.active(f"dev-{i:02d}") for i in range(36)} == {"mlp@2.0.0"}
    assert {devices.active(f"dev-{i:02d}") for i in range(36, 40)} == {"mlp@1.0.0"}  # not targeted
    assert len(devices.calls) == 36  # each target got exactly one document
    actions = [a["action"] for a in status["audit"]]
    assert actions[0] == "start" and actions[-1] == "complete"
    assert actions.count("promote") == 2 and actions.count("step_started") == 3
    assert {v["verdict"] for v in status["verdicts"]} == {"pass"}
    latency = next(v for v in status["verdicts"] if v["gate"] == "latency_p95")["evidence"]
    assert latency["samples"]["canary"] >= 40 and 0 <= latency["p_value"] <= 1


def test_a_bad_model_is_rolled_back_with_its_evidence(world: tuple[RolloutService, SimulatedDevices]) -> None:
    service, devices = world
    r = service.start("mlp@3.0.0", "canary", "env=prod", steps=[25, 50, 100], policy=FAST, actor="ana", fleet=FLEET)
    status = drive(service, devices, r["id"], bad="3.0.0")
    assert status["state"] == "rolled_back", status["reason"]
    assert status["step"] == 0  # caught in the first canary step
    assert {devices.active(f"dev-{i:02d}") for i in range(40)} == {"mlp@1.0.0"}
    cohort = {d for d, m, _ in devices.calls if m == "mlp@3.0.0"}
    assert 0 < len(cohort) < 36 and {d for d, m, _ in devices.calls if m == "mlp@1.0.0"} == cohort
    psi = next(v for v in status["verdicts"] if v["gate"] == "psi")
    assert psi["verdict"] == "fail" and psi["evidence"]["psi"] > 0.2
    rollback = next(a for a in status["audit"] if a["action"] == "rollback")
    assert rollback["actor"] == "engine" and "psi" in rollback["reason"] and rollback["evidence"]["gates"]["psi"] == "fail"


def test_consistent_cohorts_survive_restart_and_offline_devices_are_not_waited_for(
    world: tuple[RolloutService, SimulatedDevices],
) -> None:
    service, devices = world
    for i in range(0, 36, 3):  # a third of the fleet is offline
        service.store.set_status(FLEET, f"dev-{i:02d}", {"state": "offline"})
    real_deploy = devices.deploy

    def offline_aware(fleet: str, device: str, model: str | None, shadow: str | None = None) -> dict[str, Any]:
        if int(device[4:]) % 3 == 0 and device < "dev-36":  # stored and retained, not applied yet
            devices.calls.append((device, model, shadow))
            return {"revision": devices.revisions[device] + 1}
        return real_deploy(fleet, device, model, shadow)

    devices.deploy = offline_aware  # type: ignore[method-assign]
    r = service.start("mlp@2.0.0", "phased", "env=prod", steps=[25, 50, 100], policy=FAST, actor="ana", fleet=FLEET)
    service2 = RolloutService(service.store, devices, service.registry)  # another engine on the same store
    status = drive(service2, devices, r["id"])
    assert status["state"] == "completed"
    assert status["cohorts"]["canary"]["devices"] == 36 and status["cohorts"]["canary"]["applied"] == 24


def test_approval_commands_and_leadership(world: tuple[RolloutService, SimulatedDevices]) -> None:
    service, devices = world
    policy = {**FAST, "approval": {"before_start": True, "before_full": True}}
    r = service.start("mlp@2.0.0", "canary", "devices=dev-01;dev-02;dev-03;dev-04", steps=[50, 100],
                      policy=policy, actor="ana", fleet=FLEET)
    assert r["state"] == "pending_approval"
    assert service.tick() == 0 and devices.calls == []
    with pytest.raises(InvalidTransition):
        service.resume(r["id"], "bob")
    service.approve(r["id"], "bob", "change ticket 42")
    devices.is_leader = False
    assert service.tick() == 0 and devices.calls == []  # a follower never acts
    devices.is_leader = True
    status = drive(service, devices, r["id"])
    assert status["state"] == "pending_approval" and status["step"] == 1  # before 100 %
    status = service.approve(r["id"], "dave", "looks good")
    assert [a["actor"] for a in status["approvals"]] == ["bob", "dave"]
    status = drive(service, devices, r["id"])
    assert status["state"] == "completed"
    assert [a["action"] for a in status["audit"] if a["actor"] != "engine"] == ["start", "approve", "approve"]
    with pytest.raises(NotFound):
        service.status("nope")
    with pytest.raises(PolicyError):
        service.start("mlp@2.0.0", "canary", "env=nowhere", actor="ana", fleet=FLEET)


def test_pause_resume_abort(world: tuple[RolloutService, SimulatedDevices]) -> None:
    service, devices = world
    r = service.start("mlp@2.0.0", "canary", "env=prod", steps=[25, 100], policy=FAST, actor="ana", fleet=FLEET)
    service.tick()
    assert service.pause(r["id"], "ana", "weekend")["state"] == "paused"
    feed(service.store, devices)
    assert service.tick() == 0
    assert service.resume(r["id"], "ana")["state"] == "running"
    status = service.abort(r["id"], "ana", "changed my mind")
    assert status["state"] == "aborted" and status["audit"][-1]["reason"] == "changed my mind"
    with pytest.raises(InvalidTransition):
        service.resume(r["id"], "ana")


def test_blue_green_preloads_flips_and_flips_back(world: tuple[RolloutService, SimulatedDevices]) -> None:
    service, devices = world
    r = service.start("mlp@2.0.0", "bluegreen", "env=prod", policy={"min_dwell_s": 0}, actor="ana", fleet=FLEET)
    service.tick()
    assert sorted(devices.calls) == sorted((f"dev-{i:02d}", "mlp@1.0.0", "mlp@2.0.0") for i in range(36))
    assert service.tick() == 0 and service.status(r["id"])["state"] == "running"  # preloaded: waits
    devices.calls.clear()
    service.promote(r["id"], "ana", "flip")
    service.tick()
    service.tick()
    assert service.status(r["id"])["state"] == "completed"
    assert {c[1:] for c in devices.calls} == {("mlp@2.0.0", None)} and len(devices.calls) == 36
    devices.calls.clear()
    service.rollback(r["id"], "ana", "flip back")
    service.tick()
    assert service.status(r["id"])["state"] == "rolled_back"
    assert {c[1:] for c in devices.calls} == {("mlp@1.0.0", None)} and len(devices.calls) == 36


def test_ab_reports_and_waits_for_a_person(world: tuple[RolloutService, SimulatedDevices]) -> None:
    service, devices = world
    r = service.start("mlp@2.0.0", "ab", "env=prod", policy={**FAST, "gates": [{"metric": "health", "threshold": 0}]},
                      actor="ana", fleet=FLEET)
    status = drive(service, devices, r["id"], rounds=4)
    assert status["state"] == "running" and status["steps"] == [50, 100]
    ab = status["result"]["ab"]
    assert ab["latency_mean_us"]["ci"][0] < ab["latency_mean_us"]["ci"][1] and "winner" in ab
    service.promote(r["id"], "ana", "B is fine")
    assert drive(service, devices, r["id"])["state"] == "completed"


def test_a_policy_can_require_a_passing_hil_run_before_the_start(
        world: tuple[RolloutService, SimulatedDevices]) -> None:
    from cloud.hil import HilRunIn, record_run

    service, devices = world
    policy = {**FAST, "hil": {"required": True, "scenarios": ["steady-replay", "broker-restart"]}}

    def run(scenario: str, passed: bool) -> None:
        record_run(service.store, HilRunIn(model="mlp@2.0.0", scenario=scenario, hardware_profile="x86-gateway",
                                           passed=passed, counts={"tests": 3, "failures": 0 if passed else 1,
                                                                  "errors": 0}))

    def start() -> dict[str, Any]:
        return service.start("mlp@2.0.0", "canary", "env=prod", policy=policy, actor="ana", fleet=FLEET)

    with pytest.raises(PolicyError, match="no HIL run is recorded"):
        start()
    run("steady-replay", True)
    run("broker-restart", False)
    with pytest.raises(PolicyError, match="latest HIL run failed"):
        start()
    run("broker-restart", True)  # fixed: the latest run of each scenario decides
    r = start()
    assert r["state"] == "promoting" and devices.calls == []  # nothing deployed before the start
    assert service.list() and all(x["id"] == r["id"] for x in service.list())  # the refused starts left nothing


def _break_reported_states(store: Store, devices: range) -> None:
    """Reported states of the wrong types, written past the ingestor's parser (an older coordinator's row)."""
    with store.transaction(write=True) as tx:
        for i in devices:
            tx.set_reported_state(FLEET, f"dev-{i:02d}", {
                "applied_revision": "9", "active": {"name": "mlp", "version": "3.0.0"}, "update": 5})


def _fail_collect_of(service: RolloutService, rollout_id: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A bug in one rollout's evaluation (the engine's own code raising), for that rollout only."""
    collect = service.collect

    def failing(r: Any) -> Any:
        if r.id == rollout_id:
            raise RuntimeError("a bug in the evaluation")
        return collect(r)

    monkeypatch.setattr(service, "collect", failing)


def _broken_and_good(service: RolloutService, monkeypatch: pytest.MonkeyPatch) -> tuple[dict, dict]:
    """A rollout whose evaluation raises (on env=dev) beside a good one (on env=prod)."""
    broken = service.start("mlp@3.0.0", "canary", "env=dev", steps=[50, 100], policy=FAST, actor="ana", fleet=FLEET,
                           salt="t1")  # a fixed salt: its first step draws canary devices
    _fail_collect_of(service, broken["id"], monkeypatch)
    good = service.start("mlp@2.0.0", "canary", "env=prod", steps=[25, 50, 100], policy=FAST, actor="ana",
                         fleet=FLEET)
    return broken, good


def test_a_rollout_whose_evaluation_raises_does_not_stop_the_others(
        world: tuple[RolloutService, SimulatedDevices], caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    service, devices = world
    broken, good = _broken_and_good(service, monkeypatch)
    status = drive(service, devices, good["id"])
    assert status["state"] == "completed", status["reason"]
    assert service.status(broken["id"])["state"] == "running"  # retried every tick
    failures = [r for r in caplog.records if r.levelname == "ERROR" and broken["id"] in r.getMessage()]
    assert failures and all(r.exc_info for r in failures)


def test_the_rollout_thread_survives_a_rollout_whose_evaluation_raises(
        world: tuple[RolloutService, SimulatedDevices], caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from ..conftest import wait_until

    service, devices = world
    broken, good = _broken_and_good(service, monkeypatch)
    service.start_background(interval_s=0.01)
    try:
        def completed() -> bool:
            feed(service.store, devices)
            return service.status(good["id"])["state"] == "completed"

        wait_until(completed, what="the good rollout to complete on the background thread")
        assert service._thread is not None and service._thread.is_alive()
    finally:
        service.stop()
    assert any(broken["id"] in r.getMessage() for r in caplog.records if r.levelname == "ERROR")


def test_records_and_states_of_the_wrong_shape_do_not_stall_a_rollout(
        world: tuple[RolloutService, SimulatedDevices], caplog: pytest.LogCaptureFixture) -> None:
    """Stored as devices sent them (validation: fast): a record or a reported state of the
    wrong types is left out of the gates with a warning; the rollout goes on."""
    service, devices = world
    real_deploy = devices.deploy

    def reports_garbage(fleet: str, device: str, model: str | None, shadow: str | None = None) -> dict[str, Any]:
        out = real_deploy(fleet, device, model, shadow)
        _break_reported_states(service.store, range(int(device[4:]), int(device[4:]) + 1))
        return out

    devices.deploy = reports_garbage  # type: ignore[method-assign]
    r = service.start("mlp@3.0.0", "canary", "env=dev", steps=[50, 100], policy=FAST, actor="ana", fleet=FLEET,
                      salt="t1")
    service.tick()  # deployed; the states say nothing usable: the canary devices count as pending, no error
    assert service.status(r["id"])["state"] == "running" and service.status(r["id"])["step"] == 0
    devices.deploy = real_deploy  # type: ignore[method-assign]
    for device, model, shadow in list(devices.calls):  # the devices report again, properly
        devices.revisions[device] -= 1
        real_deploy(FLEET, device, model, shadow)
    now = time.time()
    bad = [{"kind": "prediction", "model": "mlp", "version": "3.0.0", "latency_us": "x"},
           {"kind": "prediction", "model": "mlp", "version": "3.0.0", "latency_us": 5.0, "summary": {"top1": "a"}},
           {"kind": "metrics", "predictions_total": "many", "prediction_errors_total": 0},
           {"kind": "shadow", "shadow_version": "3.0.0", "compared": "some"}]
    for i in range(36, 40):
        service.store.insert_telemetry(FLEET, f"dev-{i:02d}", "s1", [{"seq": next(_seq), "ts": now, **b} for b in bad])
    feed(service.store, devices)
    service.tick()  # judged: the bad records the gates would have read are left out, the rest counts
    assert not [x for x in caplog.records if x.levelname == "ERROR"]
    assert any("telemetry record(s) of the wrong shape left out" in x.getMessage() for x in caplog.records)
    status = drive(service, devices, r["id"])
    assert status["state"] == "completed", status["reason"]
