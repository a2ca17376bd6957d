"""Desired-state expiry: the leader re-issues documents before they expire, and agents keep taking them."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from cloud import Store
from cloud._config import InvalidSetting, load_cloud_config
from cloud._exceptions import ConfigError
from cloud.coordinator import Coordinator
from cloud.desired import DesiredStateWriter, ExpiryRefresher
from edgeml import Agent, load_config
from edgeml.protocol import ModelRef, Topics
from edgeml.protocol.signing import generate_keypair, verify_document

from .._stores import cloud_db
from ..conftest import Broker, Collector, agent_env, free_port, wait_until
from .test_coordinator import cloud_config

TTL_S = 8  # re-issued with at least ttl/3 - ttl/6 left: 1.3 s of slack for a re-issue pass on a loaded machine
TOPICS = Topics("plant", "dev-1")
PRIVATE, PUBLIC = generate_keypair()
SHA = "ab" * 32
MODEL = ModelRef(name="mlp", version="1.0.0", url="https://cloud/artifacts/" + SHA, sha256=SHA, size=1234)


def make_agent(tmp_path: Path, broker: Broker, keys: Path, model: Path, data: str) -> Agent:
    env = agent_env(
        EDGEML_DATA_DIR=tmp_path / data, EDGEML_API_ADDR=f"127.0.0.1:{free_port()}", EDGEML_BROKER_URL=broker.url,
        EDGEML_MODEL_PATH=model, EDGEML_DEVICE_ID="dev-1", EDGEML_FLEET="plant", EDGEML_FLEET_PUBKEY=keys / "fleet.pub",
        EDGEML_MQTT__RECONNECT_MAX_S=1,
    )
    return Agent(load_config(env=env))


def desired_docs(collector: Collector) -> list[dict[str, Any]]:
    """Every desired document the broker delivered, one per revision, in revision order."""
    by_revision = {d["revision"]: d for d in collector.payloads("desired")}
    return [by_revision[r] for r in sorted(by_revision)]


def test_config_key_and_environment() -> None:
    assert load_cloud_config(env={}).desired.ttl_s is None
    assert load_cloud_config(env={"EDGEML_DESIRED__TTL_S": "600"}).desired.ttl_s == 600
    assert load_cloud_config(env={"EDGEML_DESIRED__TTL_S": ""}).desired.ttl_s is None
    with pytest.raises(InvalidSetting) as exc:
        load_cloud_config(env={"EDGEML_DESIRED__TTL_S": "1"})
    assert exc.value.key == "desired.ttl_s" and "EDGEML_DESIRED__TTL_S" in str(exc.value)


def test_leader_reissues_documents_before_they_expire_and_the_agent_keeps_them(
    broker: Broker, models: dict[str, Path], tmp_path: Path
) -> None:
    config = cloud_config(tmp_path, cloud_db(tmp_path), broker, desired={"ttl_s": TTL_S})
    keys = config.signing_key.parent  # type: ignore[union-attr]
    collector = Collector(broker.port, TOPICS.desired)
    try:
        with Coordinator(config) as coordinator:
            wait_until(lambda: coordinator.desired.is_leader, 10, what="leadership")
            http = httpx.Client(base_url=coordinator.url, timeout=30)
            with models["onnx_float"].open("rb") as fh:
                r = http.post("/v1/models", data={"name": "mlp", "version": "1.0.0"}, files={"file": ("m.onnx", fh)})
            assert r.status_code == 201, r.text
            agent = make_agent(tmp_path, broker, keys, models["onnx_float"], "agent")
            with agent:
                r = http.put("/v1/devices/plant/dev-1/desired", json={"model": "mlp@1.0.0"})
                assert r.status_code == 200, r.text
                first = r.json()
                assert first["expires_at"] == first["issued_at"] + TTL_S  # the API's deploy expires too
                wanted = first["revision"] + 3  # three re-issues: well past the first document's expiry
                wait_until(lambda: (agent.status()["applied_revision"] or 0) >= wanted, 80,
                           what=f"the agent to apply re-issued revision {wanted}")
                status = agent.status()
                assert status["last_rejection"] is None, status["last_rejection"]
                assert status["update"]["result"] == "success" and status["update"]["reason"] == "already_active"
            http.close()
            coordinator.expiry.stop()  # from here on nobody re-issues
            final = coordinator.desired.writer.get("plant", "dev-1")
        wait_until(lambda: desired_docs(collector)[-1]["revision"] == final["revision"], what="the last document")
        docs = desired_docs(collector)
        assert [d["revision"] for d in docs] == list(range(first["revision"], final["revision"] + 1))
        assert final["revision"] >= wanted and docs[-1] == final
        for before, after in zip(docs, docs[1:], strict=False):
            verify_document(after, keys / "fleet.pub")
            assert after["model"] == first["model"] and after["shadow"] is None
            assert after["expires_at"] == after["issued_at"] + TTL_S
            assert after["issued_at"] < before["expires_at"] < after["expires_at"]  # replaced before it expired

        # Control: with no leader re-issuing, the retained document expires and an agent
        # that has not seen it yet refuses it.
        wait_until(lambda: time.time() > final["expires_at"], TTL_S + 5, what="the last document to expire")
        late = make_agent(tmp_path, broker, keys, models["onnx_float"], "late-agent")
        with late:
            rejection = wait_until(lambda: late.status()["last_rejection"], 20, what="the expired document refused")
            assert rejection["reason"] == "expired", rejection
            assert f"desired revision {final['revision']} expired" in rejection["message"]
            assert not late.status()["applied_revision"]
    finally:
        collector.close()


class Racing:
    """A publish edge on which, when ``device``'s document goes out, someone deploys ``other``."""

    def __init__(self) -> None:
        self.last: dict[str, bytes] = {}
        self.writer: DesiredStateWriter | None = None
        self.armed = False
        self._lock = threading.RLock()

    def __call__(self, topic: str, payload: bytes) -> None:
        with self._lock:
            self.last[topic] = payload
            if self.armed and topic == Topics("plant", "dev-1").desired and self.writer is not None:
                self.armed = False
                self.writer.set("plant", "dev-2", {"name": "mlp", "version": "2.0.0"})


