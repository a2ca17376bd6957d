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

from .._exceptions import Conflict, NotFound, StoreError, Unstorable
from .._text import has_nul
from ._migrations import Migrations
from ._models import (
    Device,
    DeviceTotals,
    InsertResult,
    ModelRecord,
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


@contextlib.contextmanager
def unstorable_text(dialect: str) -> Iterator[None]:
    """Binding a string that is not UTF-8 (a lone surrogate) is bad input: Unstorable."""
    try:
        yield
    except UnicodeEncodeError as exc:
        raise Unstorable(f"{dialect} store: a string is not valid UTF-8 ({exc.reason})") from exc


def _json_in(value: Any) -> str | None:
    if value is None:
        return None
    try:
        text = orjson.dumps(value).decode()
    except orjson.JSONEncodeError as exc:  # a lone surrogate, a value JSON cannot hold
        raise Unstorable(f"not storable as JSON: {exc}") from exc
    if "\\u0000" in text and has_nul(value):  # PostgreSQL's jsonb refuses it: refused on both stores
        raise Unstorable("a string holds a NUL character (\\u0000)")
    return text


def _json_out(value: Any) -> Any:
    return orjson.loads(value) if isinstance(value, str | bytes) else value


_MODEL_COLUMNS = (
    "name, version, format, runtime, quantization, size, sha256, inputs, outputs, metrics, params, metadata, "
    "parent_name, parent_version, dataset_hash, signature_key_id, created_at"
)


def _model(row: Sequence[Any], aliases: Iterable[str] = ()) -> ModelRecord:
    return ModelRecord(
        name=row[0], version=row[1], format=row[2], runtime=row[3], quantization=row[4], size=int(row[5]),
        sha256=row[6], inputs=_json_out(row[7]), outputs=_json_out(row[8]), metrics=_json_out(row[9]) or {},
        params=_json_out(row[10]) or {}, metadata=_json_out(row[11]) or {},
        parent=f"{row[12]}@{row[13]}" if row[12] is not None else None, dataset_hash=row[14],
        signature_key_id=row[15], created_at=row[16], aliases=tuple(sorted(aliases)),
    )


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
    #: The backend's name, for messages.
    dialect = "sqlite"

    def __init__(self, cursor: Any) -> None:
        self.cursor = cursor

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        """Run one statement written with ``?`` placeholders; return the cursor."""
        with unstorable_text(self.dialect):
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
        seqs = {key: {r["seq"] for r in groups[key]} for key in keys}
        for key in keys:
            if min(seqs[key]) < 1:
                raise ValueError(f"seq must be >= 1 in {key}")
        if not keys:
            return {}
        locked = self._lock_all(keys, now)  # sorted: no deadlock
        inserted = self._insert_all(keys, groups, now)
        results: dict[StreamKey, InsertResult] = {}
        updates: list[tuple[StreamKey, tuple[int, int, int, int, int]]] = []
        for key in keys:
            stored, max_seq, contiguous, duplicates = locked[key]
            n, received = inserted.get(key, 0), len(groups[key])
            stored += n
            duplicates += received - n
            max_seq = max(max_seq, max(seqs[key]))
            if stored == max_seq:
                contiguous = max_seq
            elif contiguous + 1 in seqs[key]:
                contiguous = self._run_end(key, contiguous)
            updates.append((key, (stored, max_seq, contiguous, max_seq - stored, duplicates)))
            results[key] = InsertResult(n, received - n)
        self._update_counters(updates, now)
        return results

    # Backend hooks of insert_many; a backend may batch them across streams.
    def _lock_all(self, keys: Sequence[StreamKey], now: float) -> dict[StreamKey, tuple[int, int, int, int]]:
        """Create and lock the counter rows of ``keys`` (sorted), in order; their values."""
        return {key: self._lock_counters(key, now) for key in keys}

    def _insert_all(
        self, keys: Sequence[StreamKey], groups: Mapping[StreamKey, Sequence[Mapping[str, Any]]], now: float,
    ) -> dict[StreamKey, int]:
        """Insert every stream's records, skipping stored seqs; rows inserted per stream."""
        return {key: self._insert_rows(key, groups[key], now) for key in keys}

    def _update_counters(self, updates: Sequence[tuple[StreamKey, tuple[int, int, int, int, int]]], now: float) -> None:
        """Write ``(records, max_seq, max_contiguous_seq, gaps, duplicates)`` of each locked stream."""
        for key, values in updates:
            self.execute(
                "UPDATE ingest_counters SET records = ?, max_seq = ?, max_contiguous_seq = ?, gaps = ?, "
                "duplicates = ?, last_seen = ? WHERE fleet = ? AND device_id = ? AND stream = ?",
                (*values, now, *key),
            )

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

    def latest_telemetry(
        self, *, kind: str | None = None, fleet: str | None = None, since: float | None = None, limit: int = 100,
    ) -> list[TelemetryRow]:
        """Records across the fleet (or every fleet), newest first: ``kind="event"`` gives the event log."""
        sql = "SELECT fleet, device_id, stream, seq, ts, kind, body, received_at FROM telemetry WHERE 1 = 1"
        params: list[Any] = []
        for column, value, op in (("kind", kind, "="), ("fleet", fleet, "="), ("ts", since, ">=")):
            if value is not None:
                sql += f" AND {column} {op} ?"
                params.append(value)
        rows = self.execute(sql + " ORDER BY ts DESC, seq DESC LIMIT ?", (*params, limit)).fetchall()
        return [TelemetryRow(r[0], r[1], r[2], r[3], r[4], r[5], _json_out(r[6]), r[7]) for r in rows]

    def device_totals(self, fleet: str | None = None, device: str | None = None) -> dict[tuple[str, str], DeviceTotals]:
        """Counters of every device (or of ``device``), keyed by (fleet, device): records, gaps and duplicates
        summed over its streams; ``max_contiguous_seq`` that of its current stream (written to
        last; the newer on a tie): each stream numbers from 1, so a sum would mean nothing."""
        sql = (
            "SELECT fleet, device_id, SUM(records), (SELECT s.max_contiguous_seq FROM ingest_counters AS s "
            "WHERE s.fleet = c.fleet AND s.device_id = c.device_id ORDER BY s.last_seen DESC, s.first_seen DESC "
            "LIMIT 1), SUM(gaps), SUM(duplicates), MAX(last_seen) FROM ingest_counters AS c"
        )
        where = [(column, value) for column, value in (("c.fleet", fleet), ("c.device_id", device)) if value is not None]
        if where:
            sql += " WHERE " + " AND ".join(f"{column} = ?" for column, _ in where)
        rows = self.execute(sql + " GROUP BY c.fleet, c.device_id", tuple(v for _, v in where)).fetchall()
        return {(r[0], r[1]): DeviceTotals(int(r[2]), int(r[3]), int(r[4]), int(r[5]), r[6]) for r in rows}

    def ingest_summary(self, *, lag_window_s: float = 300.0, now: float | None = None) -> dict[str, float]:
        """Fleet-wide numbers for monitoring: records, duplicates, gaps, streams, devices,
        devices online, models, and ``lag_s``: the largest ``received_at - ts`` of the
        newest record of each stream written to in the last ``lag_window_s`` (device clocks
        included, so a skewed clock shows as lag)."""
        now = time.time() if now is None else now
        records, duplicates, gaps, streams = self.execute(
            "SELECT COALESCE(SUM(records), 0), COALESCE(SUM(duplicates), 0), COALESCE(SUM(gaps), 0), COUNT(*) "
            "FROM ingest_counters"
        ).fetchone()
        devices, online = self.execute(
            "SELECT COUNT(*), COALESCE(SUM(CASE WHEN online THEN 1 ELSE 0 END), 0) FROM devices"
        ).fetchone()
        (lag,) = self.execute(
            "SELECT MAX(t.received_at - t.ts) FROM ingest_counters c JOIN telemetry t ON t.fleet = c.fleet "
            "AND t.device_id = c.device_id AND t.stream = c.stream AND t.seq = c.max_seq WHERE c.last_seen >= ?",
            (now - lag_window_s,),
        ).fetchone()
        (models,) = self.execute("SELECT COUNT(*) FROM models").fetchone()
        return {
            "records": int(records), "duplicates": int(duplicates), "gaps": int(gaps), "streams": int(streams),
            "devices": int(devices), "online": int(online), "models": int(models), "lag_s": max(0.0, float(lag or 0.0)),
        }

    # ------------------------------------------------------------------ models
    def insert_model(self, model: ModelRecord) -> ModelRecord:
        """Register a model version; :class:`Conflict` if ``name@version`` exists."""
        parent_name, _, parent_version = (model.parent or "").partition("@")
        cursor = self.execute(
            f"INSERT INTO models ({_MODEL_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT DO NOTHING",
            (model.name, model.version, model.format, model.runtime, model.quantization, model.size, model.sha256,
             _json_in(model.inputs), _json_in(model.outputs), _json_in(model.metrics), _json_in(model.params),
             _json_in(model.metadata), parent_name or None, parent_version or None, model.dataset_hash,
             model.signature_key_id, model.created_at),
        )
        if cursor.rowcount == 0:
            raise Conflict(f"model {model.ref} is already registered; register a new version")
        return self.get_model(model.name, model.version)

    def find_model(self, name: str, version: str) -> ModelRecord | None:
        row = self.execute(
            f"SELECT {_MODEL_COLUMNS} FROM models WHERE name = ? AND version = ?", (name, version)
        ).fetchone()
        if row is None:
            return None
        aliases = self.execute(
            "SELECT alias FROM model_aliases WHERE name = ? AND version = ?", (name, version)
        ).fetchall()
        return _model(row, (a[0] for a in aliases))

    def get_model(self, name: str, version: str) -> ModelRecord:
        """The model version, or :class:`NotFound`."""
        model = self.find_model(name, version)
        if model is None:
            raise NotFound(f"no model {name}@{version}")
        return model

    def list_models(self, name: str | None = None) -> list[ModelRecord]:
        """Registered versions, by name then registration time."""
        where, params = (" WHERE name = ?", (name,)) if name is not None else ("", ())
        rows = self.execute(
            f"SELECT {_MODEL_COLUMNS} FROM models{where} ORDER BY name, created_at, version", params
        ).fetchall()
        aliases: dict[tuple[str, str], list[str]] = {}
        for n, alias, version in self.execute(f"SELECT name, alias, version FROM model_aliases{where}", params):
            aliases.setdefault((n, version), []).append(alias)
        return [_model(r, aliases.get((r[0], r[1]), ())) for r in rows]

    def set_alias(self, name: str, alias: str, version: str, *, now: float | None = None) -> str | None:
        """Point ``name@alias`` at ``version`` (create or move); return the version it pointed at before."""
        if self.find_model(name, version) is None:
            raise NotFound(f"no model {name}@{version}")
        row = self.execute(
            f"SELECT version FROM model_aliases WHERE name = ? AND alias = ?{self.for_update}", (name, alias)
        ).fetchone()
        self.execute(
            "INSERT INTO model_aliases (name, alias, version, updated_at) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (name, alias) DO UPDATE SET version = excluded.version, updated_at = excluded.updated_at",
            (name, alias, version, time.time() if now is None else now),
        )
        return row[0] if row else None

    def model_aliases(self, name: str) -> dict[str, str]:
        """``{alias: version}`` of a model name."""
        rows = self.execute("SELECT alias, version FROM model_aliases WHERE name = ? ORDER BY alias", (name,))
        return dict(rows.fetchall())

    def resolve_alias(self, name: str, alias: str) -> ModelRecord:
        """The version ``name@alias`` points at, or :class:`NotFound`."""
        row = self.execute("SELECT version FROM model_aliases WHERE name = ? AND alias = ?", (name, alias)).fetchone()
        if row is None:
            raise NotFound(f"no alias {name}@{alias}")
        return self.get_model(name, row[0])

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
        self._closed = False

    @contextlib.contextmanager
    def connection(self) -> Iterator[Any]:
        self._slots.acquire()
        try:
            if self._closed:
                raise StoreError("the store is closed")
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
                self._release(conn)  # rolled back, still good
                raise
            self._release(conn)
        finally:
            self._slots.release()

    def _release(self, conn: Any) -> None:
        if self._closed:  # closed while this thread used it: close it now, not under its feet
            self.discard(conn)
        else:
            self._idle.put(conn)

    def discard(self, conn: Any) -> None:
        with self._lock:
            if conn in self._all:
                self._all.remove(conn)
        with contextlib.suppress(Exception):
            conn.close()

    def close(self) -> None:
        """Close the idle connections now and those in use when their transaction ends
        (closing a connection another thread is using can crash the driver)."""
        self._closed = True
        while True:
            try:
                conn = self._idle.get_nowait()
            except queue.Empty:
                break
            self.discard(conn)


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

    def latest_telemetry(self, **filters: Any) -> list[TelemetryRow]:
        """Records across the fleet, newest first; filters: kind, fleet, since (Unix s), limit (100)."""
        with self.transaction() as tx:
            return tx.latest_telemetry(**filters)

    def device_totals(self, fleet: str | None = None, device: str | None = None) -> dict[tuple[str, str], DeviceTotals]:
        """Ingestion counters of every device (see :meth:`Transaction.device_totals`)."""
        with self.transaction() as tx:
            return tx.device_totals(fleet, device)

    def ingest_summary(self, **options: Any) -> dict[str, float]:
        with self.transaction() as tx:
            return tx.ingest_summary(**options)

    def insert_model(self, model: ModelRecord) -> ModelRecord:
        """Register a model version; :class:`Conflict` if it exists."""
        with self.transaction(write=True) as tx:
            return tx.insert_model(model)

    def get_model(self, name: str, version: str) -> ModelRecord:
        """The model version, or :class:`NotFound`."""
        with self.transaction() as tx:
            return tx.get_model(name, version)

    def list_models(self, name: str | None = None) -> list[ModelRecord]:
        with self.transaction() as tx:
            return tx.list_models(name)

    def set_alias(self, name: str, alias: str, version: str) -> str | None:
        """Create or move an alias; return its previous version. :class:`NotFound` for an unknown version."""
        with self.transaction(write=True) as tx:
            return tx.set_alias(name, alias, version)

    def model_aliases(self, name: str) -> dict[str, str]:
        with self.transaction() as tx:
            return tx.model_aliases(name)

    def resolve_alias(self, name: str, alias: str) -> ModelRecord:
        """The model ``name@alias`` points at, or :class:`NotFound`."""
        with self.transaction() as tx:
            return tx.resolve_alias(name, alias)

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
