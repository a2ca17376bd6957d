"""Durable telemetry buffer: an in-memory queue flushed to SQLite (WAL) in segments.

Durability window
    ``append`` only puts the record on an in-memory queue (a few hundred ns). A
    flusher thread writes the queue to SQLite every ``flush_interval_ms`` (default
    50 ms), or as soon as ``FLUSH_AT`` records are queued, in one transaction; with ``fsync`` on (default, ``synchronous=FULL``) the
    commit is on disk when it returns. A record is therefore on disk at most
    ``flush_interval_ms`` plus one commit (well under 100 ms by default) after it was
    made. A kill -9 or power cut loses at most that window, never a committed record.

Sequence numbers
    ``seq`` is assigned when a record is committed, from a counter kept in the same
    database and committed in the same transaction. Persisted seqs are therefore
    contiguous, never reused across restarts, and a record lost in the durability
    window leaves no gap. Within one flush, records are grouped by priority class
    (classes in order of first appearance, append order within a class), so ``seq``
    may order two records of different classes made within the same 50 ms
    differently from their ``ts``. ``stream`` (a random id made with the database)
    changes only if the data dir is wiped; consumers deduplicate on (stream, seq).

Segments
    A row holds a *segment*: up to ``segment_max_records`` consecutive records of one
    priority class. One SQLite row per segment instead of per record keeps the
    flusher's cost per record low (the agent's hot path shares the interpreter with
    it). A segment is the unit of publishing, acknowledgement and dropping. Most
    segments hold comma-separated JSON objects; predictions made by ``predict`` (one
    model, one output shape) are stored *packed*: a small JSON header and their numbers
    as columns (ts, latency, top-1, score, mean; 40 bytes a record against ~200 as
    JSON), turned into the same JSON records when read for publishing. The flusher's
    work per prediction is then a few numpy operations and a fifth of the bytes to write.

Budget and drop policy
    The buffer holds at most ``max_bytes`` of records (stored size plus an overhead of
    32 bytes per record). Above it, whole segments are dropped by priority class,
    lowest first, oldest first within a class: ``sample`` < ``prediction`` <
    ``metrics`` < ``event``. Drops are counted per class (in records) in the database
    and reported upstream in every metrics record.

    While the disk refuses writes, records wait in memory, at most ``MEMORY_LIMIT``
    records and about ``MEMORY_LIMIT_BYTES`` (a queued prediction holds its output
    array); the excess goes by the same policy and is counted as ``memory``.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import logging
import math
import operator
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from ._exceptions import StorageError
from ._json import dumps
from ._memory import Trimmer

log = logging.getLogger(__name__)

#: Priority classes, lowest first: the order in which the budget drops records.
PRIORITIES = {"sample": 0, "prediction": 1, "metrics": 2, "shadow": 2, "feedback": 2, "event": 3}
_CLASS_NAMES = {0: "sample", 1: "prediction", 2: "metrics", 3: "event"}
ROW_OVERHEAD = 32
#: (model, version, output name) of a queued prediction
_KEY = operator.itemgetter(2, 3, 5)
_SHAPE = operator.attrgetter("shape")
_TAG = operator.itemgetter(0)  # 1 for a prediction queued by append_prediction, else 0
#: 3: prediction segments may be packed (see Segments). An agent older than that reads
#: only JSON segments: ``downgrade()`` (``edgeml agent downgrade-buffer``) converts back.
SCHEMA_VERSION = 3
#: The schema whose segments are all JSON (what ``downgrade`` leaves).
JSON_SCHEMA = 2
#: SQLite page cache of the buffer's connection (KiB).
PAGE_CACHE_KIB = 256
#: Records kept in memory when the database cannot be written (disk full), before dropping.
MEMORY_LIMIT = 200_000
#: ... and their approximate size (outputs and sampled arrays included).
MEMORY_LIMIT_BYTES = 64 * 1024 * 1024
#: Least memory a queued record takes (the tuple, its floats and strings).
_QUEUED_MIN = 200
#: The longest number orjson writes (``-2.2250738585072014e-308``; an int64 is shorter).
_MAX_NUMBER = 24
#: Queue length that wakes the flusher before its interval is up. A burst (an application
#: predicting in a tight loop) then turns into transactions of about this many records
#: instead of one transaction per interval holding tens of thousands: the same work, but the
#: transient memory of a flush (and the heap it leaves behind) stays small.
FLUSH_AT = 1024


@dataclass(frozen=True, slots=True)
class BufferStats:
    stream: str
    records: int
    bytes: int
    pending: int
    next_seq: int
    oldest_seq: int | None
    dropped: dict[str, int] = field(default_factory=dict)
    last_ack_ts: float | None = None
    storage_errors: int = 0

    @property
    def dropped_total(self) -> int:
        return sum(self.dropped.values())

    def to_json(self) -> dict[str, Any]:
        return {
            "stream": self.stream,
            "records": self.records,
            "bytes": self.bytes,
            "pending": self.pending,
            "next_seq": self.next_seq,
            "oldest_seq": self.oldest_seq,
            "dropped": dict(self.dropped),
            "dropped_total": self.dropped_total,
            "last_ack_ts": self.last_ack_ts,
            "storage_errors": self.storage_errors,
        }


@dataclass(frozen=True, slots=True)
class Batch:
    """Segments read for one MQTT message: ``count`` records, seqs ``first``..``last``.

    Each body is one or more comma-separated JSON records; join them with ``b","``.
    """

    first: int
    last: int
    count: int
    bodies: list[bytes]

    def __len__(self) -> int:
        return self.count


def summarize(name: str, value: Any) -> dict[str, Any] | None:
    """The prediction summary of one output (see protocol.OutputSummary)."""
    if not isinstance(value, np.ndarray) or value.dtype.kind not in "biuf" or value.size == 0:
        return None
    if value.ndim == 2 and value.size <= 4096 and value.dtype.kind == "f":  # plain Python: tiny arrays
        rows = value.tolist()
        row = rows[0]
        if any(map(math.isnan, row)):  # Python's max is arbitrary with NaN; argmax takes the first NaN
            top1, score = _top1(value[:1])
            best, index = float(score[0]), int(top1[0])
        else:
            best = max(row)
            index = row.index(best)
        return {"output": name, "top1": index, "score": best, "mean": sum(map(sum, rows)) / value.size}
    if value.ndim == 2 and value.size <= 4096:  # integers: in plain Python
        rows = value.tolist()
        row = rows[0]
        best = max(row)
        return {"output": name, "top1": row.index(best), "score": best, "mean": sum(map(sum, rows)) / value.size}
    if value.ndim >= 2:
        row = value[0].ravel()
        top1 = int(row.argmax())
        return {"output": name, "top1": top1, "score": float(row[top1]), "mean": float(value.mean())}
    if value.dtype.kind in "iu":  # a label vector
        return {"output": name, "top1": int(value[0]), "score": None, "mean": float(value.mean())}
    return {"output": name, "top1": None, "score": None, "mean": float(value.mean())}


def _top1(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``rows.argmax(axis=1)`` and the values there, as argmax has it (each row's first
    maximum; its first NaN where it has one).

    Built from comparisons only: the first numpy arithmetic a process does (argmax, +, *,
    /, mean, round: any of them) pages in about 1 MB of numpy's code, which the agent's
    hot path otherwise never needs."""
    best = rows.max(axis=1)
    hit = rows == best[:, None]
    nan = best != best
    if nan.any():
        hit[nan] = np.isnan(rows[nan])
    row, col = np.nonzero(hit)  # row-major: each row's hits in column order
    if len(row) != len(rows):  # ties: keep each row's first hit
        first = np.ones(len(row), dtype=bool)
        first[1:] = row[1:] != row[:-1]
        col = col[first]
    return col, rows[np.arange(len(rows)), col]  # the element itself (-0.0 where argmax picks it)


