"""TUF's threats to update metadata, each driven as an attack on a real agent (its update
manager, over a real Mosquitto, against a real coordinator that signs), each rejected with
a reason the device reports, and the active model untouched.

Already proven in tests/test_updates.py::test_rejections_leave_the_active_model_untouched
and not repeated here: a tampered artifact (hash_mismatch), a truncated download, a replayed
older revision, an expired document, a document signed by an unknown key, an unsigned one
and one altered after signing. This module adds what those leave open: rollback across a
restart, fast-forward, mix-and-match, arbitrary software from a mirror, endless data, a key
claiming a trusted key's id, and key rotation with several trusted keys on the device.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import orjson
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from cloud.keys import generate_keys
from edgeml import Agent
from edgeml.protocol.signing import sign_bytes, sign_document
from edgeml.updates._manager import MAX_DOCUMENT_BYTES

from ..conftest import Broker, Collector, wait_until
from ..test_updates import TOPICS, X, finished, make_agent
from ..test_updates import Fleet as Coordinated

UNSIGNED = ("signature", "key_id")


@pytest.fixture
def cloud(broker: Broker, tmp_path: Path) -> Iterator[Coordinated]:
    """A coordinator with a fleet signing key (tests/test_updates.py's), models 1.0.0 and 2.0.0."""
    c = Coordinated(tmp_path / "cloud", broker)
    yield c
    c.close()


@pytest.fixture
def registered(cloud: Coordinated, models: dict[str, Path]) -> dict[str, dict[str, Any]]:
    return {"1.0.0": cloud.register(models["onnx_float"], "1.0.0"),
            "2.0.0": cloud.register(models["onnx_v2"], "2.0.0")}


def strip(doc: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in doc.items() if k not in UNSIGNED}


def document(revision: int, model: dict[str, Any] | None = None, **fields: Any) -> dict[str, Any]:
    """An unsigned desired state for dev-1 (sign it with ``cloud.signed`` or another key)."""
    return {"v": 1, "fleet": "plant", "device": "dev-1", "revision": revision, "issued_at": time.time(),
            "model": model, **fields}


def model_ref(cloud: Coordinated, meta: dict[str, Any], url: str | None = None) -> dict[str, Any]:
    """The reference a genuine document carries for a registered model (not published)."""
    return {"name": "mlp", "version": meta["version"], "sha256": meta["sha256"], "size": meta["size"],
            "url": url or f"{cloud.coordinator.url}/v1/artifacts/{meta['sha256']}"}


def attack(cloud: Coordinated, agent: Agent, doc: dict[str, Any], reason: str, *, update: bool = False) -> None:
    """Publish ``doc`` on the device's desired topic as an attacker with broker access would,
    and wait for the agent to reject it with ``reason``: the document itself (``update``
    False), or the update it started (True: the download or a check after it failed)."""
    before = (agent.status()["last_rejection"] or {}).get("ts")
    cloud.publish_raw(doc)

    def rejected() -> bool:
        status = agent.status()
        if update:
            u = status["update"]
            return (u["revision"] == doc.get("revision") and u["state"] == "idle"
                    and u["result"] in ("rejected", "failed") and u["reason"] == reason)
        last = status["last_rejection"] or {}
        return last.get("ts") != before and last.get("reason") == reason

    try:
        wait_until(rejected, 20, what=f"rejection {reason!r}")
    except AssertionError:
        status = agent.status()
        raise AssertionError(f"not rejected with {reason!r}: update {status['update']}, "
                             f"last rejection {status['last_rejection']}") from None


class Untouched:
    """The active model before an attack; ``check()`` after it."""

    def __init__(self, agent: Agent) -> None:
        assert agent.model is not None
        self.agent, self.sha256, self.version = agent, agent.model.info.sha256, agent.model.version

    def check(self) -> None:
        assert self.agent.model is not None and self.agent.model.info.sha256 == self.sha256
        assert self.agent.predict({"input": X}).version == self.version
        assert self.agent.status()["model"]["sha256"] == self.sha256


class Mirror:
    """An artifact server the attacker controls (a compromised mirror or CDN): each path
    answers with fixed bytes or with an endless stream; it counts what it sent."""

    def __init__(self) -> None:
        self.routes: dict[str, bytes | None] = {}  # None: endless
        self.sent: dict[str, int] = {}
        mirror = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - the http.server API
                body = mirror.routes.get(self.path, b"missing")
                self.send_response(200 if self.path in mirror.routes else 404)
                if body is not None:
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    mirror.sent[self.path] = len(body)
                    return
                self.end_headers()  # no length: the body ends when the connection does
                block, sent = b"\0" * 65536, 0
                try:
                    while sent < 1 << 30:
                        self.wfile.write(block)
                        sent += len(block)
                        mirror.sent[self.path] = sent
                except OSError:  # the device hung up: what we want
                    pass

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}{path}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def mirror() -> Iterator[Mirror]:
    m = Mirror()
    yield m
    m.close()


