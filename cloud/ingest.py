"""Ingestion: MQTT telemetry, status and reported state into the store.

Threads
    paho's network thread runs the ``_on_*`` callbacks; they never touch the store.
    ``_on_message`` hands each message to the writer thread through a queue. The writer
    thread (``_write_loop``) parses messages, commits them in flushes (every
    ``flush_interval_s`` or ``flush_max_records`` records, whichever comes first) and
    only then acknowledges them.

Delivery
    QoS 1, a persistent session (MQTT 3.1.1 ``clean_session=false``, or MQTT 5
    ``clean_start=false`` with a session expiry) and manual acknowledgement: a message
    is PUBACKed only after the transaction holding it is committed. A coordinator that
    stops or crashes mid-stream leaves the unacknowledged messages with the broker,
    which sends them again; the store's (fleet, device, stream, seq) key turns them
    into counted duplicates. Acks are sent in arrival order, and only on the
    connection the message arrived on (a message from a previous connection is
    redelivered anyway; acking its packet id on a new connection could acknowledge
    another message).

Replicas
    With ``shared_group`` set the ingestor speaks MQTT 5 and takes telemetry through
    the shared subscription ``$share/{group}/edgeml/v1/{fleet}/+/telemetry``, so
    replicas split the load. Status and state are not shared: every replica gets them
    (and their retained values on subscribe); writing them is idempotent.

Poison messages
    Oversized, not JSON, wrong schema, topic/payload mismatch, unknown device (policy
    ``preregistered``): counted by reason in the store with the topic, logged, acked,
    and ingestion goes on.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edgeml._config import TLSFiles, parse_broker_url
from edgeml.protocol import STATE, STATUS, TELEMETRY, fleet_filter

from . import _parse
from ._exceptions import ConfigError, IngestError, PoisonMessage, StoreError
from .store import Store, TelemetryBatchIn, Transaction

log = logging.getLogger(__name__)

DEFAULT_MAX_PAYLOAD = 1 << 20


class IngestConfig(BaseModel):
    """Settings of an :class:`Ingestor` (immutable, validated once)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    broker_url: str = "mqtt://127.0.0.1:1883"
    tls: TLSFiles | None = None  # mqtts://: CA and client certificate (None: the system's CAs)
    client_id: str = "edgeml-coordinator"
    shared_group: str | None = Field(None, pattern=r"^[A-Za-z0-9._-]{1,64}$")
    fleet: str = "+"
    policy: Literal["accept", "preregistered"] = "accept"
    max_payload_bytes: int = Field(DEFAULT_MAX_PAYLOAD, ge=1024)
    validation: Literal["fast", "full"] = "fast"
    flush_interval_s: float = Field(0.05, gt=0)
    flush_max_records: int = Field(2000, ge=1)
    receive_maximum: int = Field(200, ge=1, le=65535)
    session_expiry_s: int = Field(7 * 86400, ge=0)
    keepalive_s: int = Field(30, ge=5)
    keep_poison: int = Field(100, ge=1)
    store_retry_max_s: float = Field(5.0, gt=0)


@dataclass(slots=True)
class _Message:
    """One received message and what the writer made of it."""

    generation: int
    mid: int
    qos: int
    topic: str
    size: int
    payload: bytes | None
    leaf: str = ""
    fleet: str = ""
    device: str = ""
    batch: TelemetryBatchIn | None = None
    doc: dict[str, Any] | None = None
    poison: PoisonMessage | None = None


@dataclass(slots=True)
class IngestStats:
    messages: int = 0
    records: int = 0
    inserted: int = 0
    duplicates: int = 0
    poison: dict[str, int] = field(default_factory=dict)
    flushes: int = 0
    store_errors: int = 0
    connects: int = 0


