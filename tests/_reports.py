"""What a device reports, read from the broker the way the cloud reads it.

The retained reported state on ``…/state`` and the event records on ``…/telemetry``,
taken from a real Mosquitto with paho subscribers, never from the agent's own database.
"""

from __future__ import annotations

import threading
from typing import Any

import httpx
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from .conftest import Collector, wait_until

#: Event names that speak of an update (update_state, update_succeeded, probation_crash, ...).
UPDATE_EVENTS = ("update_", "probation_", "rollback_")
#: Row counts of the marker predictions: the scenarios' own traffic sends one row.
MARKER_ROWS = (3, 5)


def _connected(port: int) -> mqtt.Client:
    client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2)
    client.connect("127.0.0.1", port)
    client.loop_start()
    return client


def clear_retained(port: int, topic: str) -> None:
    """Delete the broker's retained message on ``topic`` (an empty retained publish)."""
    client = _connected(port)
    try:
        client.publish(topic, b"", qos=1, retain=True).wait_for_publish(5)
    finally:
        client.disconnect()
        client.loop_stop()


def retained(port: int, topic: str, timeout: float = 10) -> bytes:
    """The retained message a new subscriber to ``topic`` receives."""
    got: list[bytes] = []
    arrived = threading.Event()

    def on_message(client: Any, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        if msg.retain and not got:
            got.append(msg.payload)
            arrived.set()

    client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2)
    client.on_message = on_message
    client.on_connect = lambda c, *a: c.subscribe(topic, qos=1)
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        assert arrived.wait(timeout), f"no retained message on {topic}"
    finally:
        client.disconnect()
        client.loop_stop()
    return got[0]


def _records(telemetry: Collector, kind: str) -> dict[int, dict[str, Any]]:
    """Records of one kind by seq (delivery is at least once: duplicates share a seq)."""
    return {r["seq"]: r for r in telemetry.records() if r["kind"] == kind}


def boot_seq(telemetry: Collector, pid: int, timeout: float = 30) -> int:
    """The seq of the ``agent_started`` event of the agent process ``pid``."""

    def find() -> int | None:
        for seq, r in _records(telemetry, "event").items():
            if r["name"] == "agent_started" and r["data"].get("pid") == pid:
                return seq
        return None

    return wait_until(find, timeout, what=f"agent_started of pid {pid} at the broker")


def settle(api: str, telemetry: Collector, after: int, timeout: float = 30) -> None:
    """Return once everything the agent recorded before this call has reached the broker.

    Two marker predictions, the second sent after the first arrived: records made in
    one buffer flush may be numbered by kind, but the second marker is made after that
    flush, so it gets a higher seq than every earlier record, and records are sent in
    seq order."""
    for rows in MARKER_ROWS:
        r = httpx.post(f"{api}/v1/predict", json={"inputs": {"input": [[0.1, 0.2, 0.3, 0.4]] * rows}}, timeout=5)
        assert r.status_code == 200, r.text

        def arrived(rows: int = rows) -> bool:
            return any(s > after and p["batch"] == rows for s, p in _records(telemetry, "prediction").items())

        wait_until(arrived, timeout, what=f"the {rows}-row marker prediction at the broker")


def update_events(telemetry: Collector, after: int) -> list[dict[str, Any]]:
    """The update events with a seq above ``after``, in seq order, each once."""
    events = _records(telemetry, "event")
    return [events[s] for s in sorted(events) if s > after and events[s]["name"].startswith(UPDATE_EVENTS)]


def chain(events: list[dict[str, Any]]) -> list[str]:
    """``update_state`` events as ``state:<state>``, the others by name."""
    return [f"state:{e['data']['state']}" if e["name"] == "update_state" else e["name"] for e in events]
