"""The store interface, shared by the SQLite and PostgreSQL backends.

A backend supplies connections and a handful of dialect hooks; the SQL and the
counter logic live here once. Every public method runs in its own transaction;
``with store.transaction(write=True) as tx:`` groups several writes in one (the
ingestor commits a whole flush at once).

Counters (per fleet, device, stream; seqs start at 1)
    ``records`` (distinct seqs stored) and ``max_seq`` give ``gaps = max_seq - records``
    without scanning. ``max_contiguous_seq`` (mc) keeps the invariant "1..mc stored,
    mc+1 missing". After an insert: if ``records == max_seq`` there is no hole and
    mc = max_seq (the in-order case, no query); else if the batch carried mc+1, one
    index scan from mc+1 finds the end of the run now starting there; else mc stays.
    Each seq is scanned at most once over the stream's life, so out-of-order and
    duplicated batches cost O(log n) per record, amortised.

Concurrency
    A write transaction first takes the counter rows of every stream it touches, in
    sorted order (SQLite: ``BEGIN IMMEDIATE`` serialises writers; PostgreSQL: upsert +
    ``SELECT ... FOR UPDATE``), so two writers of the same stream run one after the
    other and the second sees the first's rows: counters stay exact with any number of
    coordinator replicas on one database. Device rows and error counters are then
    written in sorted order too, so two replicas cannot deadlock.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import orjson

from .._exceptions import NotFound, StoreError
from ._migrations import Migrations
from ._models import (
    Device,
    InsertResult,
    PoisonRecord,
    StreamCounters,
    TelemetryBatchIn,
    TelemetryRow,
)

#: Poison messages kept in ``poison_messages`` (older ones are deleted).
DEFAULT_KEEP_POISON = 100

StreamKey = tuple[str, str, str]

_DEVICE_COLUMNS = (
    "fleet, device_id, tags, hardware_profile, registered_at, last_seen, online, status, "
    "reported_state, pre_registered"
)


def _json_in(value: Any) -> str | None:
    return None if value is None else orjson.dumps(value).decode()


def _json_out(value: Any) -> Any:
    return orjson.loads(value) if isinstance(value, str | bytes) else value


def _device(row: Sequence[Any]) -> Device:
    return Device(
        fleet=row[0], device_id=row[1], tags=_json_out(row[2]) or {}, hardware_profile=row[3],
        registered_at=row[4], last_seen=row[5], online=bool(row[6]), status=_json_out(row[7]),
        reported_state=_json_out(row[8]), pre_registered=bool(row[9]),
    )


class Transaction(ABC):
    """One open transaction. Obtain it from :meth:`Store.transaction`."""

    #: Appended to the SELECT that takes a counter row.
    for_update = ""
    #: The two-argument maximum function of the dialect.
    greatest = "max"

    def __init__(self, cursor: Any) -> None:
        self.cursor = cursor

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        """Run one statement written with ``?`` placeholders; return the cursor."""
        self.cursor.execute(sql, params)
        return self.cursor

    @abstractmethod
    def _insert_rows(self, key: StreamKey, records: Sequence[Mapping[str, Any]], received_at: float) -> int:
        """Insert records, skipping seqs already stored; return how many were inserted."""

    # ------------------------------------------------------------------ telemetry
    def insert_telemetry(
        self, fleet: str, device: str, stream: str, records: Sequence[Mapping[str, Any]],
        *, received_at: float | None = None,
    ) -> InsertResult:
        result = self.insert_many([TelemetryBatchIn(fleet, device, stream, records)], received_at=received_at)
        return result.get((fleet, device, stream), InsertResult(0, 0))

    def insert_many(
        self, batches: Iterable[TelemetryBatchIn], *, received_at: float | None = None,
    ) -> dict[StreamKey, InsertResult]:
        """Insert every batch idempotently and update the counters; one result per stream."""
        now = time.time() if received_at is None else received_at
        groups: dict[StreamKey, list[Mapping[str, Any]]] = {}
        for b in batches:
            if b.records:
                groups.setdefault((b.fleet, b.device, b.stream), []).extend(b.records)
        keys = sorted(groups)
        locked = {key: self._lock_counters(key, now) for key in keys}  # sorted: no deadlock
        return {key: self._insert_stream(key, groups[key], locked[key], now) for key in keys}

    def _lock_counters(self, key: StreamKey, now: float) -> tuple[int, int, int, int]:
        self.execute(
            "INSERT INTO ingest_counters (fleet, device_id, stream, first_seen, last_seen) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT DO NOTHING",
            (*key, now, now),
        )
        return self.execute(
            "SELECT records, max_seq, max_contiguous_seq, duplicates FROM ingest_counters "
            f"WHERE fleet = ? AND device_id = ? AND stream = ?{self.for_update}",
            key,
        ).fetchone()

    def _insert_stream(
        self, key: StreamKey, records: list[Mapping[str, Any]], counters: tuple[int, int, int, int], now: float,
    ) -> InsertResult:
        seqs = {r["seq"] for r in records}
        if min(seqs) < 1:
            raise ValueError(f"seq must be >= 1 in {key}")
        inserted = self._insert_rows(key, records, now)
        stored, max_seq, contiguous, duplicates = counters
        stored += inserted
        duplicates += len(records) - inserted
        max_seq = max(max_seq, max(seqs))
        if stored == max_seq:
            contiguous = max_seq
        elif contiguous + 1 in seqs:
            contiguous = self._run_end(key, contiguous)
        self.execute(
            "UPDATE ingest_counters SET records = ?, max_seq = ?, max_contiguous_seq = ?, gaps = ?, duplicates = ?, "
            "last_seen = ? WHERE fleet = ? AND device_id = ? AND stream = ?",
            (stored, max_seq, contiguous, max_seq - stored, duplicates, now, *key),
        )
        return InsertResult(inserted, len(records) - inserted)

    def _run_end(self, key: StreamKey, contiguous: int) -> int:
        """The last seq of the run of stored seqs that starts at ``contiguous + 1``."""
        row = self.execute(
            "SELECT t.seq FROM telemetry t WHERE t.fleet = ? AND t.device_id = ? AND t.stream = ? AND t.seq > ? "
            "AND NOT EXISTS (SELECT 1 FROM telemetry u WHERE u.fleet = t.fleet AND u.device_id = t.device_id "
            "AND u.stream = t.stream AND u.seq = t.seq + 1) ORDER BY t.seq LIMIT 1",
            (*key, contiguous),
        ).fetchone()
        return int(row[0])

    def query_telemetry(
        self, fleet: str, device: str, *, kind: str | None = None, since: float | None = None,
        stream: str | None = None, limit: int = 1000,
    ) -> list[TelemetryRow]:
        sql = "SELECT fleet, device_id, stream, seq, ts, kind, body, received_at FROM telemetry WHERE fleet = ? AND device_id = ?"
        params: list[Any] = [fleet, device]
        for column, value, op in (("kind", kind, "="), ("ts", since, ">="), ("stream", stream, "=")):
            if value is not None:
                sql += f" AND {column} {op} ?"
                params.append(value)
        sql += " ORDER BY ts, stream, seq LIMIT ?"
        rows = self.execute(sql, (*params, limit)).fetchall()
        return [TelemetryRow(r[0], r[1], r[2], r[3], r[4], r[5], _json_out(r[6]), r[7]) for r in rows]

    def device_counters(self, fleet: str, device: str) -> dict[str, StreamCounters]:
        rows = self.execute(
            "SELECT stream, records, max_seq, max_contiguous_seq, gaps, duplicates, first_seen, last_seen "
            "FROM ingest_counters WHERE fleet = ? AND device_id = ? ORDER BY first_seen",
            (fleet, device),
        ).fetchall()
        return {r[0]: StreamCounters(*r) for r in rows}

    # ------------------------------------------------------------------ devices
    def get_device(self, fleet: str, device: str) -> Device:
        row = self.execute(
            f"SELECT {_DEVICE_COLUMNS} FROM devices WHERE fleet = ? AND device_id = ?", (fleet, device)
        ).fetchone()
        if row is None:
            raise NotFound(f"no device {fleet}/{device}")
        return _device(row)

    def find_device(self, fleet: str, device: str) -> Device | None:
        try:
            return self.get_device(fleet, device)
        except NotFound:
            return None

    def list_devices(self, fleet: str | None = None) -> list[Device]:
        sql = f"SELECT {_DEVICE_COLUMNS} FROM devices"
        params: tuple[Any, ...] = ()
        if fleet is not None:
            sql, params = sql + " WHERE fleet = ?", (fleet,)
        return [_device(r) for r in self.execute(sql + " ORDER BY fleet, device_id", params).fetchall()]

    def upsert_device(
        self, fleet: str, device: str, *, tags: Mapping[str, Any] | None = None,
        hardware_profile: str | None = None, pre_registered: bool | None = None,
    ) -> Device:
        """Register a device, or update the fields given (None leaves a field as it is)."""
        self.execute(
            "INSERT INTO devices (fleet, device_id, tags, hardware_profile, registered_at, pre_registered) "
            "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (fleet, device_id) DO UPDATE SET "
            "tags = COALESCE(?, devices.tags), hardware_profile = COALESCE(?, devices.hardware_profile), "
            "pre_registered = COALESCE(?, devices.pre_registered)",
            (fleet, device, _json_in(tags or {}), hardware_profile, time.time(), bool(pre_registered),
             _json_in(tags), hardware_profile, pre_registered),
        )
        return self.get_device(fleet, device)

    def touch_device(self, fleet: str, device: str, seen_at: float) -> None:
        """Mark a device seen at ``seen_at``; registers it on first contact."""
        self.execute(
            "INSERT INTO devices (fleet, device_id, registered_at, last_seen) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (fleet, device_id) DO UPDATE SET "
            f"last_seen = {self.greatest}(COALESCE(devices.last_seen, 0), excluded.last_seen)",
            (fleet, device, seen_at, seen_at),
        )

    def set_status(self, fleet: str, device: str, status: Mapping[str, Any], *, seen_at: float | None = None) -> None:
        """Store the device's last ``Status`` document; ``online`` follows its ``state``."""
        seen_at = time.time() if seen_at is None else seen_at
        self.touch_device(fleet, device, seen_at)
        self.execute(
            "UPDATE devices SET status = ?, online = ? WHERE fleet = ? AND device_id = ?",
            (_json_in(status), status.get("state") == "online", fleet, device),
        )

    def set_reported_state(self, fleet: str, device: str, state: Mapping[str, Any], *, seen_at: float | None = None) -> None:
        self.touch_device(fleet, device, time.time() if seen_at is None else seen_at)
        self.execute(
            "UPDATE devices SET reported_state = ? WHERE fleet = ? AND device_id = ?",
            (_json_in(state), fleet, device),
        )

    # ------------------------------------------------------------------ ingest errors
    def count_error(
        self, reason: str, topic: str, size: int, *, detail: str = "", ts: float | None = None,
        keep: int = DEFAULT_KEEP_POISON,
    ) -> None:
        """Count one rejected message by ``reason`` and keep it among the last ``keep``."""
        ts = time.time() if ts is None else ts
        self.execute(
            "INSERT INTO ingest_errors (reason, count, last_ts) VALUES (?, 1, ?) ON CONFLICT (reason) DO UPDATE "
            "SET count = ingest_errors.count + 1, last_ts = excluded.last_ts",
            (reason, ts),
        )
        self.execute(
            "INSERT INTO poison_messages (ts, topic, reason, detail, size) VALUES (?, ?, ?, ?, ?)",
            (ts, topic, reason, detail[:1000], size),
        )
        self.execute(
            "DELETE FROM poison_messages WHERE id <= (SELECT MAX(id) FROM poison_messages) - ?", (keep,)
        )

    def error_counts(self) -> dict[str, int]:
        return dict(self.execute("SELECT reason, count FROM ingest_errors ORDER BY reason").fetchall())

    def recent_errors(self, limit: int = DEFAULT_KEEP_POISON) -> list[PoisonRecord]:
        rows = self.execute(
            "SELECT ts, topic, reason, detail, size FROM poison_messages ORDER BY id DESC LIMIT ?", (limit,)
        ).fetchall()
        return [PoisonRecord(*r) for r in rows]


