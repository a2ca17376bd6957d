"""Desired states: revisions that only grow, signed retained documents, leader-only writes."""

from __future__ import annotations

import json
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from cloud import Store
from cloud.desired import DesiredStateWriter, MqttPublisher, NotLeader, PublishError
from cloud.leader import LeaderElection
from edgeml._exceptions import SignatureError
from edgeml.protocol import DesiredState, ModelRef
from edgeml.protocol.signing import canonical_json, generate_keypair, verify_document

from ..conftest import Broker

PRIVATE, PUBLIC = generate_keypair()
SHA = "ab" * 32
MODEL = ModelRef(name="mlp", version="1.0.0", url="https://cloud/artifacts/" + SHA, sha256=SHA, size=1234)
TOPIC = "edgeml/v1/plant/dev-1/desired"


class Retained:
    """The publish edge as a broker would keep it: the last payload per topic (thread-safe)."""

    def __init__(self) -> None:
        self.last: dict[str, bytes] = {}
        self.count = 0
        self._lock = threading.Lock()

    def __call__(self, topic: str, payload: bytes) -> None:
        with self._lock:
            self.last[topic] = payload
            self.count += 1

    def doc(self, topic: str = TOPIC) -> dict:
        return json.loads(self.last[topic])


def writer(store: Store, publish: Callable[[str, bytes], None], leader: Callable[[], bool] = lambda: True,
           **kwargs: object) -> DesiredStateWriter:
    return DesiredStateWriter(store, publish, PRIVATE, is_leader=leader, **kwargs)  # type: ignore[arg-type]


def test_document_is_signed_complete_and_valid(store: Store) -> None:
    pub = Retained()
    doc = writer(store, pub).set("plant", "dev-1", MODEL, shadow={"name": "mlp", "version": "2.0.0"})
    assert doc["revision"] == 1 and doc["fleet"] == "plant" and doc["device"] == "dev-1"
    assert doc["model"] == MODEL.model_dump(exclude_none=True) and doc["shadow"]["version"] == "2.0.0"
    assert isinstance(doc["issued_at"], int) and "expires_at" not in doc
    assert pub.doc() == doc  # what was published is what was returned and stored
    verify_document(pub.doc(), PUBLIC)
    assert DesiredState.model_validate(pub.doc()).revision == 1
    # the payload: sorted keys, no whitespace (the canonical form, signature included)
    assert pub.last[TOPIC] == json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    assert canonical_json(doc) == pub.last[TOPIC].replace(b',"signature":"' + doc["signature"].encode() + b'"', b"")


def test_revision_grows_across_writer_restarts(make_store: Callable[[], Store]) -> None:
    pub = Retained()
    first = writer(make_store(), pub)
    assert [first.set("plant", "dev-1", MODEL)["revision"] for _ in range(3)] == [1, 2, 3]
    assert first.set("plant", "dev-2", None)["revision"] == 1  # per device
    first.store.close()
    again = writer(make_store(), pub)  # a restarted coordinator: new process, same database
    assert again.get("plant", "dev-1")["revision"] == 3
    assert again.set("plant", "dev-1", None)["revision"] == 4
    assert pub.doc()["revision"] == 4 and pub.doc()["model"] is None


def test_non_leader_refuses_and_stores_nothing(store: Store) -> None:
    pub = Retained()
    w = writer(store, pub, leader=lambda: False)
    with pytest.raises(NotLeader) as exc:
        w.set("plant", "dev-1", MODEL)
    assert exc.value.transient
    with pytest.raises(NotLeader):
        w.republish_all()
    assert w.get("plant", "dev-1") is None and pub.count == 0


def test_tampered_document_fails_verification(store: Store) -> None:
    pub = Retained()
    writer(store, pub).set("plant", "dev-1", MODEL)
    doc = pub.doc()
    verify_document(doc, PUBLIC)
    for field, value in (("revision", 99), ("model", {**doc["model"], "sha256": "cd" * 32}), ("device", "dev-2")):
        with pytest.raises(SignatureError) as exc:
            verify_document({**doc, field: value}, PUBLIC)
        assert exc.value.reason == "bad_signature"
    _, other_public = generate_keypair()
    with pytest.raises(SignatureError):
        verify_document(doc, other_public)


def test_expiry_and_refresh(store: Store) -> None:
    pub = Retained()
    w = writer(store, pub, ttl_s=3600)
    doc = w.set("plant", "dev-1", MODEL)
    assert doc["expires_at"] == doc["issued_at"] + 3600
    short = w.set("plant", "dev-2", MODEL, expires_in=60)
    assert short["expires_at"] == short["issued_at"] + 60
    assert w.refresh_expiring(within_s=10) == []
    renewed = w.refresh_expiring(within_s=120)  # only dev-2 expires within 2 minutes
    assert [(d["device"], d["revision"]) for d in renewed] == [("dev-2", 2)]
    assert renewed[0]["expires_at"] >= renewed[0]["issued_at"] + 3600 and renewed[0]["model"] == doc["model"]
    with pytest.raises(ValueError):
        w.set("plant", "dev-1", MODEL, expires_in=0)


def test_racing_writers_get_unique_revisions_and_the_latest_stays_retained(make_store: Callable[[], Store]) -> None:
    """Two writers that both believe they lead (a stale leader during a failover)."""
    pub = Retained()
    writers = [writer(make_store(), pub) for _ in range(2)]
    got: list[list[int]] = [[], []]

    def run(i: int) -> None:
        for _ in range(15):
            got[i].append(writers[i].set("plant", "dev-1", MODEL)["revision"])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(got[0] + got[1]) == list(range(1, 31))
    assert all(g == sorted(g) for g in got)
    assert pub.doc()["revision"] == 30  # whoever published last published the newest


