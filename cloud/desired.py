"""Desired states: signed, revisioned, retained documents, one per device.

    election = LeaderElection(store_url).start()
    with MqttPublisher("mqtt://broker:1883") as publish:
        writer = DesiredStateWriter(store, publish, "fleet.key", is_leader=lambda: election.is_leader)
        writer.set("plant", "dev-1", ModelRef(name="mlp", version="2.0.0", url=..., sha256=..., size=...))

Only the leader writes (:class:`NotLeader` otherwise). :meth:`DesiredStateWriter.set`:

1. one write transaction: take the device's row in ``desired_states`` (PostgreSQL
   ``SELECT ... FOR UPDATE``, SQLite ``BEGIN IMMEDIATE``), ``revision = previous + 1``,
   build and sign the document, store the exact payload bytes with the revision; commit.
   Rows are never deleted, so a revision is never reused: not across restarts, not
   across failovers, not by two writers racing (the second waits for the row);
2. publish the stored bytes retained, QoS 1, on ``edgeml/v1/{fleet}/{device}/desired``;
3. read the row again: if a newer revision was committed meanwhile (another thread, or
   an old leader that had not noticed it lost), publish that one too. Whoever publishes
   last therefore publishes the newest document, and the broker's retained copy never
   ends older than the store.

Expiry (freeze-attack protection): with ``ttl_s`` every document carries
``expires_at = issued_at + ttl_s`` and the agent refuses one that has expired, so a broker
that keeps serving an old document cannot hold a device on it forever. The leader then
runs an :class:`ExpiryRefresher`, which re-issues documents (same models, next revision)
before they expire.

If the publish fails the document is stored but not on the broker (:class:`PublishError`):
retry, or call :meth:`DesiredStateWriter.republish_all`, which a new leader calls anyway.

Documents (see docs/protocol.md, "Desired state"): every number is an integer
(``issued_at`` and ``expires_at`` in whole Unix seconds), so the canonical JSON of the
signature is the same in every language (RFC 8785 for these documents). The document
names its ``fleet`` and ``device``: a signed document copied to another device's topic
is recognisably not that device's.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from pydantic import ValidationError

from edgeml._config import TLSFiles, parse_broker_url
from edgeml.protocol import DesiredState, ModelRef, Topics
from edgeml.protocol.signing import load_private_key, sign_document

from ._exceptions import CloudError, ConfigError, Conflict, NotLeader, PublishError
from .store import Store, Transaction

#: A model of a desired-state document: a reference, its dict, or None (no model).
DocumentModel = ModelRef | Mapping[str, Any] | None

log = logging.getLogger(__name__)

__all__ = ["DesiredStateWriter", "ExpiryRefresher", "MqttPublisher", "NotLeader", "PublishError", "StoredDesired"]

#: The agent rejects larger documents.
MAX_DOCUMENT_BYTES = 256 * 1024

Publish = Callable[[str, bytes], None]


@dataclass(frozen=True, slots=True)
class StoredDesired:
    """One device's current desired state as stored: ``payload`` is the exact published bytes."""

    fleet: str
    device: str
    revision: int
    payload: bytes
    updated_at: float

    @property
    def document(self) -> dict[str, Any]:
        return json.loads(self.payload)


def encode_document(doc: Mapping[str, Any]) -> bytes:
    """The payload of a signed document: sorted keys, no whitespace, UTF-8, integers only."""
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def _model_dict(ref: ModelRef | Mapping[str, Any] | None, what: str) -> dict[str, Any] | None:
    if ref is None:
        return None
    try:
        model = ref if isinstance(ref, ModelRef) else ModelRef.model_validate(dict(ref))
    except ValidationError as exc:
        raise ValueError(f"{what}: {exc}") from exc
    return model.model_dump(mode="json", exclude_none=True)


