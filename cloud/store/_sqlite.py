"""SQLite backend (stdlib sqlite3, WAL).

``sqlite:///path/to/db.sqlite`` or a plain path. ``?synchronous=normal`` trades the
last commits before a power cut for speed (a process crash loses nothing either way);
the default ``full`` makes a commit durable before the ingestor acknowledges it.
Writers serialise on ``BEGIN IMMEDIATE``; readers never block them (WAL).
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import orjson

from .._exceptions import ConfigError, Conflict, StoreError
from ._base import Store, StreamKey, Transaction

_SYNC = {"off", "normal", "full", "extra"}


class _SQLiteTx(Transaction):
    def _insert_rows(self, key: StreamKey, records: Sequence[Mapping[str, Any]], received_at: float) -> int:
        fleet, device, stream = key
        dumps = orjson.dumps
        rows = [(fleet, device, stream, r["seq"], r["ts"], r["kind"], dumps(r).decode(), received_at) for r in records]
        self.cursor.executemany(
            "INSERT INTO telemetry (fleet, device_id, stream, seq, ts, kind, body, received_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
            rows,
        )
        return self.cursor.rowcount


class SQLiteStore(Store):
    dialect = "sqlite"
    driver_errors = (sqlite3.Error,)

    def __init__(self, path: str | Path, *, synchronous: str = "full", busy_timeout_s: float = 30.0, pool_size: int = 4) -> None:
        if synchronous.lower() not in _SYNC:
            raise ConfigError(f"synchronous must be one of {sorted(_SYNC)}, got {synchronous!r}")
        if str(path) == ":memory:":
            raise ConfigError("an in-memory SQLite store cannot be shared by threads; use a file")
        self.path = Path(path)
        self.synchronous = synchronous.lower()
        self.busy_timeout_s = busy_timeout_s
        super().__init__(f"sqlite:///{self.path}", pool_size)

    def _connect(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, timeout=self.busy_timeout_s, isolation_level=None, check_same_thread=False)
        self._enable_wal(conn)
        conn.execute(f"PRAGMA synchronous={self.synchronous}")
        conn.execute("PRAGMA foreign_keys=ON")
        return conn

    def _enable_wal(self, conn: sqlite3.Connection) -> None:
        """Switch to WAL; the switch needs an exclusive lock and skips the busy handler."""
        deadline = time.monotonic() + self.busy_timeout_s
        while True:
            try:
                if conn.execute("PRAGMA journal_mode=WAL").fetchone()[0].lower() == "wal":
                    return
            except sqlite3.OperationalError:
                if time.monotonic() > deadline:
                    raise
            if time.monotonic() > deadline:
                raise sqlite3.OperationalError(f"cannot switch {self.path} to WAL mode")
            time.sleep(0.01)

    def _begin(self, conn: sqlite3.Connection, write: bool) -> Transaction:
        cursor = conn.cursor()
        cursor.execute("BEGIN IMMEDIATE" if write else "BEGIN")
        return _SQLiteTx(cursor)

    def _end(self, conn: sqlite3.Connection, commit: bool) -> None:
        conn.execute("COMMIT" if commit else "ROLLBACK")

    def _translate(self, exc: BaseException) -> StoreError:
        if isinstance(exc, sqlite3.IntegrityError):
            return Conflict(f"sqlite store {self.path}: {exc}")
        return StoreError(f"sqlite store {self.path}: {exc}")
