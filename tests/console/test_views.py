"""The console's JSON views on SQLite and PostgreSQL: known telemetry in, known numbers out."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
import pytest

from cloud import Store
from cloud._config import CloudConfig
from cloud.api._console import (
    _Watcher,
    device_health,
    device_telemetry,
    fleet_overview,
    model_view,
)
from cloud.artifacts import ArtifactStore
from cloud.coordinator import Coordinator
from cloud.registry.models import ModelRegistry
from cloud.rollouts import _repo
from cloud.tokens import audit_entries
from edgeml._testing import models as modelgen

from ..cloud.conftest import make_store, store, store_url  # noqa: F401  (fixtures: each store kind)

FLEET = "plant"


def _state(version: str, result: str = "success") -> dict[str, object]:
    return {"active": {"name": "mlp", "version": version, "sha256": "0" * 64}, "applied_revision": 2,
            "update": {"state": "idle", "result": result}}


def _fleet(store: Store, now: float) -> None:  # noqa: F811
    for device, version, online in (("a", "1.0.0", True), ("b", "1.1.0", True), ("c", "1.0.0", False)):
        store.upsert_device(FLEET, device)
        store.set_status(FLEET, device, {"state": "online" if online else "offline"}, seen_at=now)
        with store.transaction(write=True) as tx:
            tx.set_reported_state(FLEET, device, _state(version, "rolled_back" if device == "b" else "success"),
                                  seen_at=now)
    # device a: 20 predictions, one a second, latencies 1..20 ms, classes 0 (15) and 1 (5)
    records = [{"seq": i + 1, "ts": now - 19.5 + i, "kind": "prediction", "model": "mlp", "version": "1.0.0",
                "latency_us": 1000.0 * (i + 1), "summary": {"top1": 0 if i < 15 else 1}} for i in range(20)]
    records += [{"seq": 21, "ts": now - 1, "kind": "feedback", "correct": True},
                {"seq": 22, "ts": now - 1, "kind": "feedback", "correct": False},
                {"seq": 23, "ts": now - 1, "kind": "event", "name": "update_state", "level": "info", "data": {}}]
    store.insert_telemetry(FLEET, "a", "s1", records)


def test_overview_counts_devices_versions_and_health(store: Store) -> None:  # noqa: F811
    now = time.time()
    _fleet(store, now)
    o = fleet_overview(store, None, FLEET, now)
    assert (o["devices"], o["online"], o["offline"], o["records"]) == (3, 2, 1, 23)
    assert {v["model"]: (v["devices"], v["online"]) for v in o["versions"]} == {"mlp@1.0.0": (2, 1),
                                                                                "mlp@1.1.0": (1, 1)}
    assert o["health"] == {"ok": 1, "update failed": 1, "offline": 1}
    assert {d["device_id"]: d["health"] for d in o["device_list"]} == {"a": "ok", "b": "update failed", "c": "offline"}
    assert device_health(store.get_device(FLEET, "a"), gaps=2, now=now) == "gaps"
    assert device_health(store.get_device(FLEET, "a"), gaps=0, now=now + 3600) == "silent"


def test_device_series_aggregates_latency_classes_and_feedback(store: Store) -> None:  # noqa: F811
    now = time.time()
    _fleet(store, now)
    s = device_telemetry(store, FLEET, "a", now, window_s=600, buckets=1)
    assert s["window"][0] == pytest.approx(now - 19.5)  # a young device: the buckets span its data
    [bucket] = s["latency_us"]
    assert (bucket["n"], bucket["p50"], bucket["p95"]) == (20, 10_000.0, 19_000.0)
    assert s["top1"] == {"0": 15, "1": 5} and s["versions"] == {"mlp@1.0.0": 20}
    assert s["feedback"] == {"labeled": 2, "correct": 1}
    assert s["drift_psi"] == 0.0  # the only device sending: its distribution is the fleet's
    assert [e["name"] for e in s["events"]] == ["update_state"]
    four = device_telemetry(store, FLEET, "a", now, window_s=600, buckets=4)
    assert [b["n"] for b in four["latency_us"]] == [5, 5, 5, 5]
    assert device_telemetry(store, FLEET, "c", now, window_s=600, buckets=4)["predictions"] == 0


def test_models_audit_and_change_fingerprints(store: Store, tmp_path: Path) -> None:  # noqa: F811
    now = time.time()
    _fleet(store, now)
    registry = ModelRegistry(store, ArtifactStore(tmp_path / "artifacts"))
    watcher = _Watcher(store, interval_s=0.0)
    before = watcher.fingerprint()
    for version, parent in (("1.0.0", None), ("1.1.0", "mlp@1.0.0")):
        path = modelgen.build_onnx_mlp(tmp_path / f"mlp-{version}.onnx", version=version)
        registry.register(path, name="mlp", version=version, parent=parent, metrics={"accuracy": 0.9})
    view = model_view(store, registry)
    assert view["edges"] == [["mlp@1.0.0", "mlp@1.1.0"]]
    assert {m["ref"]: (m["devices"], m["devices_online"]) for m in view["models"]} == {
        "mlp@1.0.0": (2, 1), "mlp@1.1.0": (1, 1)}

    with store.transaction(write=True) as tx:
        _repo.audit(tx, "ana", "start", "r1", "release", {"targets": 3})
        _repo.audit(tx, "engine", "rollback", "r1", "gate(s) failed", {"gates": {"accuracy": "fail"}})
    entries = audit_entries(store, rollout_id="r1", limit=10)  # what the audit view reads (/v1/audit)
    assert [(e["actor"], e["action"]) for e in entries] == [("engine", "rollback"), ("ana", "start")]
    assert entries[0]["evidence"] == {"gates": {"accuracy": "fail"}}
    assert [e["action"] for e in audit_entries(store, actor="ana", limit=10)] == ["start"]

    after = watcher.fingerprint()
    assert after["models"] != before["models"] and after["audit"] != before["audit"]
    assert after["devices"] == before["devices"]


def test_an_open_stream_ends_when_the_coordinator_stops(tmp_path: Path) -> None:
    config = CloudConfig(broker_url="mqtt://127.0.0.1:1", db=f"sqlite://{tmp_path}/cloud.db",
                         http_addr="127.0.0.1:0", artifact_dir=tmp_path / "artifacts", broker_wait_s=0.1)
    coordinator = Coordinator(config).start()
    lines: list[str] = []
    opened = threading.Event()

    def read() -> None:
        with httpx.stream("GET", coordinator.url + "/v1/stream", timeout=60) as r:
            for line in r.iter_lines():
                lines.append(line)
                opened.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert opened.wait(10) and "event: ready" in lines
    finally:
        coordinator.stop()
    reader.join(10)
    assert not reader.is_alive()  # the stream ended with the server; it did not hold the stop
