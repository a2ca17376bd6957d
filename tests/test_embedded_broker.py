"""The embedded broker the demo falls back to without Mosquitto: real MQTT 3.1.1 over TCP."""

from __future__ import annotations

import threading
import time

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

pytest.importorskip("amqtt", reason="the amqtt package (cloud extra) is not installed")

from edgeml._testing.broker import EmbeddedBroker  # noqa: E402


def test_embedded_broker_delivers_qos1_and_retained_messages() -> None:
    broker = EmbeddedBroker().start()
    clients: list[mqtt.Client] = []
    try:
        pub = mqtt.Client(CallbackAPIVersion.VERSION2, "edgeml-test-pub", protocol=mqtt.MQTTv311)
        pub.connect("127.0.0.1", broker.port)
        pub.loop_start()
        clients.append(pub)
        pub.publish("edgeml/v1/f/d/status", b'{"state":"online"}', qos=1, retain=True).wait_for_publish(10)

        got: list[tuple[str, bytes, bool]] = []
        subscribed = threading.Event()
        sub = mqtt.Client(CallbackAPIVersion.VERSION2, "edgeml-test-sub", protocol=mqtt.MQTTv311)
        sub.on_connect = lambda c, *a: c.subscribe("edgeml/v1/+/+/#", qos=1)
        sub.on_subscribe = lambda *a: subscribed.set()
        sub.on_message = lambda c, u, m: got.append((m.topic, m.payload, bool(m.retain)))
        sub.connect("127.0.0.1", broker.port)
        sub.loop_start()
        clients.append(sub)
        assert subscribed.wait(10)
        for i in range(200):
            pub.publish("edgeml/v1/f/d/telemetry", str(i).encode(), qos=1)
        deadline = time.monotonic() + 15
        while len(got) < 201 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ("edgeml/v1/f/d/status", b'{"state":"online"}', True) in got  # the retained status
        telemetry = [int(p) for t, p, _ in got if t.endswith("/telemetry")]
        assert telemetry == list(range(200))  # every QoS 1 message, in order
    finally:
        for c in clients:
            c.loop_stop()
            c.disconnect()
        broker.stop()
    assert broker.proc is None
