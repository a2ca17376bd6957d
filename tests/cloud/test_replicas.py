"""Coordinator replicas on one PostgreSQL, and two agents claiming one device id.

Mosquitto 2.0 (2.0.11 here) and shared subscriptions, as these tests pin down:

- Messages of ``$share/{group}/...`` go round-robin to every *session* in the group,
  connected or not. A replica killed with a persistent session (session expiry > 0)
  keeps its place in the rotation: the messages it had not acknowledged, and its share
  of everything published after it died, wait in its session. The survivor does not
  get them.
- They are delivered when a replica reconnects with the same client id (the unacked
  ones again, with DUP), so the store ends with every record exactly once (the ones the
  dead replica had committed but not acknowledged come back as counted duplicates).
- If the session expires first, mosquitto discards them: lost. With session expiry 0
  the in-flight window of the dead replica is lost at once (then new messages go to the
  survivor only).

So replicas need stable client ids and a supervisor that restarts a dead one within the
session expiry (IngestConfig.session_expiry_s, 7 days by default).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import orjson
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from cloud import Ingestor, Store
from edgeml import Agent, load_config

from ..conftest import REPO, Broker, agent_env, free_port, wait_until

DEVICES = [f"dev-{i}" for i in range(8)]
PER_DEVICE = 2500  # 20k records
BATCH = 50


class Replica:
    """``tests/cloud/_replica.py`` in its own process; its stdout lines are collected."""

    def __init__(self, store_url: str, broker: Broker, client_id: str) -> None:
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.cloud._replica", store_url, broker.url, client_id, "coord"],
            cwd=REPO, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        wait_until(lambda: self.said("ready"), 30, what=f"{client_id} to start")

    def _read(self) -> None:
        assert self.proc.stdout is not None
        with self.proc.stdout:
            for line in self.proc.stdout:
                self.lines.append(line.strip())

    def said(self, line: str) -> bool:
        if self.proc.poll() is not None and line not in self.lines:
            raise AssertionError(f"replica exited with {self.proc.returncode}: {self.lines}")
        return line in self.lines

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self._reader.join(10)

    def terminate(self) -> tuple[int, int, int]:
        """SIGTERM; the replica drains and reports ``(records, inserted, duplicates)``."""
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(30)
        self._reader.join(10)
        stats = next(x for x in self.lines if x.startswith("stats "))
        return tuple(int(v) for v in stats.split()[1:])  # type: ignore[return-value]


def batches() -> list[tuple[str, bytes]]:
    """Every device's records in batches of 50, devices interleaved, each device in seq order."""
    out = []
    for first in range(1, PER_DEVICE + 1, BATCH):
        for device in DEVICES:
            recs = [{"seq": s, "ts": time.time(), "kind": "event", "name": "x"} for s in range(first, first + BATCH)]
            payload = {"v": 1, "fleet": "plant", "device": device, "stream": f"s-{device}", "sent_at": time.time(),
                       "records": recs}
            out.append((f"edgeml/v1/plant/{device}/telemetry", orjson.dumps(payload)))
    return out


def publish_all(client: mqtt.Client, messages: list[tuple[str, bytes]], pace_s: float = 0.0) -> None:
    infos = []
    for topic, payload in messages:
        infos.append(client.publish(topic, payload, qos=1))
        if pace_s:
            time.sleep(pace_s)
    for info in infos:
        info.wait_for_publish(30)
        assert info.is_published()


def counts(store: Store) -> tuple[int, int]:
    with store.transaction() as tx:
        rows, distinct = tx.execute(
            "SELECT count(*), count(DISTINCT (device_id, stream, seq)) FROM telemetry"
        ).fetchone()
    return int(rows), int(distinct)


@pytest.fixture
def replica(store_url: str, broker: Broker) -> Iterator[Callable[[str], Replica]]:
    started: list[Replica] = []

    def start(client_id: str) -> Replica:
        started.append(Replica(store_url, broker, client_id))
        return started[-1]

    yield start
    for r in started:
        r.kill()


