"""PostgreSQL backend (psycopg 3).

``postgresql://user@host:port/dbname``. Coordinator replicas share one database: a
write transaction locks the counter rows it updates (``SELECT ... FOR UPDATE``), in
sorted order, so counters stay exact and replicas never deadlock.

A flush is three statements whatever its number of streams: lock (and create) every
counter row, insert every record (``INSERT ... SELECT FROM jsonb_array_elements(one
document) ON CONFLICT DO NOTHING``), write every counter row. Adapting records one by
one in Python (psycopg's array dumpers, a regex per element) was most of the time.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import orjson
import psycopg

from .._exceptions import Conflict, StoreError, Unstorable
from ._base import Store, StreamKey, Transaction, unstorable_text


@functools.lru_cache(maxsize=256)
def _pg(sql: str) -> str:
    """``?`` placeholders to psycopg's ``%s`` (our SQL has no other ``?`` or ``%``)."""
    return sql.replace("%", "%%").replace("?", "%s")


class _PostgresTx(Transaction):
    for_update = " FOR UPDATE"
    greatest = "GREATEST"
    dialect = "postgresql"

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        with unstorable_text(self.dialect):
            self.cursor.execute(_pg(sql), params)
        return self.cursor

    def _insert_rows(self, key: StreamKey, records: Sequence[Mapping[str, Any]], received_at: float) -> int:
        return self._insert_all([key], {key: records}, received_at).get(key, 0)

    def _lock_all(self, keys: Sequence[StreamKey], now: float) -> dict[StreamKey, tuple[int, int, int, int]]:
        # One statement for every stream. Rows are taken in the order of ``keys`` (sorted,
        # as the ORDER BY feeds the INSERT): a new row is held by our uncommitted insert,
        # an existing one by the no-op DO UPDATE, which locks the latest version like
        # SELECT ... FOR UPDATE. Taking them one by one in one order means no deadlock.
        self.cursor.execute(
            "INSERT INTO ingest_counters AS c (fleet, device_id, stream, first_seen, last_seen) "
            "SELECT f, d, s, %s, %s FROM unnest(%s::text[], %s::text[], %s::text[]) WITH ORDINALITY AS u(f, d, s, i) "
            "ORDER BY i "
            "ON CONFLICT (fleet, device_id, stream) DO UPDATE SET last_seen = c.last_seen "
            "RETURNING fleet, device_id, stream, records, max_seq, max_contiguous_seq, duplicates",
            (now, now, *map(list, zip(*keys, strict=True))),
        )
        return {(r[0], r[1], r[2]): (r[3], r[4], r[5], r[6]) for r in self.cursor.fetchall()}

    def _insert_all(
        self, keys: Sequence[StreamKey], groups: Mapping[StreamKey, Sequence[Mapping[str, Any]]], now: float,
    ) -> dict[StreamKey, int]:
        # The records of all streams travel as one JSON document (one orjson call, no
        # per-row adaptation in Python) and are parsed once, to jsonb, by the server; each
        # element becomes a body as is. Duplicates within the flush hit ON CONFLICT too.
        self.cursor.execute(
            "WITH ins AS (INSERT INTO telemetry (fleet, device_id, stream, seq, ts, kind, body, received_at) "
            "SELECT k.f, k.d, k.s, (e ->> 'seq')::bigint, (e ->> 'ts')::float8, e ->> 'kind', e, %s "
            "FROM unnest(%s::text[], %s::text[], %s::text[]) WITH ORDINALITY AS k(f, d, s, i) "
            "JOIN jsonb_array_elements(%s::jsonb) WITH ORDINALITY AS g(recs, i) ON g.i = k.i "
            "CROSS JOIN LATERAL jsonb_array_elements(g.recs) AS e "
            "ON CONFLICT DO NOTHING RETURNING fleet, device_id, stream) "
            "SELECT fleet, device_id, stream, count(*) FROM ins GROUP BY fleet, device_id, stream",
            (now, *map(list, zip(*keys, strict=True)), orjson.dumps([groups[key] for key in keys]).decode()),
        )
        return {(r[0], r[1], r[2]): r[3] for r in self.cursor.fetchall()}

    def _run_end(self, key: StreamKey, contiguous: int) -> int:
        # The shared NOT EXISTS self-join can be planned (on a young, unanalysed table)
        # as a nested loop probing the whole stream per row: quadratic. Numbering the
        # seqs after ``contiguous`` in index order and stopping at the first that is not
        # ``contiguous + n`` reads the run once whatever the statistics.
        self.cursor.execute(
            "SELECT x.rn FROM (SELECT seq, row_number() OVER (ORDER BY seq) AS rn FROM telemetry "
            "WHERE fleet = %s AND device_id = %s AND stream = %s AND seq > %s) AS x "
            "WHERE x.seq <> %s + x.rn LIMIT 1",
            (*key, contiguous, contiguous),
        )
        row = self.cursor.fetchone()
        if row is not None:
            return contiguous + int(row[0]) - 1
        self.cursor.execute(
            "SELECT max(seq) FROM telemetry WHERE fleet = %s AND device_id = %s AND stream = %s", key,
        )
        return int(self.cursor.fetchone()[0])

    def _update_counters(self, updates: Sequence[tuple[StreamKey, tuple[int, int, int, int, int]]], now: float) -> None:
        keys = [key for key, _ in updates]
        values = [v for _, v in updates]
        self.cursor.execute(
            "UPDATE ingest_counters AS c SET records = u.r, max_seq = u.m, max_contiguous_seq = u.mc, gaps = u.g, "
            "duplicates = u.dup, last_seen = %s "
            "FROM unnest(%s::text[], %s::text[], %s::text[], %s::bigint[], %s::bigint[], %s::bigint[], %s::bigint[], "
            "%s::bigint[]) AS u(f, d, s, r, m, mc, g, dup) "
            "WHERE c.fleet = u.f AND c.device_id = u.d AND c.stream = u.s",
            (now, *map(list, zip(*keys, strict=True)), *map(list, zip(*values, strict=True))),
        )


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
        if isinstance(exc, psycopg.errors.UntranslatableCharacter) or (
                isinstance(exc, psycopg.DataError) and "NUL" in str(exc)):
            return Unstorable(f"postgresql store: a string holds a NUL character ({str(exc).splitlines()[0]})")
        return StoreError(f"postgresql store: {exc}")
