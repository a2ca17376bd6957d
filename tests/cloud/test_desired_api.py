"""Desired states through the coordinator: REST and CLI -> registry -> signed, retained, verifiable."""

from __future__ import annotations

import hashlib
import json
import queue
import subprocess
from pathlib import Path
from typing import Any

import httpx
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from cloud import Coordinator
from edgeml.protocol.signing import load_public_keys, verify_document

from ..conftest import Broker, wait_until
from .test_coordinator import cli, cloud_config

TOPIC = "edgeml/v1/plant/dev-1/desired"


def retained(port: int, topic: str = TOPIC, timeout: float = 10.0) -> dict[str, Any] | None:
    """What a device subscribing now receives first on ``topic`` if it is the retained copy, else None."""
    got: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, "desired-reader", clean_session=True)
    client.on_connect = lambda c, *a: c.subscribe(topic, qos=1)
    client.on_message = lambda c, u, msg: got.put(msg)
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        msg = got.get(timeout=timeout)
    except queue.Empty:
        return None
    finally:
        client.disconnect()
        client.loop_stop()
    return json.loads(msg.payload) if msg.retain and msg.payload else None


def started(coordinator: Coordinator) -> httpx.Client:
    assert wait_until(lambda: coordinator.desired.is_leader, timeout=10, what="leadership")
    return httpx.Client(base_url=coordinator.url, timeout=30)


def register(http: httpx.Client, path: Path, version: str) -> dict[str, Any]:
    with path.open("rb") as fh:
        r = http.post("/v1/models", data={"name": "mlp", "version": version}, files={"file": (path.name, fh)})
    assert r.status_code == 201, r.text
    return r.json()


def test_deploy_signs_publishes_retained_and_survives_restart(
    broker: Broker, store_url: str, models: dict[str, Path], tmp_path: Path,
) -> None:
    with Coordinator(cloud_config(tmp_path, store_url, broker)) as coordinator, started(coordinator) as http:
        public_keys = load_public_keys(tmp_path / "keys" / "fleet.pub")
        model = register(http, models["onnx_float"], "1.0.0")
        assert http.get("/v1/devices/plant/dev-1/desired").status_code == 404

        r = http.put("/v1/devices/plant/dev-1/desired", json={"model": "mlp@1.0.0"})
        assert r.status_code == 200, r.text
        first = r.json()
        url = f"{coordinator.url}/v1/artifacts/{model['sha256']}"
        assert first["revision"] == 1 and first["shadow"] is None
        assert first["model"] == {"name": "mlp", "version": "1.0.0", "url": url, "sha256": model["sha256"],
                                  "size": model["size"]}
        received = retained(broker.port)
        verify_document(received, public_keys)
        assert received == first

        assert http.put("/v1/models/mlp/aliases/champion", json={"version": "1.0.0"}).status_code == 200
        register(http, models["onnx_int8"], "2.0.0")
        r = http.put("/v1/devices/plant/dev-1/desired", json={"model": "mlp@champion", "shadow": "mlp@2.0.0",
                                                              "expires_in": 3600})
        second = r.json()
        assert (second["revision"], second["model"]["version"], second["shadow"]["version"]) == (2, "1.0.0", "2.0.0")
        assert second["expires_at"] == second["issued_at"] + 3600
        assert http.get("/v1/devices/plant/dev-1/desired").json() == second
        assert retained(broker.port) == second

        download = httpx.get(second["model"]["url"], timeout=30)
        assert download.status_code == 200
        assert hashlib.sha256(download.content).hexdigest() == second["model"]["sha256"]
        assert len(download.content) == second["model"]["size"]

        ids = [op["operationId"] for ops in http.get("/openapi.json").json()["paths"].values() for op in ops.values()]
        assert len(ids) == len(set(ids)), "duplicate OpenAPI operation ids"

    # the broker loses its retained copy while no coordinator runs: the next leader republishes it
    subprocess.run(["mosquitto_pub", "-h", "127.0.0.1", "-p", str(broker.port), "-t", TOPIC, "-r", "-n", "-q", "1"],
                   check=True, timeout=10)
    assert retained(broker.port, timeout=0.5) is None
    with Coordinator(cloud_config(tmp_path, store_url, broker)) as coordinator, started(coordinator) as http:
        assert http.get("/v1/devices/plant/dev-1/desired").json() == second
        assert wait_until(lambda: retained(broker.port, timeout=0.5), timeout=10, what="republished") == second
        third = http.put("/v1/devices/plant/dev-1/desired", json={"model": None}).json()
        assert third["revision"] == 3 and third["model"] is None
        received = retained(broker.port)
        verify_document(received, public_keys)
        assert received == third