def test_reissue_never_overwrites_a_document_written_meanwhile(store: Store) -> None:
    pub = Racing()
    writer = DesiredStateWriter(store, pub, PRIVATE, is_leader=lambda: True, ttl_s=600)
    pub.writer = writer
    for device in ("dev-1", "dev-2"):
        writer.set("plant", device, MODEL)
    pub.armed = True  # dev-2 is deployed while the refresh re-issues dev-1, before it reaches dev-2
    renewed = writer.refresh_expiring(within_s=3600)
    assert [(d["device"], d["revision"]) for d in renewed] == [("dev-1", 2)]
    current = writer.get("plant", "dev-2")
    assert current is not None and current["revision"] == 2 and current["model"]["version"] == "2.0.0"
    assert json.loads(pub.last[Topics("plant", "dev-2").desired]) == current


def test_documents_without_expiry_get_one_and_the_refresher_checks_its_settings(store: Store) -> None:
    pub = Racing()
    plain = DesiredStateWriter(store, pub, PRIVATE, is_leader=lambda: True)
    plain.set("plant", "dev-1", MODEL)
    with pytest.raises(ConfigError, match="ttl_s"):
        ExpiryRefresher(plain)
    writer = DesiredStateWriter(store, pub, PRIVATE, is_leader=lambda: True, ttl_s=600)
    assert writer.refresh_expiring(within_s=200) == []  # no expiry: not due...
    renewed = writer.refresh_expiring(within_s=200, unexpiring=True)  # ...unless every document must expire
    assert [(d["revision"], d["expires_at"] - d["issued_at"]) for d in renewed] == [(2, 600)]
    refresher = ExpiryRefresher(writer)
    assert (refresher.margin_s, refresher.interval_s) == (200, 60)
    with pytest.raises(ConfigError, match="interval_s"):
        ExpiryRefresher(writer, margin_s=10, interval_s=20)
