"""MQTT session: publishes the telemetry buffer in batches, receives the desired state.

Threads
    paho's network thread runs the ``_on_*`` callbacks; they never touch SQLite. They
    hand acknowledgements to the publisher thread through a queue. The publisher
    thread (``_publish_loop``) owns the cursor, reads batches from the buffer,
    publishes them and deletes acknowledged records.

Delivery
    QoS 1, persistent session (clean_session false), at most ``max_inflight`` batches
    unacknowledged. A record leaves the buffer only after the PUBACK of the message
    that carried it. On reconnection paho resends unacknowledged messages (DUP) once
    ``on_connect`` returns; no new batch is published until those are acknowledged,
    so a new batch never overtakes a resent one. After a restart the publisher starts
    again from the oldest record in the buffer. Either way the only duplicates are
    records of unacknowledged messages, in order.

Reported state
    One state message at a time is unacknowledged: a newer state waits for the PUBACK
    of the one before it (paho may be resending that one), so the broker never retains
    an older state after a newer one.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode

from ._config import AgentConfig, BrokerURL
from ._exceptions import ConfigError, StorageError
from ._memory import Trimmer
from .buffer import TelemetryBuffer
from .protocol import PROTOCOL_VERSION, Topics

log = logging.getLogger(__name__)

#: Largest message accepted on the agent's own topics.
MAX_INCOMING_BYTES = 256 * 1024
#: After a reconnection, new batches wait this long at most for the resent ones to be
#: acknowledged (a safety valve: paho resends every unacknowledged message at once).
RESEND_WAIT_S = 30.0
#: A trim less than this old means a burst is going on: its tail is trimmed when it ends.
TRIM_BURST_S = 2.0


@dataclass(slots=True)
class _InFlight:
    first: int
    last: int
    count: int
    size: int
    sent: float


class _TokenBucket:
    """Bandwidth cap: ``take(n)`` sleeps until ``n`` bytes may be sent."""

    def __init__(self, rate_bps: int) -> None:
        self.rate = float(rate_bps)
        self.tokens = self.rate
        self.stamp = time.monotonic()

    def take(self, n: int, stop: threading.Event) -> None:
        while not stop.is_set():
            now = time.monotonic()
            self.tokens = min(self.rate, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now
            if self.tokens >= min(n, self.rate):
                self.tokens -= n
                return
            stop.wait((min(n, self.rate) - self.tokens) / self.rate)


class MqttSync:
    """The agent's MQTT session. ``start()`` connects in the background and keeps trying."""

    def __init__(
        self,
        config: AgentConfig,
        buffer: TelemetryBuffer,
        *,
        agent_version: str,
        on_message: Callable[[str, bytes], None] | None = None,
    ) -> None:
        self.config = config
        self.buffer = buffer
        self.topics = Topics(config.fleet, config.device_id)
        self.agent_version = agent_version
        self.on_message = on_message
        self.broker: BrokerURL | None = None
        self.connected = threading.Event()
        self.last_publish_ts: float | None = None
        self.published_records = 0
        self.acked_records = 0
        self.connects = 0
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._acks: queue.SimpleQueue[int] = queue.SimpleQueue()
        self._inflight: dict[int, _InFlight] = {}
        self._ack_retry: list[_InFlight] = []
        self._inflight_lock = threading.Lock()
        # batches in flight when the connection came up (paho resends them): no new batch before their PUBACKs
        self._resend: set[int] = set()
        self._resend_until = 0.0
        self._trimmer = Trimmer()
        self._cursor = 0
        self._thread: threading.Thread | None = None
        settings = config.mqtt
        self._bucket = _TokenBucket(settings.bandwidth_limit_bps) if settings.bandwidth_limit_bps else None
        self._prefix = (
            b'{"v":%d,"fleet":%s,"device":%s,"stream":%s,"sent_at":'
            % (PROTOCOL_VERSION, orjson.dumps(config.fleet), orjson.dumps(config.device_id), orjson.dumps(buffer.stream))
        )
        self._state_payload: bytes | None = None
        # held while the state payload is stored and sent, and while a connection comes up:
        # either the update thread sees the connection or the connection sees the payload
        self._state_lock = threading.Lock()
        self._state_mid: int | None = None  # the state message not yet acknowledged
        self._state_sent: bytes | None = None  # what it carries
        self._client = self._make_client()
        buffer.add_listener(self._wake.set)

    # ------------------------------------------------------------------ setup
    def _status(self, state: str, reason: str) -> bytes:
        return orjson.dumps(
            {
                "v": PROTOCOL_VERSION, "device": self.config.device_id, "state": state, "ts": time.time(),
                "reason": reason, "agent_version": self.agent_version, "stream": self.buffer.stream,
            }
        )

    def _make_client(self) -> mqtt.Client:
        settings = self.config.mqtt
        client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=self.config.client_id,
            clean_session=False,
            protocol=mqtt.MQTTv311,
        )
        client.reconnect_delay_set(settings.reconnect_min_s, settings.reconnect_max_s)
        client.max_inflight_messages_set(settings.max_inflight + 8)
        client.max_queued_messages_set(0)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_message = self._on_message
        return client

    def start(self, broker: BrokerURL) -> None:
        """Connect to ``broker`` in the background and start publishing."""
        self.broker = broker
        settings = self.config.mqtt
        if broker.username:
            self._client.username_pw_set(broker.username, broker.password)
        if broker.tls:
            try:
                self._client.tls_set(
                    ca_certs=str(settings.ca_file) if settings.ca_file else None,
                    certfile=str(settings.cert_file) if settings.cert_file else None,
                    keyfile=str(settings.key_file) if settings.key_file else None,
                )
            except (ssl.SSLError, OSError) as exc:  # a file that is not PEM, a key that does not fit
                raise ConfigError("mqtt", f"cannot use the TLS files (ca_file, cert_file, key_file): {exc}") from exc
        self._client.will_set(self.topics.status, self._status("offline", "connection_lost"), qos=1, retain=True)
        self._cursor = (self.buffer.oldest_seq() or self.buffer.stats().next_seq) - 1
        self._client.connect_async(broker.host, broker.port, keepalive=settings.keepalive_s)
        self._client.loop_start()
        self._thread = threading.Thread(target=self._publish_loop, name="edgeml-mqtt-publish", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Drain what can be acknowledged within ``timeout``, say offline, disconnect."""
        deadline = time.monotonic() + timeout
        while self.connected.is_set() and time.monotonic() < deadline:
            self._wake.set()
            with self._inflight_lock:
                idle = not self._inflight
            if idle and self.buffer.read_batch(self._cursor, 1, 1 << 20) is None:
                break
            time.sleep(0.02)
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._drain_acks()
        if self.connected.is_set():
            info = self._client.publish(self.topics.status, self._status("offline", "shutdown"), qos=1, retain=True)
            with contextlib.suppress(RuntimeError, ValueError):  # disconnected: the will says offline
                info.wait_for_publish(timeout=max(0.1, deadline - time.monotonic()))
        self.connected.clear()
        self._client.disconnect()
        self._client.loop_stop()
        self._drain_acks()  # PUBACKs that came in while saying offline: those records are delivered

    def publish_state(self, payload: bytes) -> None:
        """The reported state (retained): sent now if connected and no older state is
        unacknowledged (else once it is), and again on every connection."""
        with self._state_lock:
            self._state_payload = payload
            if self.connected.is_set() and self._state_mid is None:
                self._send_state(self._client)

    def _send_state(self, client: mqtt.Client) -> None:
        """Publish the current state; the caller holds ``_state_lock``."""
        payload = self._state_payload
        info = client.publish(self.topics.state, payload, qos=1, retain=True)
        if info.rc in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):  # NO_CONN: paho keeps it
            self._state_mid, self._state_sent = info.mid, payload

    def _state_acked(self, mid: int) -> None:
        """Publisher thread: a PUBACK for ``mid``; if it is the state's, sends a state that changed meanwhile."""
        with self._state_lock:
            if mid != self._state_mid:
                return
            self._state_mid = None
            if self._state_payload is not self._state_sent and self.connected.is_set():
                self._send_state(self._client)

    # ------------------------------------------------------------------ paho thread
    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if reason.is_failure:
            log.warning("broker %s refused the connection: %s", self.broker, reason)
            return
        self.connects += 1
        log.info("connected to %s (session present: %s)", self.broker, flags.session_present)
        client.publish(self.topics.status, self._status("online", "connected"), qos=1, retain=True)
        client.subscribe(self.topics.desired, qos=1)  # re-subscribe on every CONNACK
        with self._inflight_lock:  # paho resends these after this callback: new batches wait for them
            self._resend = set(self._inflight)
            self._resend_until = time.monotonic() + RESEND_WAIT_S
        with self._state_lock:  # a state reported from now on is sent by publish_state itself
            # an unacknowledged state is resent by paho; the current one follows its PUBACK
            if self._state_payload is not None and self._state_mid is None:
                self._send_state(client)
            self.connected.set()
        self._wake.set()

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if self.connected.is_set():
            log.warning("disconnected from %s: %s (reconnecting)", self.broker, reason)
        self.connected.clear()

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason: Any, properties: Any) -> None:
        self._acks.put(mid)
        self._wake.set()

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        if self.on_message is not None:
            try:
                self.on_message(message.topic, message.payload)
            except Exception:  # one hostile message must not end paho's thread (and every message after it)
                log.exception("handling a message on %s failed; dropped", message.topic)

    # ------------------------------------------------------------------ publisher thread
    def _drain_acks(self) -> None:
        """Delete every acknowledged batch waiting in the queue, in one transaction."""
        done, self._ack_retry = self._ack_retry, []
        while True:
            try:
                mid = self._acks.get_nowait()
            except queue.Empty:
                break
            with self._inflight_lock:
                item = self._inflight.pop(mid, None)
                self._resend.discard(mid)
            if item is not None:
                done.append(item)
            else:  # a status or state message
                self._state_acked(mid)
        if not done:
            return
        try:
            self.buffer.ack_many([(item.first, item.last) for item in done])
        except StorageError as exc:
            log.error("%s (retrying the deletion)", exc)
            self._ack_retry = done  # acknowledged: delete them later, never send them again
            return
        acked = sum(item.count for item in done)
        self.acked_records += acked
        self._trimmer.pending += acked

    def _publish_loop(self) -> None:
        limit = self.config.mqtt.max_inflight
        while not self._stop.is_set():
            self._drain_acks()
            with self._inflight_lock:
                full = len(self._inflight) >= limit or self._resending()
            if full or not self.connected.is_set():
                self._wake.wait(0.5)
                self._wake.clear()
                continue
            try:
                published = self._publish_next()
            except StorageError as exc:
                log.error("%s", exc)
                published = False
            except Exception:  # a bug must not end publishing for the agent's life: log, back off, retry
                log.exception("publishing telemetry failed (will retry)")
                self._stop.wait(1.0)
                published = False
            if not published:
                with self._inflight_lock:
                    idle = not self._inflight
                if idle:  # all sent and acknowledged: hand back what the batches used (a burst's tail too)
                    self._trimmer.idle(burst_s=TRIM_BURST_S)
                self._wake.wait(0.5)
                self._wake.clear()

    def _resending(self) -> bool:
        """Batches from before the reconnection are unacknowledged (caller holds ``_inflight_lock``)."""
        if self._resend and time.monotonic() > self._resend_until:
            log.warning("%d resent batches not acknowledged after %.0f s; publishing on", len(self._resend), RESEND_WAIT_S)
            self._resend = set()
        return bool(self._resend)

    def _publish_next(self) -> bool:
        settings = self.config.mqtt
        batch = self.buffer.read_batch(self._cursor, settings.batch_max_records, settings.batch_max_bytes)
        if batch is None:
            return False
        payload = b"".join((self._prefix, repr(time.time()).encode(), b',"records":[', b",".join(batch.bodies), b"]}"))
        if self._bucket is not None:
            self._bucket.take(len(payload), self._stop)
        with self._inflight_lock:  # the PUBACK may arrive before publish() returns
            if not self.connected.is_set() or self._resending():
                return False  # the link changed while the batch was read or waited for bandwidth: read it again
            info = self._client.publish(self.topics.telemetry, payload, qos=1)
            if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
                log.error("publish failed: %s", mqtt.error_string(info.rc))
                return False
            # NO_CONN: paho keeps the message and sends it on reconnection
            self._inflight[info.mid] = _InFlight(batch.first, batch.last, batch.count, len(payload), time.time())
        self._cursor = batch.last
        self.published_records += batch.count
        self.last_publish_ts = time.time()
        return True

    # ------------------------------------------------------------------ introspection
    def stats(self) -> dict[str, Any]:
        with self._inflight_lock:
            inflight = len(self._inflight)
        return {
            "broker": str(self.broker) if self.broker else None,
            "connected": self.connected.is_set(),
            "connects": self.connects,
            "inflight_messages": inflight,
            "published_records": self.published_records,
            "acked_records": self.acked_records,
            "last_publish_ts": self.last_publish_ts,
        }