class DesiredStateWriter:
    """Write, sign, store and publish desired states; the leader only.

    ``publish(topic, payload)`` must publish retained at QoS 1 and return only once the
    broker acknowledged (raising otherwise), like :class:`MqttPublisher`. ``ttl_s`` is the
    default lifetime of a document (None: documents do not expire).
    """

    def __init__(
        self, store: Store, publish: Publish, signing_key: Any, *, is_leader: Callable[[], bool],
        ttl_s: int | None = None,
    ) -> None:
        if ttl_s is not None and ttl_s <= 0:
            raise ConfigError(f"ttl_s must be > 0, got {ttl_s}")
        self.store = store
        self.publish = publish
        self._key = load_private_key(signing_key)
        self.is_leader = is_leader
        self.ttl_s = ttl_s

    # ------------------------------------------------------------------ writes
    def set(
        self, fleet: str, device: str, model: ModelRef | Mapping[str, Any] | None = None,
        shadow: ModelRef | Mapping[str, Any] | None = None, expires_in: int | None = None,
        *, if_revision: int | None = None,
    ) -> dict[str, Any]:
        """Issue the next revision of ``device``'s desired state; return the signed document.
        With ``if_revision``, only over that revision (0: no document yet), else :class:`Conflict`."""
        signed = self._issue(fleet, device, model, shadow, expires_in, over_revision=if_revision)
        if signed is None:
            raise Conflict(f"{fleet}/{device}: its desired state is no longer revision {if_revision} "
                           "(written meanwhile); read it again")
        return signed

    def _issue(
        self, fleet: str, device: str, model: ModelRef | Mapping[str, Any] | None,
        shadow: ModelRef | Mapping[str, Any] | None, expires_in: int | None, *, over_revision: int | None,
    ) -> dict[str, Any] | None:
        """Store, sign and publish the next revision. With ``over_revision``, only if the
        stored revision is still that one (None otherwise): a re-issue never overwrites a
        document written since it was read."""
        topics = Topics(fleet, device)  # ValueError on a bad id
        body = _body(model, shadow)
        lifetime = self._lifetime(expires_in)
        self._require_leader()
        with self.store.transaction(write=True) as tx:
            previous = self._lock_row(tx, fleet, device)
            self._require_leader()  # the row lock may have waited on a newer leader
            if over_revision is not None and previous != over_revision:
                log.info("%s: revision %d was stored meanwhile; not re-issuing %d", topics.desired, previous,
                         over_revision)
                return None
            signed, payload = self._write(tx, fleet, device, previous + 1, body, lifetime)
        log.info("desired state %s revision %d stored", topics.desired, signed["revision"])
        self._publish_latest(fleet, device, signed["revision"], payload)
        return signed

    def set_many(
        self, fleet: str, items: Sequence[tuple[str, DocumentModel, DocumentModel]], expires_in: int | None = None,
    ) -> list[dict[str, Any]]:
        """Issue the next revision of several devices' desired states, ``(device, model,
        shadow)`` each: one transaction (one commit) for all of them, then every document
        published before the acknowledgements are awaited. Returns the signed documents in
        the order of ``items``. :class:`PublishError` if the broker did not take them: they
        are stored all the same (its ``documents`` holds them) and the leader republishes.

        Rows are locked in device order, so two batches over the same devices cannot deadlock."""
        bodies = {}
        for device, model, shadow in items:
            Topics(fleet, device)  # ValueError on a bad id
            if device in bodies:
                raise ValueError(f"device {device!r} appears twice in one batch")
            bodies[device] = _body(model, shadow)
        if not bodies:
            return []
        lifetime = self._lifetime(expires_in)
        self._require_leader()
        written: dict[str, tuple[dict[str, Any], bytes]] = {}
        with self.store.transaction(write=True) as tx:
            previous = {device: self._lock_row(tx, fleet, device) for device in sorted(bodies)}
            self._require_leader()  # the row locks may have waited on a newer leader
            for device in sorted(bodies):
                written[device] = self._write(tx, fleet, device, previous[device] + 1, bodies[device], lifetime)
        log.info("desired states of %d device(s) of %s stored", len(written), fleet)
        signed = [written[device][0] for device, _, _ in items]
        try:
            self._publish_batch(fleet, [(device, doc["revision"], payload) for device, (doc, payload) in written.items()])
        except PublishError as exc:
            raise PublishError(str(exc), documents=signed) from exc
        return signed

    def _write(
        self, tx: Transaction, fleet: str, device: str, revision: int, body: dict[str, Any], lifetime: int | None,
    ) -> tuple[dict[str, Any], bytes]:
        """Sign revision ``revision`` of ``device``'s document and store it (its row is locked)."""
        now = int(time.time())
        doc: dict[str, Any] = {"v": 1, "fleet": fleet, "device": device, "revision": revision, "issued_at": now, **body}
        if lifetime is not None:
            doc["expires_at"] = now + int(lifetime)
        signed = sign_document(doc, self._key)
        payload = encode_document(signed)
        self._check(payload)
        tx.execute(
            "UPDATE desired_states SET revision = ?, payload = ?, updated_at = ? WHERE fleet = ? AND device_id = ?",
            (revision, payload.decode(), time.time(), fleet, device),
        )
        return signed, payload

    def _lifetime(self, expires_in: int | None) -> int | None:
        lifetime = self.ttl_s if expires_in is None else expires_in
        if lifetime is not None and lifetime <= 0:
            raise ValueError(f"expires_in must be > 0 seconds, got {lifetime}")
        return lifetime

    def _publish_batch(self, fleet: str, sent: list[tuple[str, int, bytes]]) -> None:
        """Publish documents (all sent, then all acknowledged, when the publisher can), then
        again any device whose stored revision moved on meanwhile."""
        many = getattr(self.publish, "many", None)
        if many is None:  # a plain publish callable: one at a time, each checked as set() does
            for device, revision, payload in sent:
                self._publish_latest(fleet, device, revision, payload)
            return
        try:
            many([(Topics(fleet, device).desired, payload) for device, _, payload in sent])
        except CloudError:
            raise
        except Exception as exc:  # the publish callable is outside our tree: translate it
            raise PublishError(f"publishing {len(sent)} desired state(s) of {fleet} failed: {exc}") from exc
        sent_revisions = {device: revision for device, revision, _ in sent}
        placeholders = ", ".join("?" for _ in sent)
        with self.store.transaction() as tx:  # one query: which moved on while these were sent
            rows = tx.execute(
                "SELECT fleet, device_id, revision, payload, updated_at FROM desired_states WHERE fleet = ? "
                f"AND payload IS NOT NULL AND device_id IN ({placeholders})", (fleet, *sent_revisions),
            ).fetchall()
        for latest in map(_stored, rows):
            if latest.revision > sent_revisions[latest.device]:
                log.info("%s: revision %d was stored meanwhile; publishing it", Topics(fleet, latest.device).desired,
                         latest.revision)
                self._publish_latest(fleet, latest.device, latest.revision, latest.payload)

    def republish_all(self, fleet: str | None = None) -> int:
        """Publish every stored document again (a new leader does this); return how many."""
        self._require_leader()
        count = 0
        for row in self.documents(fleet):
            self._publish_latest(row.fleet, row.device, row.revision, row.payload)
            count += 1
        return count

    def refresh_expiring(self, within_s: float, *, unexpiring: bool = False) -> list[dict[str, Any]]:
        """Re-issue (same models, next revision, full lifetime) documents expiring within ``within_s``.

        The lifetime is ``ttl_s``, else the document's own. ``unexpiring`` (needs ``ttl_s``):
        documents without an expiry get one too. A document replaced since it was read is
        left alone (its replacement is newer and carries its own expiry).
        """
        self._require_leader()
        deadline = time.time() + within_s
        renewed = []
        for row in self.documents():
            doc = row.document
            expires_at = doc.get("expires_at")
            if expires_at is None and not (unexpiring and self.ttl_s):
                continue
            if expires_at is not None and expires_at > deadline:
                continue
            lifetime = self.ttl_s or int(expires_at - doc["issued_at"])
            signed = self._issue(row.fleet, row.device, doc.get("model"), doc.get("shadow"), lifetime,
                                 over_revision=row.revision)
            if signed is not None:
                renewed.append(signed)
        return renewed

    # ------------------------------------------------------------------ reads
    def get(self, fleet: str, device: str) -> dict[str, Any] | None:
        """The device's current signed document, or None if none was ever issued."""
        row = self.stored(fleet, device)
        return None if row is None else row.document

    def stored(self, fleet: str, device: str) -> StoredDesired | None:
        with self.store.transaction() as tx:
            found = tx.execute(
                "SELECT fleet, device_id, revision, payload, updated_at FROM desired_states "
                "WHERE fleet = ? AND device_id = ? AND payload IS NOT NULL",
                (fleet, device),
            ).fetchone()
        return None if found is None else _stored(found)

    def documents(self, fleet: str | None = None) -> Iterator[StoredDesired]:
        sql = "SELECT fleet, device_id, revision, payload, updated_at FROM desired_states WHERE payload IS NOT NULL"
        params: tuple[Any, ...] = ()
        if fleet is not None:
            sql, params = sql + " AND fleet = ?", (fleet,)
        with self.store.transaction() as tx:
            rows = tx.execute(sql + " ORDER BY fleet, device_id", params).fetchall()
        return (_stored(r) for r in rows)

    # ------------------------------------------------------------------ internals
    def _require_leader(self) -> None:
        if not self.is_leader():
            raise NotLeader("this coordinator replica is not the leader; desired states are written by the leader")

    @staticmethod
    def _lock_row(tx: Transaction, fleet: str, device: str) -> int:
        """Take the device's revision row (created at 0 on first use); return its revision."""
        tx.execute(
            "INSERT INTO desired_states (fleet, device_id, revision, payload, updated_at) VALUES (?, ?, 0, NULL, ?) "
            "ON CONFLICT DO NOTHING",
            (fleet, device, time.time()),
        )
        row = tx.execute(
            f"SELECT revision FROM desired_states WHERE fleet = ? AND device_id = ?{tx.for_update}", (fleet, device)
        ).fetchone()
        return int(row[0])

    @staticmethod
    def _check(payload: bytes) -> None:
        if len(payload) > MAX_DOCUMENT_BYTES:
            raise ValueError(f"desired state is {len(payload)} bytes; agents accept at most {MAX_DOCUMENT_BYTES}")
        DesiredState.model_validate_json(payload)  # our own output: a failure here is a bug

    def _publish_latest(self, fleet: str, device: str, revision: int, payload: bytes) -> None:
        """Publish, then publish again while the store holds a newer revision than the one sent."""
        topic = Topics(fleet, device).desired
        while True:
            try:
                self.publish(topic, payload)
            except CloudError:
                raise
            except Exception as exc:  # the publish callable is outside our tree: translate it
                raise PublishError(f"publishing {topic} revision {revision} failed: {exc}") from exc
            latest = self.stored(fleet, device)
            if latest is None or latest.revision <= revision:
                return
            log.info("%s: revision %d was stored meanwhile; publishing it", topic, latest.revision)
            revision, payload = latest.revision, latest.payload


