"""End to end: a real agent -> a private Mosquitto -> Ingestor -> store."""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

import numpy as np
import orjson
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from cloud import Ingestor, Store
from cloud.store._sqlite import SQLiteStore
from edgeml import Agent, load_config

from ..conftest import Broker, agent_env, free_port, wait_until

X = np.random.default_rng(1).standard_normal((1, 4)).astype(np.float32)


def make_agent(tmp_path: Path, broker: Broker, model: Path, device: str = "dev-1") -> Agent:
    env = agent_env(
        EDGEML_DATA_DIR=tmp_path / f"data-{device}", EDGEML_API_ADDR=f"127.0.0.1:{free_port()}",
        EDGEML_BROKER_URL=broker.url, EDGEML_MODEL_PATH=model, EDGEML_DEVICE_ID=device, EDGEML_FLEET="plant",
    )
    return Agent(load_config(env=env))


def ingestor(store: Store, broker: Broker, **settings: object) -> Ingestor:
    settings.setdefault("client_id", "coordinator-test")
    return Ingestor(store, broker_url=broker.url, **settings)


def drained(agent: Agent) -> bool:
    buf = agent.status()["buffer"]
    return buf["records"] == 0 and buf["pending"] == 0


def stored(store: Store, device: str = "dev-1") -> list[tuple[int, str]]:
    return [(r.seq, r.kind) for r in store.query_telemetry("plant", device, limit=10**6)]


def all_committed(store: Store, agent: Agent, device: str = "dev-1") -> bool:
    last = agent.status()["buffer"]["next_seq"] - 1
    counters = store.device_counters("plant", device)
    return bool(counters) and next(iter(counters.values())).records >= last


def test_every_prediction_is_stored_once(broker: Broker, store: Store, models: dict[str, Path], tmp_path: Path) -> None:
    with ingestor(store, broker) as ing:
        agent = make_agent(tmp_path, broker, models["onnx_float"])
        with agent:
            for _ in range(300):
                agent.predict({"input": X})
            wait_until(lambda: drained(agent), what="agent buffer to drain")
            wait_until(lambda: all_committed(store, agent), what="records committed")
        wait_until(lambda: not store.get_device("plant", "dev-1").online, what="offline status")
    rows = stored(store)
    assert [k for _, k in rows].count("prediction") == 300
    seqs = sorted(s for s, _ in rows)
    assert seqs == list(range(1, len(seqs) + 1))
    c = next(iter(store.device_counters("plant", "dev-1").values()))
    assert (c.records, c.max_contiguous_seq, c.gaps) == (len(seqs), len(seqs), 0)
    device = store.get_device("plant", "dev-1")
    assert device.status is not None and device.status["reason"] == "shutdown" and device.last_seen
    assert ing.stats.poison == {}


@pytest.mark.parametrize("drain", [True, False], ids=["stop", "crash-before-ack"])
def test_restart_mid_stream_loses_nothing_and_stores_nothing_twice(
    broker: Broker, store: Store, models: dict[str, Path], tmp_path: Path, drain: bool
) -> None:
    agent = make_agent(tmp_path, broker, models["onnx_float"])
    stop = threading.Event()
    received = 0

    def predict() -> None:
        while not stop.is_set():
            agent.predict({"input": X})
            time.sleep(0.0005)

    ing = ingestor(store, broker, flush_interval_s=0.2).start()
    with agent:
        worker = threading.Thread(target=predict)
        worker.start()
        try:
            for _ in range(2):
                wait_until(lambda: len(stored(store)) > 200, what="records to flow")
                ing.stop(drain=drain)
                received += ing.stats.records
                ing = ingestor(store, broker, flush_interval_s=0.2).start()
                time.sleep(0.2)
        finally:
            stop.set()
            worker.join()
        wait_until(lambda: drained(agent), what="agent buffer to drain")
        wait_until(lambda: all_committed(store, agent), what="every record committed")
    ing.stop()
    received += ing.stats.records
    seqs = [s for s, _ in stored(store)]
    assert sorted(seqs) == list(range(1, len(seqs) + 1))  # nothing lost, one row per seq
    c = next(iter(store.device_counters("plant", "dev-1").values()))
    assert (c.records, c.max_contiguous_seq, c.gaps) == (len(seqs), len(seqs), 0)
    assert c.records + c.duplicates == received  # every record received was stored or counted a duplicate


def publisher(broker: Broker) -> mqtt.Client:
    client = mqtt.Client(CallbackAPIVersion.VERSION2)
    client.connect("127.0.0.1", broker.port)
    client.loop_start()
    return client


def batch(device: str, seqs: range, fleet: str = "plant") -> bytes:
    recs = [{"seq": s, "ts": time.time(), "kind": "event", "name": "x"} for s in seqs]
    return orjson.dumps({"v": 1, "fleet": fleet, "device": device, "stream": "s", "sent_at": time.time(), "records": recs})


