"""Fuzzing the coordinator's MQTT consumer: topics, telemetry, status and state payloads.

Property: the parser answers with a result or a :class:`PoisonMessage` (counted, never
retried), and the ingestor's own flush of what the parser accepted commits on a real
store (SQLite and PostgreSQL): no other exception, no flush that fails forever.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from paho.mqtt.enums import CallbackAPIVersion

from cloud import Store, _parse, open_store
from cloud._exceptions import PoisonMessage
from cloud.ingest import IngestConfig, Ingestor, _Message

from ..cloud.conftest import make_store, store, store_url  # noqa: F401  (fixtures)
from ..conftest import Broker, wait_until
from ._fuzz import FUZZ, SLOW, dumps, json_values, scalars

LIMIT = 1 << 16
topics = st.one_of(
    st.text(max_size=60),
    st.builds(lambda f, d, leaf: f"edgeml/v1/{f}/{d}/{leaf}",
              st.sampled_from(["plant", "p", ""]) | st.text(max_size=8),
              st.sampled_from(["dev-1", "dev-1\n", "+", "#", "a/b"]) | st.text(max_size=8),
              st.sampled_from(["telemetry", "status", "state", "desired", ""])),
)


def record(overrides: dict[str, Any]) -> dict[str, Any]:
    return {"seq": 1, "ts": 1.0, "kind": "prediction", "model": "m", "version": "1", "latency_us": 5.0,
            **overrides}


record_fields = st.dictionaries(st.sampled_from(["seq", "ts", "kind", "model", "latency_us", "summary", "x"]),
                                json_values, max_size=3)


@st.composite
def telemetry_payloads(draw: st.DrawFn) -> bytes:
    """Near-valid batches with fuzzed fields, or anything at all."""
    if draw(st.booleans()):
        return draw(st.binary(max_size=64)) if draw(st.booleans()) else dumps(draw(json_values))
    batch: dict[str, Any] = {"v": 1, "fleet": "plant", "device": "dev-1", "stream": "s1", "sent_at": 1.0,
                             "records": [record(draw(record_fields)) for _ in range(draw(st.integers(1, 3)))]}
    for key in draw(st.lists(st.sampled_from(sorted(batch)), max_size=2)):
        batch[key] = draw(json_values)
    return dumps(batch)


@st.composite
def status_payloads(draw: st.DrawFn) -> bytes:
    doc: dict[str, Any] = {"v": 1, "device": "dev-1", "state": "online", "ts": 1.0, "reason": "connected",
                           "agent_version": "0.1", "stream": "s1"}
    for key in draw(st.lists(st.sampled_from([*doc, "extra"]), max_size=2)):
        doc[key] = draw(json_values)
    return dumps(doc)


@given(topic=topics)
@example(topic="edgeml/v1/plant/dev-1\n/telemetry")  # "$" of the id pattern matched before the "\n"
@FUZZ
def test_topics_split_or_poison(topic: str) -> None:
    try:
        fleet, device, leaf = _parse.split_topic(topic)
    except PoisonMessage as exc:
        assert exc.reason == _parse.BAD_TOPIC
        return
    for part in (fleet, device):  # ids that cannot escape their topic level or fake a line
        assert part and not set(part) & set("/+#\n\r\x00")


@given(payload=telemetry_payloads(), full=st.booleans())
@example(payload=dumps({"v": 1, "fleet": "plant", "device": "dev-1", "stream": "s", "sent_at": 1,
                        "records": [record({"seq": 2**64 - 1})]}), full=False)
@FUZZ
def test_telemetry_parses_or_is_poison(payload: bytes, full: bool) -> None:
    try:
        batch = _parse.telemetry("plant", "dev-1", payload, limit=LIMIT, full=full)
    except PoisonMessage as exc:
        assert exc.reason in (_parse.INVALID_JSON, _parse.WRONG_SCHEMA, _parse.TOPIC_MISMATCH)
        return
    assert batch.records and all(1 <= r["seq"] < 2**63 for r in batch.records)


@given(payload=status_payloads() | st.binary(max_size=40))
@FUZZ
def test_status_and_state_parse_or_are_poison(payload: bytes) -> None:
    for parse in (lambda: _parse.status("dev-1", payload, limit=LIMIT), lambda: _parse.state("plant", "dev-1", payload, limit=LIMIT)):
        try:
            assert isinstance(parse(), dict)
        except PoisonMessage as exc:
            assert exc.reason in (_parse.INVALID_JSON, _parse.WRONG_SCHEMA, _parse.TOPIC_MISMATCH)


# --------------------------------------------------------------------------- the consumer


def flush(ingestor: Ingestor, topic: str, payload: bytes) -> _Message:
    """What the ingestor's writer thread does with one message: parse, then commit."""
    msg = _Message(0, 1, 1, topic, len(payload), payload)
    ingestor._parse(msg)
    # a store error that is not transient, or one that would be retried forever, fails here
    ingestor._closing.set()
    try:
        assert ingestor._commit([msg]), f"the flush of {payload[:200]!r} on {topic} failed"
    finally:
        ingestor._closing.clear()
    return msg