@pytest.mark.parametrize("store_url", ["postgresql"], indirect=True)
def test_leadership_moves_between_two_writers(store_url: str, make_store: Callable[[], Store]) -> None:
    pub = Retained()
    a_el = LeaderElection(store_url, retry_s=0.1).start()
    assert a_el.wait_leader(10)
    b_el = LeaderElection(store_url, retry_s=0.1).start()
    try:
        a = writer(make_store(), pub, leader=lambda: a_el.is_leader)
        b = writer(make_store(), pub, leader=lambda: b_el.is_leader)
        assert [a.set("plant", "dev-1", MODEL)["revision"] for _ in range(2)] == [1, 2]
        with pytest.raises(NotLeader):
            b.set("plant", "dev-1", None)
        a_el.stop()
        assert b_el.wait_leader(10)
        with pytest.raises(NotLeader):
            a.set("plant", "dev-1", None)
        assert b.republish_all() == 1 and pub.doc()["revision"] == 2
        assert b.set("plant", "dev-1", None)["revision"] == 3
    finally:
        a_el.stop()
        b_el.stop()


def test_retained_document_reaches_a_fresh_subscriber_and_verifies(store: Store, broker: Broker, tmp_path: Path) -> None:
    with MqttPublisher(broker.url) as publish:
        w = writer(store, publish)
        for version in ("1.0.0", "1.1.0", "2.0.0"):
            w.set("plant", "dev-1", MODEL.model_copy(update={"version": version}))
    out = subprocess.run(
        ["mosquitto_sub", "-h", "127.0.0.1", "-p", str(broker.port), "-q", "1", "-t", TOPIC, "-C", "1", "-W", "10"],
        capture_output=True, timeout=20, check=True,
    ).stdout
    doc = json.loads(out)
    verify_document(doc, PUBLIC)
    assert doc["revision"] == 3 and doc["model"]["version"] == "2.0.0"
    assert out.rstrip(b"\n") == w.stored("plant", "dev-1").payload  # byte for byte what the store holds


def test_publish_failure_then_republish_fixes_the_broker(store: Store, broker: Broker) -> None:
    publish = MqttPublisher(broker.url, timeout_s=1.0).connect()
    w = writer(store, publish)
    try:
        w.set("plant", "dev-1", MODEL)
        broker.stop()
        with pytest.raises(PublishError):
            w.set("plant", "dev-1", None)
        assert w.get("plant", "dev-1")["revision"] == 2  # stored, not on the broker
        broker.start()
        assert w.republish_all() == 1
    finally:
        publish.close()
    out = subprocess.run(
        ["mosquitto_sub", "-h", "127.0.0.1", "-p", str(broker.port), "-t", TOPIC, "-C", "1", "-W", "10"],
        capture_output=True, timeout=20, check=True,
    ).stdout
    assert json.loads(out)["revision"] == 2


def test_a_batch_is_one_commit_and_every_document_reaches_the_broker(store: Store, broker: Broker) -> None:
    """set_many: each device's next revision, signed, stored in one transaction and published
    retained (all sent before the acknowledgements are awaited); the same as one at a time."""
    devices = [f"dev-{i:03d}" for i in range(60)]
    with MqttPublisher(broker.url) as publish:
        w = writer(store, publish)
        w.set("plant", "dev-007", MODEL)  # one device is already at revision 1
        docs = w.set_many("plant", [(d, MODEL.model_copy(update={"version": "2.0.0"}), None) for d in reversed(devices)])
        assert [d["device"] for d in docs] == list(reversed(devices))  # in the order asked
        assert {d["device"]: d["revision"] for d in docs} == {d: 2 if d == "dev-007" else 1 for d in devices}
        for doc in docs:
            verify_document(doc, PUBLIC)
            assert w.stored("plant", doc["device"]).payload == json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
        with pytest.raises(ValueError, match="twice"):
            w.set_many("plant", [("dev-001", MODEL, None), ("dev-001", None, None)])
        assert w.get("plant", "dev-001")["revision"] == 1  # a refused batch stores nothing
    out = subprocess.run(
        ["mosquitto_sub", "-h", "127.0.0.1", "-p", str(broker.port), "-t", "edgeml/v1/plant/+/desired",
         "-C", str(len(devices)), "-W", "10"],
        capture_output=True, timeout=20, check=True,
    ).stdout
    retained = [json.loads(line) for line in out.splitlines()]
    assert sorted(d["device"] for d in retained) == devices
    assert all(d["model"]["version"] == "2.0.0" for d in retained)


def test_a_batch_the_broker_does_not_take_is_stored_and_said(store: Store, broker: Broker) -> None:
    publish = MqttPublisher(broker.url, timeout_s=1.0).connect()
    w = writer(store, publish)
    try:
        w.set("plant", "dev-1", MODEL)
        broker.stop()
        with pytest.raises(PublishError) as info:
            w.set_many("plant", [("dev-1", None, None), ("dev-2", MODEL, None)])
        assert [d["revision"] for d in info.value.documents] == [2, 1]
        assert w.get("plant", "dev-2")["revision"] == 1  # stored: the leader republishes it
        with pytest.raises(NotLeader):
            writer(store, publish, leader=lambda: False).set_many("plant", [("dev-3", MODEL, None)])
        assert w.get("plant", "dev-3") is None
    finally:
        publish.close()