def test_poison_is_counted_and_valid_traffic_still_stored(
    broker: Broker, store: Store, models: dict[str, Path], tmp_path: Path
) -> None:
    store.upsert_device("plant", "dev-1", pre_registered=True)
    with ingestor(store, broker, policy="preregistered") as ing:
        agent = make_agent(tmp_path, broker, models["onnx_float"])
        with agent:
            pub = publisher(broker)
            topic = "edgeml/v1/plant/dev-1/telemetry"
            poison = [
                (topic, b"\xff not json {"),
                (topic, orjson.dumps({"v": 1, "fleet": "plant", "device": "dev-1", "stream": "s", "sent_at": 1,
                                      "records": [{"seq": 0, "ts": 1, "kind": "event"}]})),
                (topic, b'{"v": 1, "pad": "' + b"x" * (2 << 20) + b'"}'),
                ("edgeml/v1/plant/stranger/telemetry", batch("stranger", range(1, 4))),
            ]
            for i in range(200):
                agent.predict({"input": X})
                if i % 50 == 0:
                    t, p = poison[i // 50]
                    pub.publish(t, p, qos=1).wait_for_publish(10)
            pub.disconnect()
            pub.loop_stop()
            wait_until(lambda: drained(agent), what="agent buffer to drain")
            wait_until(lambda: all_committed(store, agent), what="records committed")
            wait_until(lambda: sum(store.error_counts().values()) == 4, what="poison counted")
    assert store.error_counts() == {"invalid_json": 1, "wrong_schema": 1, "oversized": 1, "unknown_device": 1}
    assert ing.stats.poison == store.error_counts()
    assert [k for _, k in stored(store)].count("prediction") == 200
    assert stored(store, "stranger") == []
    recent = {r.reason: r for r in store.recent_errors()}
    assert recent["unknown_device"].topic == "edgeml/v1/plant/stranger/telemetry"
    assert recent["oversized"].size > 2 << 20


def test_redelivered_batches_are_counted_duplicates(broker: Broker, store: Store) -> None:
    with ingestor(store, broker):
        pub = publisher(broker)
        for seqs in (range(1, 11), range(6, 16), range(1, 11)):
            pub.publish("edgeml/v1/plant/dev-2/telemetry", batch("dev-2", seqs), qos=1).wait_for_publish(10)
        wait_until(lambda: sum(c.duplicates for c in store.device_counters("plant", "dev-2").values()) == 15,
                   what="duplicates counted")
        pub.disconnect()
        pub.loop_stop()
    c = store.device_counters("plant", "dev-2")["s"]
    assert (c.records, c.duplicates, c.max_contiguous_seq) == (15, 15, 15)
    assert [s for s, _ in stored(store, "dev-2")] == list(range(1, 16))


def test_shared_subscription_splits_and_stores_once(broker: Broker, store: Store) -> None:
    replicas = [ingestor(store, broker, client_id=f"replica-{i}", shared_group="coord").start() for i in range(2)]
    pub = publisher(broker)
    for first in range(1, 2001, 50):
        pub.publish("edgeml/v1/plant/dev-3/telemetry", batch("dev-3", range(first, first + 50)), qos=1)
    wait_until(lambda: sum(c.records for c in store.device_counters("plant", "dev-3").values()) == 2000,
               what="all records")
    pub.disconnect()
    pub.loop_stop()
    for r in replicas:
        r.stop()
    assert all(r.stats.records > 0 for r in replicas)  # both replicas took a share
    assert sum(r.stats.records for r in replicas) == 2000
    assert store.device_counters("plant", "dev-3")["s"].duplicates == 0


def test_a_malformed_reported_state_is_poison_and_ingestion_goes_on(broker: Broker, store: Store) -> None:
    good = {"v": 1, "fleet": "plant", "device": "dev-4", "ts": time.time(), "applied_revision": 3,
            "update": {"state": "idle", "revision": 3, "result": "success"}, "agent_note": "kept"}
    with ingestor(store, broker) as ing:
        pub = publisher(broker)
        topic = "edgeml/v1/plant/dev-4/state"
        for bad in ({"applied_revision": "1"}, {**good, "applied_revision": "1"}, {**good, "update": 5},
                    {**good, "device": "dev-5"}):
            pub.publish(topic, orjson.dumps(bad), qos=1).wait_for_publish(10)
        pub.publish(topic, orjson.dumps(good), qos=1).wait_for_publish(10)
        pub.publish("edgeml/v1/plant/dev-4/telemetry", batch("dev-4", range(1, 6)), qos=1).wait_for_publish(10)
        wait_until(lambda: len(stored(store, "dev-4")) == 5, what="telemetry after the poison")
        wait_until(lambda: store.get_device("plant", "dev-4").reported_state, what="the valid state")
        pub.disconnect()
        pub.loop_stop()
    assert store.error_counts() == {"wrong_schema": 3, "topic_mismatch": 1} == ing.stats.poison
    assert store.get_device("plant", "dev-4").reported_state == good  # as sent, the unknown field too
    assert {r.topic for r in store.recent_errors()} == {"edgeml/v1/plant/dev-4/state"}


def test_a_cleared_retained_status_or_state_is_not_poison(broker: Broker, store: Store) -> None:
    """An empty retained payload is how MQTT deletes a retained message (an operator clearing
    a decommissioned device's topics): nothing to store, nothing wrong, the stored state kept."""
    state = {"v": 1, "fleet": "plant", "device": "dev-5", "ts": time.time(), "applied_revision": 1,
             "update": {"state": "idle", "revision": 1, "result": "success"}}
    with ingestor(store, broker) as ing:
        pub = publisher(broker)
        pub.publish("edgeml/v1/plant/dev-5/state", orjson.dumps(state), qos=1, retain=True).wait_for_publish(10)
        wait_until(lambda: any(d.reported_state for d in store.list_devices("plant") if d.device_id == "dev-5"),
                   what="the state")
        for leaf in ("state", "status"):
            pub.publish(f"edgeml/v1/plant/dev-5/{leaf}", b"", qos=1, retain=True).wait_for_publish(10)
        pub.publish("edgeml/v1/plant/dev-5/telemetry", b"", qos=1).wait_for_publish(10)  # telemetry: poison
        wait_until(lambda: store.error_counts(), what="the empty telemetry counted")
        pub.disconnect()
        pub.loop_stop()
        assert ing.stats.messages == 1  # the state; the cleared topics are not messages to store
    assert store.error_counts() == {"invalid_json": 1}
    assert {r.topic for r in store.recent_errors()} == {"edgeml/v1/plant/dev-5/telemetry"}
    assert store.get_device("plant", "dev-5").reported_state == state


@pytest.mark.parametrize("validation", ["fast", "full"])
def test_full_validation_rejects_a_known_kind_of_the_wrong_type(broker: Broker, store: Store, validation: str) -> None:
    """``ingest.validation: full`` checks known kinds with the protocol models; the default
    checks only seq, ts and kind, and stores the rest as sent."""
    wrong = {"seq": 1, "ts": time.time(), "kind": "prediction", "model": "m", "version": "1", "latency_us": "x"}
    unknown_kind = {"seq": 1, "ts": time.time(), "kind": "vendor_thing", "latency_us": "x"}
    with ingestor(store, broker, client_id=f"coordinator-{validation}", validation=validation) as ing:
        pub = publisher(broker)
        for stream, record in (("wrong", wrong), ("unknown-kind", unknown_kind)):
            doc = {"v": 1, "fleet": "plant", "device": "dev-5", "stream": stream, "sent_at": time.time(),
                   "records": [record]}
            pub.publish("edgeml/v1/plant/dev-5/telemetry", orjson.dumps(doc), qos=1).wait_for_publish(10)
        pub.publish("edgeml/v1/plant/dev-5/telemetry", batch("dev-5", range(1, 4)), qos=1).wait_for_publish(10)
        wait_until(lambda: "s" in store.device_counters("plant", "dev-5"), what="the valid batch after it")
        pub.disconnect()
        pub.loop_stop()
    streams = {r.stream for r in store.query_telemetry("plant", "dev-5", limit=100)}
    if validation == "full":
        assert store.error_counts() == {"wrong_schema": 1} == ing.stats.poison
        assert store.recent_errors()[0].detail.startswith("records[0].latency_us: ")
        assert streams == {"unknown-kind", "s"}  # kinds it does not know are stored as they are
    else:
        assert store.error_counts() == {} and ing.stats.poison == {}
        assert streams == {"wrong", "unknown-kind", "s"}
        assert store.query_telemetry("plant", "dev-5", stream="wrong")[0].body["latency_us"] == "x"


def test_telemetry_sent_during_a_store_outage_is_stored_once_when_it_ends(broker: Broker, tmp_path: Path) -> None:
    """Another connection holds the SQLite database exclusively: every flush fails with
    'database is locked' and is retried with backoff, nothing is acknowledged meanwhile;
    once the lock is released every record is stored exactly once."""
    path = tmp_path / "cloud.db"
    store = SQLiteStore(path, synchronous="normal", busy_timeout_s=0.05)
    store.migrations.apply()
    blocker = sqlite3.connect(path, isolation_level=None)
    try:
        with ingestor(store, broker, store_retry_max_s=0.2) as ing:
            blocker.execute("BEGIN EXCLUSIVE")
            pub = publisher(broker)
            for first in range(1, 1001, 50):
                pub.publish("edgeml/v1/plant/dev-6/telemetry", batch("dev-6", range(first, first + 50)), qos=1)
            wait_until(lambda: ing.stats.store_errors >= 3, what="flushes failing on the locked store")
            assert ing.stats.flushes == 0 and store.device_counters("plant", "dev-6") == {}
            blocker.execute("ROLLBACK")
            wait_until(lambda: ing.stats.records == 1000, what="every record committed after the outage")
            pub.disconnect()
            pub.loop_stop()
        c = store.device_counters("plant", "dev-6")["s"]
        assert (c.records, c.max_contiguous_seq, c.gaps, c.duplicates) == (1000, 1000, 0, 0)
        assert (ing.stats.inserted, ing.stats.duplicates) == (1000, 0)
        assert [s for s, _ in stored(store, "dev-6")] == list(range(1, 1001))
    finally:
        blocker.close()
        store.close()