def test_rollback_is_refused_across_a_restart(
    broker: Broker, cloud: Coordinated, registered: dict[str, Any], models: dict[str, Path], tmp_path: Path
) -> None:
    old = cloud.deploy("mlp@1.0.0")  # revision 1: the model the device already runs
    with make_agent(tmp_path, broker, cloud, models["onnx_float"]) as agent:
        wait_until(lambda: finished(agent, old["revision"]), 20, what="revision 1")
        new = cloud.deploy("mlp@2.0.0")
        wait_until(lambda: finished(agent, new["revision"]), 30, what="revision 2")
        assert agent.model is not None and agent.model.version == "2.0.0"
    # the device restarts; the attacker replays the older, validly signed document
    with make_agent(tmp_path, broker, cloud, models["onnx_float"]) as agent:
        wait_until(lambda: agent.status()["sync"]["connected"], 10, what="connection")
        guard = Untouched(agent)
        assert guard.version == "2.0.0" and agent.status()["applied_revision"] == new["revision"]
        attack(cloud, agent, old, "replayed")
        guard.check()


def test_fast_forward_by_a_forged_revision_does_not_block_later_updates(
    broker: Broker, collector: Collector, cloud: Coordinated, registered: dict[str, Any], models: dict[str, Path],
    tmp_path: Path,
) -> None:
    rogue = tmp_path / "rogue"
    generate_keys(rogue)
    with make_agent(tmp_path, broker, cloud, models["onnx_float"]) as agent:
        guard = Untouched(agent)
        # a forged document with an enormous revision: were it remembered, every genuine one
        # after it would look like a replay (TUF's fast-forward attack)
        attack(cloud, agent, sign_document(document(2**62), rogue / "fleet.key"), "unknown_key")
        # a validly signed document for another device, with an enormous revision, replayed here
        attack(cloud, agent, cloud.signed({**document(2**62 - 1), "device": "dev-2"}), "wrong_device")
        # and one for another fleet
        attack(cloud, agent, cloud.signed({**document(2**62 - 2), "fleet": "other"}), "wrong_device")
        guard.check()
        assert agent.status()["applied_revision"] is None and agent.status()["update"]["revision"] is None
    # nothing was persisted: after a restart too, the next genuine revision (a small number) applies
    with make_agent(tmp_path, broker, cloud, models["onnx_float"]) as agent:
        doc = cloud.deploy("mlp@2.0.0")
        assert doc["revision"] < 10
        status = wait_until(lambda: finished(agent, doc["revision"]), 30, what="the genuine update")
        assert status["update"]["result"] == "success" and agent.model.version == "2.0.0"  # type: ignore[union-attr]
    wait_until(lambda: {"unknown_key", "wrong_device"} <= {r["data"]["reason"] for r in collector.records()
                                                            if r.get("name") == "update_rejected"},
               10, what="rejections reported to the coordinator's side of the broker")


def test_mix_and_match_of_signed_documents_is_refused(
    broker: Broker, cloud: Coordinated, registered: dict[str, Any], models: dict[str, Path], mirror: Mirror,
    tmp_path: Path,
) -> None:
    v2 = registered["2.0.0"]
    with make_agent(tmp_path, broker, cloud, models["onnx_float"]) as agent:
        guard = Untouched(agent)
        a = cloud.signed(document(40, expires_at=time.time() + 60))  # genuine: no model change
        b = cloud.signed(document(30, model_ref(cloud, v2)))  # genuine, older: held back
        cloud.publish_raw(a)
        wait_until(lambda: finished(agent, 40), 20, what="revision 40")
        # b's model in a's newer revision, under a's signature
        attack(cloud, agent, {**a, "revision": 41, "model": b["model"]}, "bad_signature")
        guard.check()
        # a newer revision with b's content and b's signature
        attack(cloud, agent, {**b, "revision": 42}, "bad_signature")
        guard.check()
        # a's expiry dropped from a (to outlive it)
        attack(cloud, agent, {**{k: v for k, v in a.items() if k != "expires_at"}, "revision": 43}, "bad_signature")
        guard.check()
        # the right artifact with the signature file of another artifact (mix at the artifact level)
        mirror.routes["/v2.onnx"] = models["onnx_v2"].read_bytes()
        mirror.routes["/v2.onnx.sig"] = sign_bytes(models["onnx_float"].read_bytes(), cloud.keys / "fleet.key")
        doc = cloud.signed(document(44, model_ref(cloud, v2, mirror.url("/v2.onnx"))))
        attack(cloud, agent, doc, "digest_mismatch", update=True)
        guard.check()
        assert not list((tmp_path / "agent" / "models").glob(f"{v2['sha256']}*"))  # nothing of it is kept