class Ingestor:
    """Subscribe, validate, store, acknowledge. ``start()``, then ``stop()`` to drain."""

    def __init__(self, store: Store, config: IngestConfig | None = None, **settings: Any) -> None:
        try:
            self.config = config or IngestConfig(**settings)
        except ValidationError as exc:
            raise ConfigError(str(exc)) from exc
        try:
            self.broker = parse_broker_url(self.config.broker_url)
        except ValueError as exc:
            raise ConfigError(f"broker_url: {exc}") from exc
        self.store = store
        self.stats = IngestStats()
        self.subscribed = threading.Event()
        self._queue: queue.SimpleQueue[_Message | None] = queue.SimpleQueue()
        self._generation = 0
        self._ack_lock = threading.Lock()
        self._closing = threading.Event()
        self._known: set[tuple[str, str]] = set()
        self._unknown: dict[tuple[str, str], float] = {}
        self._writer: threading.Thread | None = None
        self._client = self._make_client()

    # ------------------------------------------------------------------ setup
    @property
    def mqtt5(self) -> bool:
        return self.config.shared_group is not None

    def topics(self) -> list[str]:
        telemetry = fleet_filter(TELEMETRY, self.config.fleet)
        if self.mqtt5:
            telemetry = f"$share/{self.config.shared_group}/{telemetry}"
        return [telemetry, fleet_filter(STATUS, self.config.fleet), fleet_filter(STATE, self.config.fleet)]

    def _make_client(self) -> mqtt.Client:
        if self.mqtt5:
            client = mqtt.Client(CallbackAPIVersion.VERSION2, self.config.client_id, protocol=mqtt.MQTTv5, manual_ack=True)
        else:
            client = mqtt.Client(
                CallbackAPIVersion.VERSION2, self.config.client_id, clean_session=False, protocol=mqtt.MQTTv311,
                manual_ack=True,
            )
        if self.broker.username:
            client.username_pw_set(self.broker.username, self.broker.password)
        if self.broker.tls:
            (self.config.tls or TLSFiles()).apply(client)
        client.reconnect_delay_set(0.2, 10)
        client.max_inflight_messages_set(64)  # our own publishes: none today
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        return client

    def start(self, timeout: float | None = 10.0) -> Ingestor:
        """Connect and subscribe; with a ``timeout``, wait for the subscription (IngestError)."""
        if self._writer is not None:
            raise IngestError("ingestor already started")
        self._closing.clear()
        self._writer = threading.Thread(target=self._write_loop, name="edgeml-ingest-writer", daemon=True)
        self._writer.start()
        if self.mqtt5:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = self.config.session_expiry_s
            props.ReceiveMaximum = self.config.receive_maximum
            self._client.connect_async(
                self.broker.host, self.broker.port, self.config.keepalive_s, clean_start=False, properties=props
            )
        else:
            self._client.connect_async(self.broker.host, self.broker.port, self.config.keepalive_s)
        self._client.loop_start()
        if timeout is not None and not self.subscribed.wait(timeout):
            self.stop(drain=False)
            raise IngestError(f"could not subscribe at {self.broker} within {timeout}s")
        return self

    def stop(self, timeout: float = 10.0, *, drain: bool = True) -> None:
        """Stop taking messages, commit and acknowledge what was received, disconnect.

        Messages that arrive meanwhile are not acknowledged: the broker keeps them for
        the next session. ``drain=False`` acknowledges nothing more, as a crash between
        commit and PUBACK would: the broker redelivers, the store counts duplicates.
        """
        self._closing.set()
        if self._writer is not None:
            if not drain:
                with self._ack_lock:
                    self._generation += 1  # nothing received so far will be acked
            self._queue.put(None)
            self._writer.join(timeout)
            if self._writer.is_alive():
                log.error("ingest writer did not finish within %.1fs; unacknowledged messages will be redelivered", timeout)
            self._writer = None
        self._client.disconnect()
        self._client.loop_stop()
        self.subscribed.clear()

    def __enter__(self) -> Ingestor:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ paho thread
    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if reason.is_failure:
            log.warning("broker %s refused the connection: %s", self.broker, reason)
            return
        with self._ack_lock:
            self._generation += 1
        self.stats.connects += 1
        log.info("connected to %s (session present: %s)", self.broker, flags.session_present)
        client.subscribe([(t, 1) for t in self.topics()])  # re-subscribe on every CONNACK

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, reasons: Any, properties: Any) -> None:
        failed = [r for r in reasons if r.is_failure]
        if failed:
            log.error("subscription refused by %s: %s", self.broker, failed)
            return
        self.subscribed.set()

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if not self._closing.is_set():
            log.warning("disconnected from %s: %s (reconnecting)", self.broker, reason)

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        if self._closing.is_set():
            return  # not acked: the broker sends it again in the next session
        payload = message.payload
        self._queue.put(_Message(self._generation, message.mid, message.qos, message.topic, len(payload), payload))

    # ------------------------------------------------------------------ writer thread
    def _write_loop(self) -> None:
        interval, max_records = self.config.flush_interval_s, self.config.flush_max_records
        done = False
        while not done:
            item = self._queue.get()
            if item is None:
                break
            pending, records = [item], self._parse(item)
            deadline = time.monotonic() + interval
            while records < max_records:
                try:
                    item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if item is None:
                    done = True
                    break
                pending.append(item)
                records += self._parse(item)
            if self._commit(pending):
                self._ack(pending)

    def _parse(self, item: _Message) -> int:
        """Fill in ``item`` from its payload; return its record count."""
        payload, item.payload = item.payload or b"", None
        limit = self.config.max_payload_bytes
        try:
            item.fleet, item.device, item.leaf = _parse.split_topic(item.topic)
            if not payload and item.leaf in (STATUS, STATE):  # how MQTT deletes a retained message:
                return 0  # no batch, no document: nothing to store
            if item.leaf == TELEMETRY:
                full = self.config.validation == "full"
                item.batch = _parse.telemetry(item.fleet, item.device, payload, limit=limit, full=full)
            elif item.leaf == STATUS:
                item.doc = _parse.status(item.device, payload, limit=limit)
            else:
                item.doc = _parse.state(item.fleet, item.device, payload, limit=limit)
            self._check_device(item.fleet, item.device)
        except PoisonMessage as exc:
            item.poison, item.batch, item.doc = exc, None, None
            return 0
        self.stats.messages += 1
        return len(item.batch.records) if item.batch else 0

    def _check_device(self, fleet: str, device: str) -> None:
        key = (fleet, device)
        if self.config.policy == "accept" or key in self._known:
            return
        now = time.monotonic()
        if now - self._unknown.get(key, -1e9) > 1.0:  # ask the store at most once a second
            self._unknown.pop(key, None)
            try:
                with self.store.transaction() as tx:
                    found = tx.find_device(fleet, device) is not None
            except StoreError as exc:
                log.error("cannot check device %s/%s: %s", fleet, device, exc)
                found = True  # let the commit retry or fail; never reject a device on an outage
            if found:
                self._known.add(key)
                return
            self._unknown[key] = now
        raise PoisonMessage(_parse.UNKNOWN_DEVICE, f"{fleet}/{device} is not registered")

    def _commit(self, pending: list[_Message]) -> bool:
        """Write one flush in one transaction, retrying with backoff while the store fails."""
        delay = 0.1
        while True:
            try:
                with self.store.transaction(write=True) as tx:
                    results = self._write(tx, pending)
                break
            except StoreError as exc:
                self.stats.store_errors += 1
                if self._closing.is_set() or not exc.transient:
                    log.error("store write failed, %d messages left unacknowledged: %s", len(pending), exc)
                    return False
                log.warning("store write failed (retrying in %.1fs): %s", delay, exc)
                time.sleep(delay)
                delay = min(delay * 2, self.config.store_retry_max_s)
        self.stats.flushes += 1
        for r in results.values():
            self.stats.inserted += r.inserted
            self.stats.duplicates += r.duplicates
        for item in pending:
            if item.batch is not None:
                self.stats.records += len(item.batch.records)
            if item.poison is not None:
                reason = item.poison.reason
                self.stats.poison[reason] = self.stats.poison.get(reason, 0) + 1
                log.warning("rejected message on %s (%d bytes): %s", item.topic, item.size, item.poison)
        return True

    def _write(self, tx: Transaction, pending: list[_Message]) -> dict[Any, Any]:
        now = time.time()
        results = tx.insert_many((m.batch for m in pending if m.batch is not None), received_at=now)
        devices: dict[tuple[str, str], list[_Message]] = {}
        for m in pending:
            if m.batch is not None or m.doc is not None:  # not poison, not a cleared retained message
                devices.setdefault((m.fleet, m.device), []).append(m)
        for fleet, device in sorted(devices):  # sorted: replicas lock rows in one order
            tx.touch_device(fleet, device, now)
            statuses = [m.doc for m in devices[fleet, device] if m.leaf == STATUS and m.doc is not None]
            states = [m.doc for m in devices[fleet, device] if m.leaf == STATE and m.doc is not None]
            if statuses:
                tx.set_status(fleet, device, statuses[-1], seen_at=now)
            if states:
                tx.set_reported_state(fleet, device, states[-1], seen_at=now)
        for m in sorted((m for m in pending if m.poison is not None), key=lambda m: m.poison.reason):  # type: ignore[union-attr]
            tx.count_error(m.poison.reason, m.topic, m.size, detail=m.poison.detail, ts=now, keep=self.config.keep_poison)  # type: ignore[union-attr]
        return results

    def _ack(self, pending: list[_Message]) -> None:
        with self._ack_lock:
            for m in pending:
                if m.generation == self._generation:
                    with contextlib.suppress(ValueError, RuntimeError):
                        self._client.ack(m.mid, m.qos)