def _body(model: DocumentModel, shadow: DocumentModel) -> dict[str, Any]:
    return {"model": _model_dict(model, "model"), "shadow": _model_dict(shadow, "shadow")}


class ExpiryRefresher:
    """The leader's expiry job: documents are re-issued before they expire.

    On its own thread (``edgeml-desired-expiry``), once at start and then every
    ``interval_s`` (default ``min(ttl_s / 6, 60)``), while ``writer.is_leader()``:
    :meth:`DesiredStateWriter.refresh_expiring` with ``margin_s`` (default ``ttl_s / 3``)
    and ``unexpiring=True``, so every document carries an expiry and is replaced (same
    models, next revision, full lifetime) with at least ``margin_s - interval_s`` left.
    A new leader's first pass also re-issues whatever expired while nobody led.
    Failures (broker, store, leadership lost) are logged and retried on the next pass;
    after a failed publish the next pass first republishes every stored document, so
    the broker's retained copies catch up with the store.
    """

    def __init__(self, writer: DesiredStateWriter, *, margin_s: float | None = None,
                 interval_s: float | None = None) -> None:
        if writer.ttl_s is None:
            raise ConfigError("expiry refresh needs a writer with ttl_s")
        self.writer = writer
        self.margin_s = writer.ttl_s / 3 if margin_s is None else margin_s
        self.interval_s = min(writer.ttl_s / 6, 60.0) if interval_s is None else interval_s
        if not 0 < self.interval_s < self.margin_s < writer.ttl_s:
            raise ConfigError(f"need 0 < interval_s ({self.interval_s}) < margin_s ({self.margin_s}) "
                              f"< ttl_s ({writer.ttl_s})")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._republish = False  # expiry thread only

    def start(self) -> ExpiryRefresher:
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="edgeml-desired-expiry", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.error("desired-state expiry refresh did not stop within %.1fs", timeout)
            self._thread = None

    # ------------------------------------------------------------------ expiry thread
    def _loop(self) -> None:
        while True:
            if self.writer.is_leader():
                self._pass()
            if self._stop.wait(self.interval_s):
                return

    def _pass(self) -> None:
        try:
            if self._republish:
                self.writer.republish_all()
                self._republish = False
            renewed = self.writer.refresh_expiring(self.margin_s, unexpiring=True)
        except NotLeader:
            return  # the next leader refreshes
        except CloudError as exc:  # PublishError, StoreError: transient
            self._republish = self._republish or isinstance(exc, PublishError)
            log.warning("re-issuing expiring desired states failed (retrying in %.1fs): %s", self.interval_s, exc)
            return
        if renewed:
            log.info("re-issued %d expiring desired state(s)", len(renewed))