POISON_STATE = dumps({"note": "a\x00b", "nested": [{"k\x00": 1}]})
DEEP_STATE = b'{"a":' + b"[" * 300 + b"]" * 300 + b"}"  # orjson reads 1024 levels, writes 254
HUGE_SEQ = dumps({"v": 1, "fleet": "plant", "device": "dev-1", "stream": "s", "sent_at": 1,
                  "records": [record({"seq": 2**64 - 1})]})


@pytest.fixture
def fast_store(store_url: str) -> Iterator[Store]:  # noqa: F811
    """The store of ``store_url``; SQLite without fsync (each example commits once)."""
    s = open_store(store_url + ("?synchronous=off" if store_url.startswith("sqlite") else ""))
    yield s
    s.close()


@pytest.fixture
def ingestor(fast_store: Store) -> Ingestor:
    return Ingestor(fast_store, IngestConfig(max_payload_bytes=LIMIT))


@given(leaf=st.sampled_from(["telemetry", "status", "state"]), data=st.data())
@example(leaf="telemetry", data=None)  # seq >= 2**63: SQLite OverflowError killed the writer thread
@SLOW
def test_the_ingestor_commits_every_message_or_counts_it_as_poison(
    ingestor: Ingestor, fast_store: Store, leaf: str, data: Any,
) -> None:
    if data is None:
        payload = HUGE_SEQ
    else:
        payload = data.draw({"telemetry": telemetry_payloads(), "status": status_payloads(),
                             "state": st.builds(dumps, st.dictionaries(st.text(max_size=6), json_values,
                                                                        max_size=4))}[leaf])
    msg = flush(ingestor, f"edgeml/v1/plant/dev-1/{leaf}", payload)
    if msg.poison is None and leaf == "telemetry":
        stored = fast_store.query_telemetry("plant", "dev-1", stream=msg.batch.stream, limit=100_000)  # type: ignore[union-attr]
        assert {r["seq"] for r in msg.batch.records} <= {r.seq for r in stored}  # type: ignore[union-attr]


@pytest.mark.parametrize("payload", [POISON_STATE, HUGE_SEQ, DEEP_STATE],
                         ids=["nul-in-state", "seq-over-int64", "state-300-deep"])
def test_regressions_of_the_consumer(ingestor: Ingestor, fast_store: Store, payload: bytes) -> None:
    leaf = "telemetry" if payload is HUGE_SEQ else "state"
    msg = flush(ingestor, f"edgeml/v1/plant/dev-1/{leaf}", payload)
    good = dumps({"v": 1, "fleet": "plant", "device": "dev-1", "stream": "ok", "sent_at": time.time(),
                  "records": [record({"seq": 1})]})
    assert flush(ingestor, "edgeml/v1/plant/dev-1/telemetry", good).poison is None
    assert [r.seq for r in fast_store.query_telemetry("plant", "dev-1", stream="ok")] == [1]
    if msg.poison is not None:
        assert msg.poison.reason == _parse.WRONG_SCHEMA


@given(value=scalars)
@FUZZ
def test_a_record_field_of_any_scalar_type(value: Any) -> None:
    payload = dumps({"v": 1, "fleet": "plant", "device": "dev-1", "stream": "s", "sent_at": 1.0,
                     "records": [record({"seq": value})]})
    try:
        batch = _parse.telemetry("plant", "dev-1", payload, limit=LIMIT, full=True)
    except PoisonMessage:
        return
    assert type(batch.records[0]["seq"]) is int


def test_a_running_ingestor_survives_what_the_fuzzer_found(broker: Broker, tmp_path: Any) -> None:
    """Through Mosquitto: the poison examples are counted and valid traffic after them lands.
    (Mosquitto itself drops a client publishing on a topic with a newline.)"""
    store_ = open_store(f"sqlite://{tmp_path}/c.db")
    client = mqtt.Client(CallbackAPIVersion.VERSION2)
    client.connect("127.0.0.1", broker.port)
    client.loop_start()
    wait_until(client.is_connected, timeout=10, what="publisher connected")
    try:
        with Ingestor(store_, broker_url=broker.url, client_id="fuzz-regression") as ing:
            for topic, payload in (("edgeml/v1/plant/dev-1/telemetry", HUGE_SEQ),
                                   ("edgeml/v1/plant/dev-1/state", POISON_STATE)):
                client.publish(topic, payload, qos=1).wait_for_publish(5)
            good = dumps({"v": 1, "fleet": "plant", "device": "dev-1", "stream": "ok", "sent_at": time.time(),
                          "records": [record({"seq": 1})]})
            client.publish("edgeml/v1/plant/dev-1/telemetry", good, qos=1).wait_for_publish(5)
            wait_until(lambda: store_.query_telemetry("plant", "dev-1", stream="ok"), what="the valid batch")
            assert ing._writer is not None and ing._writer.is_alive()
            assert wait_until(lambda: store_.error_counts().get(_parse.WRONG_SCHEMA) == 2, what="poison counted")
    finally:
        client.loop_stop()
        store_.close()