def _round2(values: list[float]) -> list[float]:
    """Latencies to 0.01 us, in plain Python (see _top1); numpy for what int() refuses."""
    try:
        return [int(v * 100.0 + 0.5) / 100.0 for v in values]
    except (OverflowError, ValueError):  # inf, NaN
        return np.round(np.array(values, dtype=np.float64), 2).tolist()


#: First byte of a packed prediction segment (a JSON segment starts with ``{``).
_PACKED = b"\x01"
#: ts, latency_us, top1, score, mean: one 8-byte number each per record.
_PACKED_RECORD = 40
_PACKED_DTYPES = (np.float64, np.float64, np.int64, np.float64, np.float64)
#: Records turned into JSON at a time when a packed segment is read.
_UNPACK_CHUNK = 100


def _packed_header(model: str, version: str, name: str, batch: int) -> bytes:
    """``\x01``, the length of a JSON header, the header; padded so the columns after it
    start 8-byte aligned."""
    meta = dumps({"model": model, "version": version, "output": name, "batch": batch})
    meta += b" " * (-(len(meta) + 3) % 8)
    return _PACKED + len(meta).to_bytes(2, "little") + meta


@functools.lru_cache(maxsize=64)
def _prediction_parts(header: bytes) -> tuple[bytes, ...]:
    """The constant parts of a prediction record, around its six numbers."""
    meta = orjson.loads(header[3:])
    model, version, name = (dumps(meta[k]) for k in ("model", "version", "output"))
    return (
        b'{"seq":', b',"ts":', b',"kind":"prediction","model":' + model + b',"version":' + version
        + b',"latency_us":', b',"batch":' + str(meta["batch"]).encode() + b',"summary":{"output":' + name + b',"top1":',
        b',"score":', b',"mean":', b"}},",
    )


