"""Order across a reconnection: what the broker receives when the link drops with
messages unacknowledged. Mosquitto cannot be told to withhold a PUBACK or to delay a
CONNACK, so these tests speak MQTT 3.1.1 from a scripted server socket (the network
edge); the agent's side (paho, the publisher, the SQLite buffer) is the real one."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import orjson
import pytest

from edgeml import load_config
from edgeml.buffer import TelemetryBuffer
from edgeml.sync import MqttSync

from .conftest import agent_env, wait_until


def _read_packet(s: socket.socket) -> tuple[int, bytes] | None:
    def exactly(n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = s.recv(n - len(data))
            if not chunk:
                raise ConnectionError
            data += chunk
        return data

    try:
        header = exactly(1)[0]
        length, mult = 0, 1
        while True:
            b = exactly(1)[0]
            length += (b & 127) * mult
            mult *= 128
            if not b & 128:
                break
        return header, exactly(length)
    except (ConnectionError, OSError):
        return None


class ScriptedBroker:
    """Accepts connections one after another and records every PUBLISH as
    (connection number, dup flag, topic leaf, payload). ``hold(conn, publish)`` decides
    whether a PUBLISH goes unacknowledged and the link drops right after it."""

    def __init__(self, hold: Callable[[int, str, bytes], bool], connack_delay: Callable[[int], float] = lambda n: 0.0) -> None:
        self.hold, self.connack_delay = hold, connack_delay
        self.arrivals: list[tuple[int, bool, str, bytes]] = []
        self.connecting = [threading.Event() for _ in range(4)]
        self._srv = socket.socket()
        self._srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._srv.bind(("127.0.0.1", 0))
        self._srv.listen()
        self.url = f"mqtt://127.0.0.1:{self._srv.getsockname()[1]}"
        self._stop = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        for n in range(1, 4):
            try:
                s, _ = self._srv.accept()
            except OSError:
                return
            with s:
                if _read_packet(s) is None:  # CONNECT
                    continue
                self.connecting[n].set()
                time.sleep(self.connack_delay(n))
                s.sendall(b"\x20\x02\x00\x00")
                while not self._stop.is_set():
                    packet = _read_packet(s)
                    if packet is None:
                        break
                    header, body = packet
                    kind = header & 0xF0
                    if kind == 0x30:  # PUBLISH
                        qos, dup = (header >> 1) & 3, bool(header & 8)
                        tlen = int.from_bytes(body[:2], "big")
                        topic, rest = body[2:2 + tlen].decode(), body[2 + tlen:]
                        mid, payload = (rest[:2], rest[2:]) if qos else (b"", rest)
                        leaf = topic.rsplit("/", 1)[-1]
                        self.arrivals.append((n, dup, leaf, payload))
                        if self.hold(n, leaf, payload):
                            break  # never acknowledged: the link drops
                        if qos:
                            s.sendall(b"\x40\x02" + mid)
                    elif kind == 0x80:  # SUBSCRIBE
                        s.sendall(b"\x90\x03" + body[:2] + b"\x01")
                    elif kind == 0xC0:  # PINGREQ
                        s.sendall(b"\xd0\x00")

    def close(self) -> None:
        self._stop.set()
        self._srv.close()

    def telemetry(self) -> list[tuple[int, bool, list[int]]]:
        return [(n, dup, [r["seq"] for r in orjson.loads(p)["records"]]) for n, dup, leaf, p in self.arrivals
                if leaf == "telemetry"]

    def states(self) -> list[tuple[int, bool, bytes]]:
        return [(n, dup, p) for n, dup, leaf, p in self.arrivals if leaf == "state"]


@pytest.fixture
def session(tmp_path: Path) -> Iterator[Callable[..., tuple[MqttSync, TelemetryBuffer]]]:
    made: list[tuple[MqttSync, TelemetryBuffer, ScriptedBroker]] = []

    def make(broker: ScriptedBroker) -> tuple[MqttSync, TelemetryBuffer]:
        config = load_config(env=agent_env(
            EDGEML_DATA_DIR=tmp_path / "data", EDGEML_BROKER_URL=broker.url, EDGEML_DEVICE_ID="dev-1",
            EDGEML_FLEET="plant", EDGEML_MQTT__RECONNECT_MIN_S=0.2, EDGEML_MQTT__RECONNECT_MAX_S=0.5))
        buf = TelemetryBuffer(tmp_path / "t.db", flush_interval_ms=10)
        buf.start()
        sync = MqttSync(config, buf, agent_version="test")
        assert config.broker_url is not None
        sync.start(config.broker_url)
        made.append((sync, buf, broker))
        return sync, buf

    yield make
    for sync, buf, broker in made:
        sync.stop(0.5)
        buf.close()
        broker.close()


def _events(buf: TelemetryBuffer, name: str, n: int) -> None:
    for i in range(n):
        buf.append("event", {"name": name, "level": "info", "message": "", "data": {"i": i}})
    buf.flush()


def test_a_new_batch_never_overtakes_the_resent_ones(session) -> None:
    # connection 1 takes the first batch and drops without a PUBACK; connection 2's CONNACK
    # is slow, and a second batch is ready while it comes: it must reach the broker after
    # the resent first batch (consumers keep the highest seq seen, per docs/protocol.md)
    broker = ScriptedBroker(hold=lambda n, leaf, p: n == 1 and leaf == "telemetry",
                            connack_delay=lambda n: 0.5 if n == 2 else 0.0)
    sync, buf = session(broker)
    on_connect = sync._client.on_connect

    def descheduled(*args: object) -> None:  # paho's thread pauses before its resend loop
        on_connect(*args)
        time.sleep(0.3)

    sync._client.on_connect = descheduled
    wait_until(sync.connected.is_set, 10, what="connection 1")
    _events(buf, "a", 3)
    wait_until(lambda: broker.telemetry(), 10, what="the first batch on connection 1")
    assert broker.connecting[2].wait(10)  # paho reconnects ...
    _events(buf, "b", 3)  # ... while the CONNACK is on its way
    wait_until(lambda: sum(len(seqs) for n, _, seqs in broker.telemetry() if n == 2) >= 6, 15,
               what="both batches on connection 2")
    on_two = [(dup, seqs) for n, dup, seqs in broker.telemetry() if n == 2]
    seen = [q for _, seqs in on_two for q in seqs]
    assert seen == sorted(seen) and seen[:3] == [1, 2, 3], on_two
    assert on_two[0][0] is True  # the resend, flagged DUP
    wait_until(lambda: buf.stats().records == 0, 10, what="every record acknowledged and deleted")


def test_an_older_state_is_never_retained_after_a_newer_one(session) -> None:
    # state S1 goes out, the link drops before its PUBACK; S2 is reported while offline.
    # paho resends S1 on the next connection: S2 must reach the broker after it
    broker = ScriptedBroker(hold=lambda n, leaf, p: n == 1 and leaf == "state")
    sync, buf = session(broker)
    wait_until(sync.connected.is_set, 10, what="connection 1")
    sync.publish_state(b'{"update":"probation"}')
    wait_until(lambda: broker.states(), 10, what="S1 on connection 1")
    wait_until(lambda: not sync.connected.is_set(), 10, what="the link to drop")
    sync.publish_state(b'{"update":"idle"}')
    wait_until(lambda: [p for n, _, p in broker.states() if n == 2 and p == b'{"update":"idle"}'], 15,
               what="S2 on connection 2")
    time.sleep(0.3)  # anything sent after S2 would show here
    assert [p for n, _, p in broker.states() if n == 2][-1] == b'{"update":"idle"}', broker.states()
    assert broker.states()[-1][2] == b'{"update":"idle"}'