@pytest.mark.parametrize("store_url", ["postgresql"], indirect=True)
def test_kill_a_replica_mid_stream_every_record_stored_exactly_once(
    replica: Callable[[str], Replica], store: Store, broker: Broker
) -> None:
    total = len(DEVICES) * PER_DEVICE
    a = replica("replica-a")
    wait_until(lambda: a.said("leader True"), 10, what="replica-a to lead")
    b = replica("replica-b")
    pub = mqtt.Client(CallbackAPIVersion.VERSION2, "agents-sim")
    pub.max_inflight_messages_set(100)
    pub.connect("127.0.0.1", broker.port)
    pub.loop_start()
    messages = batches()
    cut = len(messages) // 4
    try:
        publish_all(pub, messages[:cut])
        wait_until(lambda: counts(store)[0] >= 2000, what="both replicas ingesting")
        killed = threading.Event()

        def agents() -> None:  # keep publishing while the replica dies
            publish_all(pub, messages[cut:2 * cut], pace_s=0.002)
            killed.wait(30)
            publish_all(pub, messages[2 * cut:], pace_s=0.002)

        rest = threading.Thread(target=agents)
        rest.start()
        wait_until(lambda: counts(store)[0] >= cut * BATCH + 1000, what="records flowing after the cut")
        publishing = rest.is_alive()
        a.kill()  # the leader dies mid-stream, with messages in flight
        killed.set()
        rest.join(60)
        assert publishing and not rest.is_alive()
        wait_until(lambda: b.said("leader True"), 10, what="the survivor to take over leadership")

        # the dead replica's session holds its unacked messages and its share of the rest
        before = counts(store)[0]
        assert before < total
        a2 = replica("replica-a")  # restarted with the same client id
        wait_until(lambda: counts(store)[0] == total, 30, what="every record after the restart")
    finally:
        pub.disconnect()
        pub.loop_stop()
    assert counts(store) == (total, total)  # exactly one row per (device, stream, seq)
    for device in DEVICES:
        c = store.device_counters("plant", device)[f"s-{device}"]
        assert (c.records, c.max_seq, c.max_contiguous_seq, c.gaps) == (PER_DEVICE, PER_DEVICE, PER_DEVICE, 0)
    assert "leader False" not in b.lines and not a2.said("leader True")  # leadership stayed with the survivor
    a2_records, a2_inserted, _ = a2.terminate()
    b_records, _, _ = b.terminate()
    assert a2_inserted > 0  # what was held in replica-a's session came to its successor
    assert b_records < total  # the survivor never got the dead replica's share


X = np.random.default_rng(1).standard_normal((1, 4)).astype(np.float32)


def twin(tmp_path: Path, broker: Broker, model: Path, name: str) -> Agent:
    env = agent_env(
        EDGEML_DATA_DIR=tmp_path / name, EDGEML_API_ADDR=f"127.0.0.1:{free_port()}", EDGEML_BROKER_URL=broker.url,
        EDGEML_MODEL_PATH=model, EDGEML_DEVICE_ID="dev-twin", EDGEML_FLEET="plant",
        EDGEML_MQTT__RECONNECT_MIN_S="0.05", EDGEML_MQTT__RECONNECT_MAX_S="0.2",
    )
    return Agent(load_config(env=env))


@pytest.mark.parametrize("store_url", ["sqlite"], indirect=True)
def test_two_agents_claiming_one_device_id(
    store: Store, broker: Broker, models: dict[str, Path], tmp_path: Path
) -> None:
    """Same fleet and device id, so the same default MQTT client id; different data dirs.

    The broker allows one connection per client id: each CONNECT takes the session over
    and disconnects the other agent, which reconnects and takes it back (a takeover
    fight; both sessions keep working in turns). Their streams differ (one per data
    dir), so the store keeps both record sequences apart with exact counters.
    """
    with Ingestor(store, broker_url=broker.url, client_id="coordinator-test"):
        agents = [twin(tmp_path, broker, models["onnx_float"], name) for name in ("a", "b")]
        for agent in agents:
            agent.start()
        try:
            for _ in range(200):
                for agent in agents:
                    agent.predict({"input": X})
            wait_until(lambda: all(a.status()["sync"]["connects"] >= 5 for a in agents), 30,
                       what="the takeover fight (each agent reconnecting again and again)")
            wait_until(lambda: all(a.status()["buffer"]["records"] == a.status()["buffer"]["pending"] == 0 for a in agents),
                       60, what="both buffers drained")
            last = {b["stream"]: b["next_seq"] - 1 for b in (a.status()["buffer"] for a in agents)}
            assert len(last) == 2

            def committed() -> bool:
                c = store.device_counters("plant", "dev-twin")
                return set(c) == set(last) and all(c[s].records >= n for s, n in last.items())

            wait_until(committed, 30, what="both streams stored")
        finally:
            for agent in agents:
                agent.stop()
    counters = store.device_counters("plant", "dev-twin")
    for stream, n in last.items():
        c = counters[stream]
        assert (c.max_contiguous_seq, c.gaps) == (c.records, 0) and c.records >= n
        rows = store.query_telemetry("plant", "dev-twin", stream=stream, kind="prediction", limit=10**6)
        assert len(rows) == 200