def _record_bound(parts: tuple[bytes, ...]) -> int:
    """The longest JSON a prediction record with these parts can take."""
    return sum(map(len, parts)) + _MAX_NUMBER * 6


def _cells(columns: tuple[np.ndarray, ...], seq0: int) -> list[list[bytes]]:
    """The six numbers of each record as JSON, a column at a time (orjson; NaN/inf
    become null), split back into values."""
    ts, latency, top1, score, mean = columns
    return [
        dumps(column)[1:-1].split(b",")
        for column in (np.arange(seq0, seq0 + len(ts)), ts.tolist(), _round2(latency.tolist()),
                       np.ascontiguousarray(top1), score.tolist(), mean.tolist())
    ]


def _unpack(seq0: int, body: bytes) -> bytes:
    """The JSON records (comma-separated) of a packed prediction segment.

    Done ``_UNPACK_CHUNK`` records at a time: the cells of a whole segment (six small
    objects a record) would need new allocator arenas that a few long-lived objects then
    keep for the rest of the agent's life."""
    size = int.from_bytes(body[1:3], "little")
    header, offset = body[:3 + size], 3 + size
    n = (len(body) - offset) // _PACKED_RECORD
    columns = []
    for dtype in _PACKED_DTYPES:
        columns.append(np.frombuffer(body, dtype=dtype, count=n, offset=offset))
        offset += 8 * n
    parts = _prediction_parts(header)
    width = 2 * len(parts) - 1  # seven constant parts around six numbers
    chunks = []
    for start in range(0, n, _UNPACK_CHUNK):
        count = min(_UNPACK_CHUNK, n - start)
        cells = _cells(tuple(c[start:start + count] for c in columns), seq0 + start)  # type: ignore[arg-type]
        pieces: list[bytes] = [b""] * (width * count)
        for j, part in enumerate(parts):  # constants and cells interleaved: p0 c0 p1 c1 ... p6
            pieces[2 * j::width] = [part] * count
        for j, column in enumerate(cells):
            pieces[2 * j + 1::width] = column
        chunks.append(b"".join(pieces))
        del cells, pieces
    return b"".join(chunks)[:-1]  # each record ends with a comma


def _unpack_or_report(first_seq: int, last_seq: int, body: bytes) -> bytes:
    """:func:`_unpack`; a segment that cannot be decoded (a damaged file) becomes one event
    record saying which seqs were lost, so that publishing goes on past it."""
    try:
        return _unpack(first_seq, body)
    except Exception as exc:
        log.error("telemetry segment %d..%d cannot be decoded (%s): sending an event instead", first_seq, last_seq, exc)
        return dumps({"seq": first_seq, "ts": time.time(), "kind": "event", "name": "bad_record", "level": "error",
                      "message": f"records {first_seq}..{last_seq} were damaged in the buffer and are lost"[:300],
                      "data": {"kind": "prediction", "first_seq": first_seq, "last_seq": last_seq}})


def _queued_size(item: tuple[Any, ...]) -> int:
    """About how much memory a queued record holds, arrays included."""
    if item[0] == 1:
        return _QUEUED_MIN + getattr(item[6], "nbytes", 0)
    fields = item[3]
    size = _QUEUED_MIN
    for key in ("inputs", "outputs"):  # a sample's arrays
        values = fields.get(key)
        if isinstance(values, dict):
            size += sum(getattr(v, "nbytes", 0) for v in values.values())
    return size