def test_arbitrary_software_from_a_mirror_is_refused(
    broker: Broker, cloud: Coordinated, registered: dict[str, Any], models: dict[str, Path], mirror: Mirror,
    tmp_path: Path,
) -> None:
    v2 = registered["2.0.0"]
    rogue = tmp_path / "rogue"
    generate_keys(rogue)
    # the attacker's model, made the size of the genuine one, with a signature file of its own
    evil = (b"#!/bin/sh\nrm -rf /\n" + b"\0" * v2["size"])[: v2["size"]]
    mirror.routes["/m.onnx"] = evil
    mirror.routes["/m.onnx.sig"] = sign_bytes(evil, rogue / "fleet.key")
    with make_agent(tmp_path, broker, cloud, models["onnx_float"]) as agent:
        guard = Untouched(agent)
        # a genuine document, the download redirected to the mirror (DNS, a proxy, a CDN)
        attack(cloud, agent, cloud.signed(document(50, model_ref(cloud, v2, mirror.url("/m.onnx")))),
               "hash_mismatch", update=True)
        guard.check()
        # a genuine document without a sha256: the artifact's signature alone stops it
        ref = {k: v for k, v in model_ref(cloud, v2, mirror.url("/m.onnx")).items() if k != "sha256"}
        attack(cloud, agent, cloud.signed(document(51, ref)), "unknown_key", update=True)
        guard.check()
    assert hashlib.sha256(evil).hexdigest() not in {p.stem for p in (tmp_path / "agent" / "models").iterdir()}


def test_endless_data_stops_at_the_signed_size(
    broker: Broker, collector: Collector, cloud: Coordinated, registered: dict[str, Any], models: dict[str, Path],
    mirror: Mirror, tmp_path: Path,
) -> None:
    v2 = registered["2.0.0"]
    mirror.routes["/endless.onnx"] = None
    mirror.routes["/v2.onnx"] = models["onnx_v2"].read_bytes()
    mirror.routes["/v2.onnx.sig"] = None  # an endless signature file
    with make_agent(tmp_path, broker, cloud, models["onnx_float"]) as agent:
        guard = Untouched(agent)
        attack(cloud, agent, cloud.signed(document(60, model_ref(cloud, v2, mirror.url("/endless.onnx")))),
               "too_large", update=True)
        sent = mirror.sent["/endless.onnx"]
        # the device hung up at the signed size; the server got out that plus what the sockets
        # held, far below the device's own limit (max_model_bytes, 512 MiB by default)
        assert sent < v2["size"] + 16 * 2**20, sent
        assert not list((tmp_path / "agent" / "models").glob("incoming-*"))
        guard.check()
        # the genuine artifact, followed by an endless signature file
        attack(cloud, agent, cloud.signed(document(61, model_ref(cloud, v2, mirror.url("/v2.onnx")))),
               "too_large", update=True)
        assert mirror.sent["/v2.onnx.sig"] < 16 * 2**20
        guard.check()
        # an oversized desired-state document on MQTT: refused before it is parsed
        bad = agent.status()["counters"]["bad_messages"]
        cloud.publish_raw({**cloud.signed(document(62)), "padding": "x" * MAX_DOCUMENT_BYTES})
        wait_until(lambda: agent.status()["counters"]["bad_messages"] == bad + 1, 10, what="oversized document")
        assert agent.status()["update"]["revision"] == 61
        guard.check()
    messages = [r.get("message", "") for r in collector.records() if r.get("name") == "update_failed"]
    assert any("signed size" in m for m in messages), messages
    assert any(r["data"]["bytes"] > MAX_DOCUMENT_BYTES for r in collector.records() if r.get("name") == "bad_message")


