"""PostgreSQL backend (psycopg 3).

``postgresql://user@host:port/dbname``. Coordinator replicas share one database: a
write transaction locks the counter rows it updates (``SELECT ... FOR UPDATE``), in
sorted order, so counters stay exact and replicas never deadlock. Telemetry goes in
with one ``INSERT ... SELECT FROM unnest(arrays) ON CONFLICT DO NOTHING`` per stream.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import orjson
import psycopg

from .._exceptions import Conflict, StoreError
from ._base import Store, StreamKey, Transaction


@functools.lru_cache(maxsize=256)
def _pg(sql: str) -> str:
    """``?`` placeholders to psycopg's ``%s`` (our SQL has no other ``?`` or ``%``)."""
    return sql.replace("%", "%%").replace("?", "%s")


class _PostgresTx(Transaction):
    for_update = " FOR UPDATE"
    greatest = "GREATEST"

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        self.cursor.execute(_pg(sql), params)
        return self.cursor

    def _insert_rows(self, key: StreamKey, records: Sequence[Mapping[str, Any]], received_at: float) -> int:
        dumps = orjson.dumps
        self.cursor.execute(
            "INSERT INTO telemetry (fleet, device_id, stream, seq, ts, kind, body, received_at) "
            "SELECT %s, %s, %s, s, t, k, b::jsonb, %s "
            "FROM unnest(%s::bigint[], %s::float8[], %s::text[], %s::text[]) AS u(s, t, k, b) "
            "ON CONFLICT DO NOTHING",
            (*key, received_at, [r["seq"] for r in records], [float(r["ts"]) for r in records],
             [r["kind"] for r in records], [dumps(r).decode() for r in records]),
            binary=True,
        )
        return self.cursor.rowcount


class PostgresStore(Store):
    dialect = "postgresql"
    driver_errors = (psycopg.Error,)

    def __init__(self, url: str, *, pool_size: int = 4, connect_timeout_s: int = 10) -> None:
        self.connect_timeout_s = connect_timeout_s
        super().__init__(url, pool_size)

    def _connect(self) -> psycopg.Connection[Any]:
        return psycopg.connect(self.url, autocommit=True, connect_timeout=self.connect_timeout_s)

    def _begin(self, conn: psycopg.Connection[Any], write: bool) -> Transaction:
        cursor = conn.cursor()
        cursor.execute("BEGIN")
        return _PostgresTx(cursor)

    def _end(self, conn: psycopg.Connection[Any], commit: bool) -> None:
        conn.execute("COMMIT" if commit else "ROLLBACK")

    def _translate(self, exc: BaseException) -> StoreError:
        if isinstance(exc, psycopg.errors.IntegrityError):
            return Conflict(f"postgresql store: {exc}")
        return StoreError(f"postgresql store: {exc}")