def test_bad_requests(broker: Broker, store_url: str, models: dict[str, Path], tmp_path: Path) -> None:
    cfg = cloud_config(tmp_path, store_url, broker, ingest={"policy": "preregistered"})
    with Coordinator(cfg) as coordinator, started(coordinator) as http:
        register(http, models["onnx_float"], "1.0.0")
        r = http.put("/v1/devices/plant/dev-9/desired", json={"model": "mlp@1.0.0"})
        assert r.status_code == 404 and "dev-9" in r.json()["detail"] and "preregistered" in r.json()["detail"]
        assert http.put("/v1/devices/plant/dev-9", json={}).status_code == 201
        assert http.put("/v1/devices/plant/dev-9/desired", json={"model": "mlp@1.0.0"}).status_code == 200
        assert http.put("/v1/devices/plant/dev-9/desired", json={"model": "mlp@9.9.9"}).status_code == 404
        assert http.put("/v1/devices/plant/dev-9/desired", json={"model": "no-at-sign"}).status_code == 400
        assert http.put("/v1/devices/plant/dev-9/desired", json={}).status_code == 400  # model must be explicit
        assert http.put("/v1/devices/plant/dev-9/desired", json={"model": None, "expires_in": 0}).status_code == 400


def test_without_signing_key_the_endpoints_answer_503(broker: Broker, store_url: str, tmp_path: Path) -> None:
    cfg = cloud_config(tmp_path, store_url, broker, signing_key=None)
    with Coordinator(cfg) as coordinator, httpx.Client(base_url=coordinator.url, timeout=30) as http:
        for r in (http.get("/v1/devices/plant/dev-1/desired"),
                  http.put("/v1/devices/plant/dev-1/desired", json={"model": None})):
            assert r.status_code == 503
            assert r.json()["error"] == "SigningKeyMissing" and "must be signed" in r.json()["detail"]
            assert "retry-after" not in r.headers  # a restart with a key fixes it, not a retry


def test_a_replica_that_does_not_lead_answers_409(broker: Broker, store_url: str, tmp_path: Path) -> None:
    if not store_url.startswith("postgresql"):
        pytest.skip("on SQLite every coordinator leads")
    with Coordinator(cloud_config(tmp_path, store_url, broker)) as leader, started(leader):
        follower_cfg = cloud_config(tmp_path, store_url, broker, ingest={"client_id": "edgeml-coordinator-2"})
        with Coordinator(follower_cfg) as follower:
            r = httpx.put(f"{follower.url}/v1/devices/plant/dev-1/desired", json={"model": None}, timeout=30)
            assert r.status_code == 409 and r.json()["error"] == "NotLeader" and "leader" in r.json()["detail"]


def test_cli_deploy_then_desired(broker: Broker, store_url: str, models: dict[str, Path], tmp_path: Path) -> None:
    with Coordinator(cloud_config(tmp_path, store_url, broker)) as coordinator, started(coordinator) as http:
        model = register(http, models["onnx_float"], "1.0.0")
        out = cli(coordinator.url, "fleet", "deploy", "dev-1", "mlp@1.0.0", "--fleet", "plant")
        assert out.returncode == 0, out.stderr
        assert "plant/dev-1 revision 1: model mlp@1.0.0" in out.stdout
        out = cli(coordinator.url, "fleet", "desired", "dev-1", "--fleet", "plant", "--json")
        assert out.returncode == 0, out.stderr
        doc = json.loads(out.stdout)
        assert doc["revision"] == 1 and doc["model"]["sha256"] == model["sha256"]
        assert doc == retained(broker.port)
        out = cli(coordinator.url, "fleet", "deploy", "dev-1", "mlp@nope", "--fleet", "plant")
        assert out.returncode == 1 and "no model mlp@nope" in out.stderr
        # `--shadow` alone: the named model shadows the one the device is assigned now
        register(http, models["onnx_v2"], "2.0.0")
        out = cli(coordinator.url, "fleet", "deploy", "dev-1", "mlp@2.0.0", "--shadow", "--fleet", "plant", "--json")
        assert out.returncode == 0, out.stderr
        doc = json.loads(out.stdout)
        assert (doc["revision"], doc["model"]["version"], doc["shadow"]["version"]) == (2, "1.0.0", "2.0.0")
        out = cli(coordinator.url, "fleet", "deploy", "dev-9", "mlp@2.0.0", "--shadow", "--fleet", "plant")
        assert out.returncode != 0 and "plant/dev-9 has no model assigned to shadow" in out.stderr
        # what `--shadow` alone sends: over the revision it read, never over a newer one
        stale = http.put("/v1/devices/plant/dev-1/desired", json={"model": "mlp@1.0.0", "if_revision": 1})
        assert (stale.status_code, stale.json()["error"]) == (409, "Conflict") and "revision 1" in stale.json()["detail"]
        fresh = http.put("/v1/devices/plant/dev-1/desired", json={"model": "mlp@1.0.0", "if_revision": 2})
        assert fresh.status_code == 200 and fresh.json()["revision"] == 3
        assert http.put("/v1/devices/plant/dev-7/desired", json={"model": "mlp@1.0.0", "if_revision": 0}).json()[
            "revision"] == 1  # 0: the device has no document yet


