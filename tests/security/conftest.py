"""A real Mosquitto running the shipped hardened configuration (configs/mosquitto/), with
certificates from a real fleet CA (cloud/pki.py), and TLS clients that hold those identities."""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from cloud import pki
from edgeml._testing.broker import MosquittoBroker

from ..conftest import REPO

SHIPPED = REPO / "configs" / "mosquitto"


@dataclass(frozen=True)
class Identity:
    """Files of one TLS identity: what a device (or the coordinator) holds."""

    name: str
    ca: Path
    cert: Path
    key: Path


class Fleet:
    """A fleet CA with a broker certificate, the coordinator's, and devices enrolled on demand."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.ca = pki.init_ca(root / "ca")
        self.broker = self.ca.issue_broker(root / "broker", ["127.0.0.1", "localhost"])
        self.coordinator = self._identity(self.ca.issue_coordinator(root / "coordinator"))
        self.devices: dict[str, Identity] = {}

    def enroll(self, device: str) -> Identity:
        """The device's identity, enrolled on first use."""
        if device not in self.devices:
            self.devices[device] = self._identity(self.ca.enroll_device(device, self.root / "devices" / device))
        return self.devices[device]

    @staticmethod
    def _identity(issued: pki.Issued) -> Identity:
        return Identity(issued.common_name, issued.ca_cert, issued.cert, issued.key)


class TLSBroker(MosquittoBroker):
    """Mosquitto with configs/mosquitto/mosquitto.conf and acl as shipped; only the paths,
    the port (loopback) and the log destination are rewritten for the test."""

    def __init__(self, workdir: Path, fleet: Fleet, server: pki.Issued | None = None) -> None:
        """``server``: the certificate it presents (default: the fleet's broker certificate)."""
        if shutil.which("mosquitto") is None:
            pytest.skip("mosquitto is not installed")
        super().__init__(workdir)
        self.acl = workdir / "acl"
        shutil.copyfile(SHIPPED / "acl", self.acl)
        self.log = workdir / "mosquitto.log"
        server = server or fleet.broker
        files = {"cafile": fleet.ca.cert_path, "certfile": server.cert, "keyfile": server.key,
                 "crlfile": fleet.ca.crl_path, "acl_file": self.acl, "persistence_location": f"{workdir}/"}
        lines = []
        for line in (SHIPPED / "mosquitto.conf").read_text().splitlines():
            key = line.split(" ", 1)[0]
            if key in files:
                line = f"{key} {files[key]}"
            elif key == "listener":
                line = f"listener {self.port} 127.0.0.1"
            elif key == "log_dest":
                line = f"log_dest file {self.log}"
            lines.append(line)
        lines += ["log_type debug", "log_type subscribe"]
        if os.geteuid() == 0:  # see MosquittoBroker: stay root to read the private key and persist
            lines.append("user root")
        self.conf.write_text("\n".join(lines) + "\n")

    @property
    def url(self) -> str:
        return f"mqtts://127.0.0.1:{self.port}"

    def reload(self) -> None:
        """SIGHUP: Mosquitto reads its configuration, the ACL and the CRL again."""
        import signal

        assert self.proc is not None
        self.proc.send_signal(signal.SIGHUP)


class TLSClient:
    """An MQTT 3.1.1 (or 5) client with a certificate: records connections, SUBACKs, messages."""

    def __init__(self, broker: TLSBroker, who: Identity, client_id: str | None = None, *, v5: bool = False) -> None:
        self.who = who
        self.connected = threading.Event()
        self.failed = threading.Event()
        self.failures: list[str] = []
        self.granted: dict[int, list[int]] = {}
        self.messages: list[tuple[str, bytes]] = []
        self._lock = threading.Lock()
        self._subacks: dict[int, threading.Event] = {}
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id or f"test-{who.name}-{id(self)}",
                                  protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311)
        self.client.tls_set(ca_certs=str(who.ca), certfile=str(who.cert), keyfile=str(who.key))
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message
        self.client.on_connect_fail = lambda *a: self._fail("connection failed")
        self.client.on_disconnect = lambda c, u, f, reason, p: self._fail(f"disconnected: {reason}")
        self.client.reconnect_delay_set(0.2, 1)
        self.client.connect_async("127.0.0.1", broker.port)
        self.client.loop_start()

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if reason.is_failure:
            self._fail(str(reason))
        else:
            self.connected.set()

    def _fail(self, why: str) -> None:
        self.failures.append(why)
        self.failed.set()

    def _on_subscribe(self, client: Any, userdata: Any, mid: int, reasons: Any, properties: Any) -> None:
        self.granted[mid] = [r.value for r in reasons]
        self._subacks.setdefault(mid, threading.Event()).set()

    def _on_message(self, client: Any, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.messages.append((msg.topic, msg.payload))

    def subscribe(self, topic: str, timeout: float = 5.0) -> int:
        """Subscribe at QoS 1; the broker's granted QoS (0x80: refused)."""
        rc, mid = self.client.subscribe(topic, qos=1)
        assert rc == mqtt.MQTT_ERR_SUCCESS
        done = self._subacks.setdefault(mid, threading.Event())
        assert done.wait(timeout), f"no SUBACK for {topic}"
        return self.granted[mid][0]

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        """Publish at QoS 1 and wait for the PUBACK (MQTT 3.1.1 acknowledges even a refused publish)."""
        self.client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(5)

    def received(self, topic_part: str = "") -> list[tuple[str, bytes]]:
        with self._lock:
            return [(t, p) for t, p in self.messages if topic_part in t]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def tls_handshake_refused(broker: TLSBroker, who: Identity, wait_s: float = 10.0) -> str | None:
    """Connect with ``who``'s certificate; why the broker refused it, or None if it connected.

    A refused client certificate shows as a TLS alert during the handshake (TLS 1.2) or on
    the first read after it (TLS 1.3): either way paho reports a failed connection."""
    client = TLSClient(broker, who)
    try:
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if client.connected.is_set():
                return None
            if client.failed.is_set():
                return "; ".join(client.failures)
            time.sleep(0.02)
        raise AssertionError(f"{who.name}: neither connected nor refused within {wait_s}s")
    finally:
        client.close()


@pytest.fixture
def fleet(tmp_path: Path) -> Fleet:
    return Fleet(tmp_path / "pki")


@pytest.fixture
def tls_broker(tmp_path: Path, fleet: Fleet) -> Iterator[TLSBroker]:
    broker = TLSBroker(tmp_path / "broker", fleet)
    broker.start()
    yield broker
    broker.stop()