def _stored(row: Any) -> StoredDesired:
    payload = row[3].encode() if isinstance(row[3], str) else bytes(row[3])
    return StoredDesired(row[0], row[1], int(row[2]), payload, float(row[4]))


class MqttPublisher:
    """A small synchronous MQTT publisher for desired states: QoS 1, retained, waits for PUBACK.

    ``publisher(topic, payload)`` returns once the broker acknowledged, or raises
    :class:`PublishError`. After a failure the connection is dropped with whatever paho
    still had queued, so a document that timed out is never delivered late (it could
    overwrite a newer retained one). MQTT 3.1.1, clean session, a unique client id by
    default: replicas' publishers never take over each other's sessions.
    """

    def __init__(self, broker_url: str, *, client_id: str | None = None, timeout_s: float = 10.0,
                 tls: TLSFiles | None = None) -> None:
        self.tls = tls
        try:
            self.broker = parse_broker_url(broker_url)
        except ValueError as exc:
            raise ConfigError(f"broker_url: {exc}") from exc
        self.client_id = client_id or f"edgeml-desired-{uuid.uuid4().hex[:12]}"
        self.timeout_s = timeout_s
        self._lock = threading.Lock()
        self._connected = threading.Event()
        self._client: mqtt.Client | None = None

    def connect(self) -> MqttPublisher:
        with self._lock:
            self._ensure_client()
        return self

    def __call__(self, topic: str, payload: bytes) -> None:
        self.many([(topic, payload)])

    def many(self, messages: Sequence[tuple[str, bytes]]) -> None:
        """Publish every ``(topic, payload)`` (QoS 1, retained), then wait for all the
        acknowledgements: one round trip's wait for the batch instead of one per document.
        :class:`PublishError` as for one; after a failure nothing queued is delivered late."""
        with self._lock:
            client = self._ensure_client()
            if not self._connected.wait(self.timeout_s):
                self._reset()
                raise PublishError(f"not connected to {self.broker.host}:{self.broker.port} within {self.timeout_s}s")
            infos = [(topic, client.publish(topic, payload, qos=1, retain=True)) for topic, payload in messages]
            deadline = time.monotonic() + self.timeout_s + 0.01 * len(infos)
            for topic, info in infos:
                try:
                    info.wait_for_publish(max(0.0, deadline - time.monotonic()))
                except (RuntimeError, ValueError) as exc:
                    self._reset()
                    raise PublishError(f"publish to {topic} failed: {exc}") from exc
                if not info.is_published():
                    self._reset()
                    raise PublishError(f"no PUBACK for {topic} within {self.timeout_s}s")

    def close(self) -> None:
        with self._lock:
            self._reset()

    def __enter__(self) -> MqttPublisher:
        return self.connect()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _ensure_client(self) -> mqtt.Client:
        if self._client is None:
            client = mqtt.Client(CallbackAPIVersion.VERSION2, self.client_id, clean_session=True, protocol=mqtt.MQTTv311)
            if self.broker.username:
                client.username_pw_set(self.broker.username, self.broker.password)
            if self.broker.tls:
                (self.tls or TLSFiles()).apply(client)
            client.reconnect_delay_set(0.2, 5)
            client.on_connect = self._on_connect
            client.on_disconnect = lambda *a: self._connected.clear()
            client.connect_async(self.broker.host, self.broker.port, 30)
            client.loop_start()
            self._client = client
        return self._client

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if reason.is_failure:
            log.warning("broker %s:%d refused the publisher: %s", self.broker.host, self.broker.port, reason)
            return
        self._connected.set()

    def _reset(self) -> None:
        client, self._client = self._client, None
        self._connected.clear()
        if client is not None:
            client.disconnect()
            client.loop_stop()