def test_deploy_many_issues_a_batch_and_says_which_devices_could_not_take_it(
    broker: Broker, store_url: str, models: dict[str, Path], tmp_path: Path,
) -> None:
    """What a rollout step calls: one batch; an unknown model or an unregistered device (with
    the preregistered policy) is that device's error, the others get their documents."""
    from cloud._exceptions import InvalidInput, NotFound

    cfg = cloud_config(tmp_path, store_url, broker, ingest={"policy": "preregistered"})
    with Coordinator(cfg) as coordinator, started(coordinator) as http:
        register(http, models["onnx_float"], "1.0.0")
        for device in ("dev-1", "dev-2", "dev-3"):
            assert http.put(f"/v1/devices/plant/{device}", json={}).status_code == 201
        out = coordinator.desired.deploy_many("plant", [
            ("dev-1", "mlp@1.0.0", None), ("dev-2", "mlp@9.9.9", None), ("dev-3", None, "mlp@1.0.0"),
            ("dev-9", "mlp@1.0.0", None), ("bad id!", "mlp@1.0.0", None),
        ])
        assert out["dev-1"]["revision"] == 1 and out["dev-1"]["model"]["version"] == "1.0.0"  # type: ignore[index]
        assert out["dev-3"]["model"] is None and out["dev-3"]["shadow"]["version"] == "1.0.0"  # type: ignore[index]
        assert isinstance(out["dev-2"], NotFound) and "9.9.9" in str(out["dev-2"])
        assert isinstance(out["dev-9"], NotFound) and "preregistered" in str(out["dev-9"])
        assert isinstance(out["bad id!"], InvalidInput)
        assert http.get("/v1/devices/plant/dev-2/desired").status_code == 404  # nothing issued for it
        with pytest.raises(InvalidInput, match="dev-1"):  # a device twice: the whole batch is refused
            coordinator.desired.deploy_many("plant", [("dev-1", "mlp@1.0.0", None), ("dev-1", None, None)])
        assert http.get("/v1/devices/plant/dev-1/desired").json()["revision"] == 1
        got = retained(broker.port, "edgeml/v1/plant/dev-1/desired")
        assert got is not None and got["revision"] == 1


def test_a_batch_the_broker_missed_is_sent_when_it_returns(
    broker: Broker, models: dict[str, Path], tmp_path: Path, store_url: str,
) -> None:
    """Stored but not published (the broker was down): the republish worker sends the
    documents once the broker is back, without a leadership change."""
    with Coordinator(cloud_config(tmp_path, store_url, broker)) as coordinator, \
            started(coordinator) as http:
        register(http, models["onnx_float"], "1.0.0")
        broker.stop()
        out = coordinator.desired.deploy_many("plant", [("dev-1", "mlp@1.0.0", None), ("dev-2", "mlp@1.0.0", None)])
        assert {d: doc["revision"] for d, doc in out.items()} == {"dev-1": 1, "dev-2": 1}  # type: ignore[index]
        broker.start()
        for device in ("dev-1", "dev-2"):
            got = wait_until(lambda device=device: retained(broker.port, f"edgeml/v1/plant/{device}/desired", 2),
                             60, what=f"{device}'s document on the broker")
            assert got["revision"] == 1 and got["model"]["version"] == "1.0.0"