class TelemetryBuffer:
    """Store-and-forward buffer. Thread-safe: append from any thread."""

    def __init__(
        self,
        path: str | Path,
        *,
        max_bytes: int = 64 * 1024 * 1024,
        flush_interval_ms: int = 50,
        fsync: bool = True,
        segment_max_records: int = 500,
        segment_max_bytes: int = 256 * 1024,
    ) -> None:
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.flush_interval = flush_interval_ms / 1000.0
        self.segment_max_records = segment_max_records
        self.segment_max_bytes = segment_max_bytes
        self._queue: collections.deque[tuple[Any, ...]] = collections.deque()
        self._lock = threading.Lock()  # guards the connection and the counters
        self._flush_lock = threading.Lock()  # one flush at a time: seqs are assigned in order
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._listeners: list[Callable[[], None]] = []
        self._storage_errors = 0
        self._in_flush = 0
        self._memory_drops_unsaved = False
        self._unpacked: tuple[int, bytes] | None = None  # the last packed segment read, as JSON
        self._conn = self._open(fsync)
        self._load_counters()

    # ------------------------------------------------------------------ setup
    def _open(self, fsync: bool) -> sqlite3.Connection:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
            conn.execute("PRAGMA auto_vacuum=INCREMENTAL")
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(f"PRAGMA synchronous={'FULL' if fsync else 'NORMAL'}")
            # records are written once and read once soon after: SQLite's default 2 MB page
            # cache buys nothing here but stays allocated for the agent's life
            conn.execute(f"PRAGMA cache_size=-{PAGE_CACHE_KIB}")
            conn.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")
            conn.execute(
                "CREATE TABLE IF NOT EXISTS segments (first_seq INTEGER PRIMARY KEY, last_seq INTEGER NOT NULL,"
                " priority INTEGER NOT NULL, count INTEGER NOT NULL, size INTEGER NOT NULL, body BLOB NOT NULL)"
            )
            self._migrate(conn)
            row = conn.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
            if row is not None and int(row[0]) > SCHEMA_VERSION:
                raise StorageError(
                    f"telemetry buffer {self.path} was written by a newer agent (schema {row[0]}, this agent knows "
                    f"{SCHEMA_VERSION}); convert it with that agent's 'edgeml agent downgrade-buffer', or move it aside"
                )
            # from now on this agent may write packed segments: older agents must convert first
            conn.execute("INSERT OR REPLACE INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
            conn.execute("INSERT OR IGNORE INTO meta VALUES ('stream', ?)", (uuid.uuid4().hex,))
            conn.execute("INSERT OR IGNORE INTO meta VALUES ('next_seq', '1')")
            conn.execute("PRAGMA quick_check").fetchone()
        except sqlite3.Error as exc:
            raise StorageError(f"cannot open telemetry buffer {self.path}: {exc}") from exc
        except StorageError:
            conn.close()
            raise
        return conn

    @staticmethod
    def _migrate(conn: sqlite3.Connection) -> None:
        """Schema 1 kept one row per record: each becomes a segment of one."""
        if conn.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='records'").fetchone():
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("INSERT INTO segments SELECT seq, seq, priority, 1, size, body FROM records")
            conn.execute("DROP TABLE records")
            conn.execute("INSERT OR REPLACE INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
            conn.execute("COMMIT")

    def _meta(self, key: str) -> str | None:
        row = self._conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def _load_counters(self) -> None:
        self.stream = self._meta("stream") or ""
        self._next_seq = int(self._meta("next_seq") or 1)
        count, total = self._conn.execute("SELECT total(count), total(size) FROM segments").fetchone()
        self._records, self._bytes = int(count), int(total)
        self._dropped = {
            k.removeprefix("dropped."): int(v)
            for k, v in self._conn.execute("SELECT key, value FROM meta WHERE key LIKE 'dropped.%'")
        }
        ack = self._meta("last_ack_ts")
        self._last_ack_ts = float(ack) if ack else None

    # ------------------------------------------------------------------ hot path
    def append_prediction(self, model: str, version: str, latency_us: float, output_name: str, output: Any) -> None:
        """Queue a prediction record; summary and batch size are computed by the flusher."""
        queue = self._queue
        queue.append((1, time.time(), model, version, latency_us, output_name, output))
        if len(queue) >= FLUSH_AT and not self._wake.is_set():  # >=: two appenders may pass the mark together
            self._wake.set()

    def append(self, kind: str, fields: dict[str, Any], ts: float | None = None) -> None:
        """Queue a record of ``kind`` (sample, prediction, metrics, event) with ``fields``."""
        queue = self._queue
        queue.append((0, ts or time.time(), kind, fields))
        if len(queue) >= FLUSH_AT and not self._wake.is_set():  # >=: two appenders may pass the mark together
            self._wake.set()

    def add_listener(self, callback: Callable[[], None]) -> None:
        """``callback()`` runs on the flusher thread after each commit of new records."""
        self._listeners.append(callback)

    # ------------------------------------------------------------------ encoding (flusher thread)
    @staticmethod
    def _generic(items: list[tuple[Any, ...]], seq0: int) -> list[bytes]:
        return [dumps({"seq": seq0 + i, "ts": ts, "kind": kind, **fields}) for i, (_, ts, kind, fields) in enumerate(items)]

    @staticmethod
    def _one_prediction(item: tuple[Any, ...], seq: int) -> bytes:
        _, ts, model, version, latency, name, output = item
        batch = output.shape[0] if isinstance(output, np.ndarray) and output.ndim else 1
        return dumps({
            "seq": seq, "ts": ts, "kind": "prediction", "model": model, "version": version,
            "latency_us": round(latency, 2), "batch": batch, "summary": summarize(name, output),
        })

    def _predictions(self, items: list[tuple[Any, ...]], seq0: int, priority: int) -> list[tuple[int, int, int, int, int, bytes]]:
        """Segments of prediction records. When every output has the same 2-D float shape
        (the common case) the summaries are computed for the whole flush at once and each
        segment is stored packed: its numbers as columns of float64/int64, turned into
        JSON only when the segment is read for publishing (:func:`_unpack`). Otherwise one
        JSON record at a time."""
        outputs = [item[6] for item in items]
        first = outputs[0]
        n = len(items)
        rows = None
        if (
            type(first) is np.ndarray and first.ndim == 2 and first.dtype.kind == "f" and first.size
            and len(set(map(_KEY, items))) == 1
        ):
            try:
                if len(set(map(_SHAPE, outputs))) != 1:  # AttributeError: not all arrays
                    raise ValueError("outputs of several shapes")
                if first.shape[0] == 1:  # one row per request: concatenate is 4x cheaper than stack
                    rows = stacked = np.concatenate(outputs)
                    if rows.shape != (n, first.shape[1]) or rows.dtype.kind != "f":
                        rows = None
                else:
                    stacked = np.stack(outputs)  # (n, batch, k); raises on mixed shapes
                    rows = stacked[:, 0, :] if stacked.dtype.kind == "f" else None
            except (ValueError, TypeError, AttributeError):
                rows = None
        if rows is None:
            bodies = [self._one_prediction(item, seq0 + i) for i, item in enumerate(items)]
            return self._cut(priority, bodies, seq0)
        # no numpy arithmetic here (see _top1): the mean is a product with 1/size (BLAS)
        top1, score = _top1(rows)
        flat = stacked.reshape(n, -1)
        columns = (
            np.array([item[1] for item in items], dtype=np.float64),  # ts
            np.array([item[4] for item in items], dtype=np.float64),  # latency, rounded when read
            top1.astype(np.int64, copy=False),
            score.astype(np.float64),
            flat.astype(np.float64) @ np.full(flat.shape[1], 1.0 / flat.shape[1]),  # mean
        )
        model, version, name = _KEY(items[0])
        header = _packed_header(model, version, name, first.shape[0])
        # as many records a segment as keep its JSON (what a message carries) within the size limit
        per_segment = max(1, min(self.segment_max_records, self.segment_max_bytes // _record_bound(_prediction_parts(header))))
        segments = []
        for start in range(0, n, per_segment):
            count = min(per_segment, n - start)
            body = b"".join([header, *(column[start:start + count].tobytes() for column in columns)])
            segments.append((seq0 + start, seq0 + start + count - 1, priority, count, len(body) + ROW_OVERHEAD * count, body))
        return segments

    def _segments(self, items: list[tuple[Any, ...]], seq0: int) -> list[tuple[int, int, int, int, int, bytes]]:
        """Group by class (first appearance), assign seqs, encode, cut into segments."""
        classes: dict[int, list[tuple[Any, ...]]] = {}
        if sum(map(_TAG, items)) == len(items):  # only predict() records: the common case
            classes[1] = items
        else:
            for item in items:
                priority = 1 if item[0] == 1 else PRIORITIES[item[2]]
                classes.setdefault(priority, []).append(item)
        rows = []
        seq = seq0
        for priority, members in classes.items():
            if priority != 1:
                rows.extend(self._cut(priority, self._generic(members, seq), seq))
            elif sum(map(_TAG, members)) == len(members):  # all from predict()
                rows.extend(self._predictions(members, seq, priority))
            else:  # predictions appended through append("prediction", ...)
                bodies = [
                    self._one_prediction(m, seq + i) if m[0] == 1 else self._generic([m], seq + i)[0]
                    for i, m in enumerate(members)
                ]
                rows.extend(self._cut(priority, bodies, seq))
            seq += len(members)
        return rows

    def _cut(self, priority: int, bodies: list[bytes], seq0: int) -> list[tuple[int, int, int, int, int, bytes]]:
        """Consecutive records into segments of at most segment_max_records and
        segment_max_bytes (a single larger record makes a segment of its own)."""
        rows = []
        start, n = 0, len(bodies)
        while start < n:
            end = min(n, start + self.segment_max_records)
            size = 0
            for j in range(start, end):
                size += len(bodies[j]) + 1
                if size > self.segment_max_bytes and j > start:
                    end = j
                    break
            body = b",".join(bodies[start:end])  # one right-sized object per segment
            count = end - start
            rows.append((seq0 + start, seq0 + end - 1, priority, count, len(body) + ROW_OVERHEAD * count, body))
            start = end
        return rows

    # ------------------------------------------------------------------ flushing
    def flush(self) -> int:
        """Commit every queued record; returns how many. Raises StorageError on failure
        (the records stay queued and the next flush retries them)."""
        with self._flush_lock:
            n = len(self._queue)
            if not n:
                return 0
            self._in_flush = n  # popped but not committed: still "pending" for stats()
            items = [self._queue.popleft() for _ in range(n)]
            seq0 = self._next_seq
            try:
                rows = self._encode(items, seq0)
            except BaseException:  # not expected (each record is checked alone): keep them queued
                self._queue.extendleft(reversed(items))
                self._in_flush = 0
                raise
            added = sum(row[4] for row in rows)
            with self._lock:
                try:
                    self._conn.execute("BEGIN IMMEDIATE")
                    self._conn.executemany("INSERT INTO segments VALUES (?, ?, ?, ?, ?, ?)", rows)
                    self._conn.execute("UPDATE meta SET value = ? WHERE key = 'next_seq'", (str(seq0 + n),))
                    if self._memory_drops_unsaved:  # counted while the disk refused writes
                        self._conn.execute("INSERT OR REPLACE INTO meta VALUES ('dropped.memory', ?)",
                                           (str(self._dropped["memory"]),))
                    self._conn.execute("COMMIT")
                except sqlite3.Error as exc:
                    self._rollback()
                    self._storage_errors += 1
                    self._queue.extendleft(reversed(items))
                    self._in_flush = 0
                    self._shed_memory()
                    raise StorageError(f"cannot write telemetry buffer {self.path}: {exc}") from exc
                self._next_seq = seq0 + n
                self._memory_drops_unsaved = False
                self._records += n
                self._bytes += added
                if self._bytes > self.max_bytes:
                    self._enforce_budget()
                self._in_flush = 0
        for callback in self._listeners:
            callback()
        return n

    def _encode(self, items: list[tuple[Any, ...]], seq0: int) -> list[tuple[int, int, int, int, int, bytes]]:
        try:
            return self._segments(items, seq0)
        except Exception as exc:  # one record that cannot be encoded must not sink the rest
            log.error("telemetry records failed to encode (%s); replacing the bad ones", exc)
            items[:] = [self._encodable(item) for item in items]
            try:
                return self._segments(items, seq0)
            except Exception:  # each encodes alone but not together: one segment per record
                return [row for i, item in enumerate(items) for row in self._segments([item], seq0 + i)]

    def _encodable(self, item: tuple[Any, ...]) -> tuple[Any, ...]:
        """``item`` if it encodes alone, else an event that says what was lost (same seq)."""
        try:
            self._segments([item], 1)
            return item
        except Exception as exc:
            kind = "prediction" if item[0] == 1 else str(item[2])
            return (0, item[1], "event", {"name": "bad_record", "level": "error", "data": {"kind": kind},
                                          "message": f"a {kind} record could not be encoded: {exc}"[:300]})

    def _rollback(self) -> None:
        with contextlib.suppress(sqlite3.Error):  # no transaction was open
            self._conn.execute("ROLLBACK")

    def _shed_memory(self) -> None:
        """While the disk refuses writes, keep at most MEMORY_LIMIT records and about
        MEMORY_LIMIT_BYTES in memory.

        The excess goes by the budget's policy: lowest priority class first, oldest first
        within a class; counted as ``dropped["memory"]`` (saved with the next commit)."""
        queue = self._queue
        n = len(queue)
        if n <= MEMORY_LIMIT and n * _QUEUED_MIN <= MEMORY_LIMIT_BYTES and not any(map(_TAG, queue)):
            return  # few enough, and no prediction holds an array: nothing to weigh
        # popleft/extendleft: appenders only add to the right, so their records stay newest
        items = [queue.popleft() for _ in range(n)]
        sizes = [_queued_size(item) for item in items]
        total = sum(sizes)
        if n <= MEMORY_LIMIT and total <= MEMORY_LIMIT_BYTES:
            queue.extendleft(reversed(items))
            return
        classes = [1 if item[0] == 1 else PRIORITIES.get(item[2], 0) for item in items]
        dropped = [False] * n
        drops: dict[str, int] = {}
        left = n
        for priority in sorted(_CLASS_NAMES):
            for i in range(n):
                if left <= MEMORY_LIMIT and total <= MEMORY_LIMIT_BYTES:
                    break
                if classes[i] == priority:
                    dropped[i] = True
                    left -= 1
                    total -= sizes[i]
                    drops[_CLASS_NAMES[priority]] = drops.get(_CLASS_NAMES[priority], 0) + 1
        queue.extendleft(reversed([item for item, gone in zip(items, dropped, strict=True) if not gone]))
        excess = n - left
        self._dropped["memory"] = self._dropped.get("memory", 0) + excess
        self._memory_drops_unsaved = True
        with contextlib.suppress(sqlite3.Error):  # best effort now; the next commit saves it anyway
            self._conn.execute("INSERT OR REPLACE INTO meta VALUES ('dropped.memory', ?)",
                               (str(self._dropped["memory"]),))
        log.error("telemetry buffer: disk not writable, %d records (~%d MB) kept in memory: dropped %s",
                  left, total // 2**20, drops)

    def _enforce_budget(self) -> None:
        """Drop lowest-priority, oldest segments until the buffer fits its budget (lock held)."""
        target = int(self.max_bytes * 0.9)  # hysteresis: do not trim on every flush
        drops: dict[str, int] = {}
        freed = 0
        for priority in sorted(_CLASS_NAMES):
            if self._bytes - freed <= target:
                break
            cursor = self._conn.execute(
                "SELECT first_seq, count, size FROM segments WHERE priority = ? ORDER BY first_seq", (priority,)
            )
            last = None
            count = 0
            for first_seq, n, size in cursor:
                if self._bytes - freed <= target:
                    break
                freed += size
                count += n
                last = first_seq
            cursor.close()
            if last is not None:
                name = _CLASS_NAMES[priority]
                total = self._dropped.get(name, 0) + count
                try:
                    self._conn.execute("BEGIN IMMEDIATE")
                    self._conn.execute("DELETE FROM segments WHERE priority = ? AND first_seq <= ?", (priority, last))
                    self._conn.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (f"dropped.{name}", str(total)))
                    self._conn.execute("COMMIT")
                except sqlite3.Error as exc:  # retried on the next flush; the buffer stays consistent
                    self._rollback()
                    freed = 0  # nothing was dropped in this class
                    log.warning("telemetry buffer: cannot drop over-budget records now: %s", exc)
                    break
                self._dropped[name] = total
                self._records -= count
                drops[name] = count
                self._bytes -= freed
                freed = 0
        if drops:
            log.warning("telemetry buffer over budget (%d bytes): dropped %s", self.max_bytes, drops)

    # ------------------------------------------------------------------ sync side
    def read_batch(self, after_seq: int, max_records: int, max_bytes: int) -> Batch | None:
        """The oldest committed segments after ``after_seq`` within both limits (at least one)."""
        bodies: list[bytes] = []
        count = total = 0
        first = last = 0
        with self._lock:
            cursor = self._conn.execute(
                "SELECT first_seq, last_seq, count, body FROM segments WHERE first_seq > ? ORDER BY first_seq",
                (after_seq,),
            )
            try:
                for first_seq, last_seq, n, body in cursor:  # rows are read lazily: stop early
                    if bodies and count + n > max_records:  # known without decoding the segment
                        break
                    if body[:1] == _PACKED:
                        cached = self._unpacked  # a segment decoded, then left out by the byte limit
                        if cached is not None and cached[0] == first_seq:  # seqs are never reused
                            body = cached[1]
                        else:
                            body = _unpack_or_report(first_seq, last_seq, body)
                            self._unpacked = (first_seq, body)
                    if bodies and total + len(body) + 1 > max_bytes:
                        break
                    if not bodies:
                        first = first_seq
                    bodies.append(body)
                    count += n
                    total += len(body) + 1
                    last = last_seq
            finally:
                cursor.close()
        return Batch(first, last, count, bodies) if bodies else None

    def ack(self, first: int, last: int) -> int:
        """Delete the segments ``first``..``last`` (the broker acknowledged them); returns
        how many records that removed."""
        return self.ack_many([(first, last)])

    def ack_many(self, ranges: list[tuple[int, int]]) -> int:
        """Delete several acknowledged ranges in one transaction (one fsync)."""
        now = time.time()
        with self._lock:
            try:
                self._conn.execute("BEGIN IMMEDIATE")
                count = size = 0
                for first, last in ranges:
                    n, b = self._conn.execute(
                        "SELECT total(count), total(size) FROM segments WHERE first_seq BETWEEN ? AND ?", (first, last)
                    ).fetchone()
                    self._conn.execute("DELETE FROM segments WHERE first_seq BETWEEN ? AND ?", (first, last))
                    count += int(n)
                    size += int(b)
                self._conn.execute("INSERT OR REPLACE INTO meta VALUES ('last_ack_ts', ?)", (repr(now),))
                self._conn.execute("COMMIT")
            except sqlite3.Error as exc:
                self._rollback()
                self._storage_errors += 1
                raise StorageError(f"cannot delete acknowledged records: {exc}") from exc
            self._records -= count
            self._bytes -= size
            self._last_ack_ts = now
            if self._unpacked is not None and any(a <= self._unpacked[0] <= b for a, b in ranges):
                self._unpacked = None
        return count

    def oldest_seq(self) -> int | None:
        with self._lock:
            row = self._conn.execute("SELECT min(first_seq) FROM segments").fetchone()
        return row[0]

    def stats(self) -> BufferStats:
        with self._lock:
            return BufferStats(
                stream=self.stream,
                records=self._records,
                bytes=self._bytes,
                pending=len(self._queue) + self._in_flush,
                next_seq=self._next_seq,
                oldest_seq=self._conn.execute("SELECT min(first_seq) FROM segments").fetchone()[0],
                dropped=dict(self._dropped),
                last_ack_ts=self._last_ack_ts,
                storage_errors=self._storage_errors,
            )

    def downgrade(self) -> int:
        """Turn every packed segment into its JSON records, for an agent older than
        schema 3 (run with the agent stopped); returns how many records were converted."""
        converted = 0
        with self._flush_lock, self._lock:
            packed = [row[0] for row in self._conn.execute(
                "SELECT first_seq FROM segments WHERE substr(body, 1, 1) = ? ORDER BY first_seq", (_PACKED,))]
            try:
                self._conn.execute("BEGIN IMMEDIATE")
                for first_seq in packed:
                    last_seq, count, body = self._conn.execute(
                        "SELECT last_seq, count, body FROM segments WHERE first_seq = ?", (first_seq,)).fetchone()
                    text = _unpack_or_report(first_seq, last_seq, body)
                    size = len(text) + ROW_OVERHEAD * count
                    self._conn.execute("UPDATE segments SET body = ?, size = ? WHERE first_seq = ?", (text, size, first_seq))
                    converted += count
                self._conn.execute("INSERT OR REPLACE INTO meta VALUES ('schema', ?)", (str(JSON_SCHEMA),))
                self._conn.execute("COMMIT")
            except sqlite3.Error as exc:
                self._rollback()
                raise StorageError(f"cannot convert telemetry buffer {self.path}: {exc}") from exc
            self._unpacked = None
            self._bytes = int(self._conn.execute("SELECT total(size) FROM segments").fetchone()[0])
        return converted

    def housekeeping(self) -> None:
        """Checkpoint the WAL and give free pages back to the file system."""
        with self._lock:
            try:
                # the pragma frees one page per step and execute() steps once (fetching
                # yields no row either); executescript() steps it to the end
                self._conn.executescript("PRAGMA incremental_vacuum;")
                # then the checkpoint writes the shorter database back and empties the WAL
                self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
            except sqlite3.Error as exc:
                log.warning("telemetry buffer housekeeping failed: %s", exc)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Start the flusher thread."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._flush_loop, name="edgeml-buffer-flush", daemon=True)
            self._thread.start()

    def _flush_loop(self) -> None:
        trimmer = Trimmer()
        while not self._stop.is_set():
            self._wake.wait(self.flush_interval)
            self._wake.clear()
            try:
                n = self.flush()
                if n:
                    trimmer.pending += n
                else:  # idle: hand back what the last burst's encoding left in the heap
                    trimmer.idle()
            except StorageError as exc:
                log.error("%s (will retry)", exc)
                self._stop.wait(min(1.0, self.flush_interval * 10))
            except Exception:  # the flusher must outlive any bug: the records stay queued
                log.exception("telemetry flush failed (will retry)")
                self._stop.wait(1.0)

    def close(self) -> None:
        """Stop the flusher, commit what is queued and close the database."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        try:
            self.flush()
        except StorageError as exc:
            log.error("records lost at close: %s", exc)
        with self._lock:
            self._conn.close()

    def __enter__(self) -> TelemetryBuffer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def inspect(path: str | Path) -> BufferStats | None:
    """Read a buffer's statistics without opening it for writing (None if absent)."""
    path = Path(path)
    if not path.exists():
        return None
    conn = sqlite3.connect(path.resolve().as_uri() + "?mode=ro", uri=True)  # as_uri: '#', '?', '%' escaped
    try:
        meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
        table = "segments" if conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type='table' AND name='segments'").fetchone() else None
        count, total, oldest = (
            conn.execute("SELECT total(count), total(size), min(first_seq) FROM segments").fetchone()
            if table else (0, 0, None)
        )
    finally:
        conn.close()
    dropped = {k.removeprefix("dropped."): int(v) for k, v in meta.items() if k.startswith("dropped.")}
    return BufferStats(
        stream=meta.get("stream", ""),
        records=int(count),
        bytes=int(total),
        pending=0,
        next_seq=int(meta.get("next_seq", 1)),
        oldest_seq=oldest,
        dropped=dropped,
        last_ack_ts=float(meta["last_ack_ts"]) if meta.get("last_ack_ts") else None,
    )


def iter_records(bodies: Iterable[bytes]) -> list[dict[str, Any]]:
    """Decode segment bodies into records (helper for tools and tests)."""
    return [record for body in bodies for record in orjson.loads(b"[" + body + b"]")]