def test_a_key_claiming_a_trusted_key_id_is_refused(
    broker: Broker, cloud: Coordinated, registered: dict[str, Any], models: dict[str, Path], mirror: Mirror,
    tmp_path: Path,
) -> None:
    rogue = tmp_path / "rogue"
    generate_keys(rogue)
    v2 = registered["2.0.0"]
    trusted_id = cloud.signed(document(1))["key_id"]
    with make_agent(tmp_path, broker, cloud, models["onnx_float"]) as agent:
        guard = Untouched(agent)
        forged = sign_document(document(70, model_ref(cloud, v2)), rogue / "fleet.key")
        attack(cloud, agent, {**forged, "key_id": trusted_id}, "bad_signature")  # claims to be the fleet key
        guard.check()
        # a genuine document, the artifact's signature file forged by another key
        mirror.routes["/v2.onnx"] = models["onnx_v2"].read_bytes()
        mirror.routes["/v2.onnx.sig"] = sign_bytes(models["onnx_v2"].read_bytes(), rogue / "fleet.key")
        attack(cloud, agent, cloud.signed(document(71, model_ref(cloud, v2, mirror.url("/v2.onnx")))),
               "unknown_key", update=True)
        guard.check()


def test_key_rotation_with_two_trusted_keys(
    broker: Broker, cloud: Coordinated, registered: dict[str, Any], models: dict[str, Path], tmp_path: Path
) -> None:
    old = cloud.keys  # the coordinator's key, which also signed the artifacts
    new = tmp_path / "new-key"
    generate_keys(new)
    both = f"{old / 'fleet.pub'},{new / 'fleet.pub'}"  # the setting takes several files
    with make_agent(tmp_path, broker, cloud, models["onnx_float"], EDGEML_FLEET_PUBKEY=both) as agent:
        assert len(agent._updates._keys) == 2  # type: ignore[union-attr]
        cloud.publish_raw(sign_document(document(80, model_ref(cloud, registered["2.0.0"])), new / "fleet.key"))
        status = wait_until(lambda: finished(agent, 80), 30, what="update signed by the new key")
        assert status["update"]["result"] == "success" and agent.model.version == "2.0.0"  # type: ignore[union-attr]
    # rotation finished: the old key is removed from the device
    with make_agent(tmp_path, broker, cloud, models["onnx_float"], EDGEML_FLEET_PUBKEY=new / "fleet.pub") as agent:
        guard = Untouched(agent)
        attack(cloud, agent, sign_document(document(90, model_ref(cloud, registered["1.0.0"])), old / "fleet.key"),
               "unknown_key")
        guard.check()
        cloud.publish_raw(sign_document(document(91), new / "fleet.key"))
        wait_until(lambda: finished(agent, 91), 20, what="document signed by the new key")
        assert agent.status()["applied_revision"] == 91


def test_malformed_signature_fields_are_rejected_and_the_agent_keeps_listening(
    broker: Broker, cloud: Coordinated, registered: dict[str, Any], models: dict[str, Path], tmp_path: Path
) -> None:
    with make_agent(tmp_path, broker, cloud, models["onnx_float"]) as agent:
        guard = Untouched(agent)
        genuine = cloud.signed(document(5, model_ref(cloud, registered["2.0.0"])))
        bad = agent.status()["counters"]["bad_messages"]
        signed_by = f'"key_id": "{genuine["key_id"]}", "signature": "{genuine["signature"]}"'.encode()
        hostile = [
            orjson.dumps({**genuine, "key_id": []}),  # not a string: no TypeError on the MQTT thread
            orjson.dumps({**genuine, "key_id": {"a": 1}}),
            orjson.dumps({**genuine, "extra": [[[[]]]]}),  # well-formed, just not what was signed
            # nested deeper than the interpreter's stack when the signed bytes are computed
            b'{"revision": 6, ' + signed_by + b', "x": ' + b"[" * 1000 + b"]" * 1000 + b"}",
        ]
        # not retained (each must arrive, not only the last): wait for the agent's subscription
        wait_until(lambda: agent.status()["sync"]["connected"], 20, what="the agent's MQTT session")
        for payload in hostile:
            publish_bytes(broker, TOPICS.desired, payload)
        wait_until(lambda: agent.status()["counters"]["bad_messages"] == bad + 3, 20, what="malformed rejections")
        assert agent.status()["last_rejection"]["reason"] == "bad_signature"
        guard.check()
        # the agent still listens: the genuine document applies
        cloud.publish_raw(genuine)
        status = wait_until(lambda: finished(agent, 5), 30, what="genuine update after the hostile ones")
        assert status["update"]["result"] == "success" and agent.model.version == "2.0.0"  # type: ignore[union-attr]


def publish_bytes(broker: Broker, topic: str, payload: bytes) -> None:
    client = mqtt.Client(CallbackAPIVersion.VERSION2)
    client.connect("127.0.0.1", broker.port)
    client.loop_start()
    client.publish(topic, payload, qos=1).wait_for_publish(5)
    client.disconnect()
    client.loop_stop()