class _Pool:
    """A few connections, created on demand, shared by threads."""

    def __init__(self, connect: Callable[[], Any], size: int, broken_by: tuple[type[BaseException], ...]) -> None:
        self._connect = connect
        self._broken_by = broken_by
        self._idle: queue.LifoQueue[Any] = queue.LifoQueue()
        self._slots = threading.BoundedSemaphore(size)
        self._all: list[Any] = []
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def connection(self) -> Iterator[Any]:
        self._slots.acquire()
        try:
            try:
                conn = self._idle.get_nowait()
            except queue.Empty:
                conn = self._connect()
                with self._lock:
                    self._all.append(conn)
            try:
                yield conn
            except self._broken_by:
                self.discard(conn)  # it may be unusable (server gone); the next call connects again
                raise
            except BaseException:
                self._idle.put(conn)  # rolled back, still good
                raise
            self._idle.put(conn)
        finally:
            self._slots.release()

    def discard(self, conn: Any) -> None:
        with self._lock:
            if conn in self._all:
                self._all.remove(conn)
        with contextlib.suppress(Exception):
            conn.close()

    def close(self) -> None:
        with self._lock:
            conns, self._all = self._all, []
        for conn in conns:
            with contextlib.suppress(Exception):
                conn.close()


class Store(ABC):
    """Telemetry, devices and ingestion counters behind one interface.

    Every method runs in its own transaction; use :meth:`transaction` to group writes.
    Thread-safe: each thread borrows a connection from a small pool.
    """

    dialect: str
    #: Errors of the driver, translated to :class:`StoreError` at this boundary.
    driver_errors: tuple[type[BaseException], ...] = ()

    def __init__(self, url: str, pool_size: int = 4) -> None:
        self.url = url
        self._pool = _Pool(self._connect, pool_size, self.driver_errors)
        self.migrations = Migrations(self)

    # ------------------------------------------------------------------ backend hooks
    @abstractmethod
    def _connect(self) -> Any: ...

    @abstractmethod
    def _begin(self, conn: Any, write: bool) -> Transaction: ...

    @abstractmethod
    def _end(self, conn: Any, commit: bool) -> None: ...

    def _translate(self, exc: BaseException) -> StoreError:
        return StoreError(f"{self.dialect} store: {exc}")

    # ------------------------------------------------------------------ lifecycle
    @contextlib.contextmanager
    def transaction(self, write: bool = False) -> Iterator[Transaction]:
        """A transaction, committed on normal exit, rolled back on an exception."""
        try:
            with self._pool.connection() as conn:
                tx = self._begin(conn, write)
                try:
                    yield tx
                except BaseException:
                    with contextlib.suppress(*self.driver_errors):
                        self._end(conn, commit=False)
                    raise
                self._end(conn, commit=True)
        except self.driver_errors as exc:
            raise self._translate(exc) from exc

    def close(self) -> None:
        self._pool.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ one call, one transaction
    def insert_telemetry(
        self, fleet: str, device: str, stream: str, records: Sequence[Mapping[str, Any]],
        *, received_at: float | None = None,
    ) -> InsertResult:
        """Insert records idempotently by (fleet, device, stream, seq); update the counters."""
        with self.transaction(write=True) as tx:
            return tx.insert_telemetry(fleet, device, stream, records, received_at=received_at)

    def insert_many(self, batches: Iterable[TelemetryBatchIn], *, received_at: float | None = None) -> dict[StreamKey, InsertResult]:
        with self.transaction(write=True) as tx:
            return tx.insert_many(batches, received_at=received_at)

    def query_telemetry(self, fleet: str, device: str, **filters: Any) -> list[TelemetryRow]:
        """Records of a device by time; filters: kind, since (Unix s), stream, limit (1000)."""
        with self.transaction() as tx:
            return tx.query_telemetry(fleet, device, **filters)

    def device_counters(self, fleet: str, device: str) -> dict[str, StreamCounters]:
        """Ingestion counters of a device, by stream (oldest stream first)."""
        with self.transaction() as tx:
            return tx.device_counters(fleet, device)

    def upsert_device(self, fleet: str, device: str, **fields: Any) -> Device:
        """Register or update a device: tags, hardware_profile, pre_registered."""
        with self.transaction(write=True) as tx:
            return tx.upsert_device(fleet, device, **fields)

    def get_device(self, fleet: str, device: str) -> Device:
        """The device, or :class:`NotFound`."""
        with self.transaction() as tx:
            return tx.get_device(fleet, device)

    def list_devices(self, fleet: str | None = None) -> list[Device]:
        with self.transaction() as tx:
            return tx.list_devices(fleet)

    def set_status(self, fleet: str, device: str, status: Mapping[str, Any], *, seen_at: float | None = None) -> None:
        with self.transaction(write=True) as tx:
            tx.set_status(fleet, device, status, seen_at=seen_at)

    def count_error(self, reason: str, topic: str, size: int, **extra: Any) -> None:
        with self.transaction(write=True) as tx:
            tx.count_error(reason, topic, size, **extra)

    def error_counts(self) -> dict[str, int]:
        """Rejected messages by reason, since the store was created."""
        with self.transaction() as tx:
            return tx.error_counts()

    def recent_errors(self, limit: int = DEFAULT_KEEP_POISON) -> list[PoisonRecord]:
        """The most recent rejected messages, newest first."""
        with self.transaction() as tx:
            return tx.recent_errors(limit)
