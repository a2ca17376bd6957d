"""The coordinator's store for tests that run a whole coordinator.

``cloud_db(tmp)`` is a SQLite file by default. With ``EDGEML_TEST_STORE=postgresql`` it is
a new PostgreSQL database on 127.0.0.1:5432 (dropped when the test session ends), so the
same tests run on both backends::

    scripts/test                                   # SQLite (store tests run on both anyway)
    EDGEML_TEST_STORE=postgresql scripts/test      # whole coordinators on PostgreSQL too
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"
BACKENDS = ("sqlite", "postgresql")
_created: list[str] = []


def backend() -> str:
    name = os.environ.get("EDGEML_TEST_STORE", "sqlite").strip().lower() or "sqlite"
    if name not in BACKENDS:
        raise RuntimeError(f"EDGEML_TEST_STORE={name!r}: expected one of {', '.join(BACKENDS)}")
    return name


def create_pg_database() -> str:
    """A new, empty PostgreSQL database on 127.0.0.1:5432; its URL."""
    import psycopg

    db = f"edgeml_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=5) as conn:
        conn.execute(f"CREATE DATABASE {db}")
    return f"postgresql://postgres@127.0.0.1:5432/{db}"


def drop_pg_database(url: str) -> None:
    import psycopg

    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {url.rsplit('/', 1)[1]} WITH (FORCE)")


def cloud_db(tmp: Path, name: str = "cloud.db") -> str:
    """A store URL for one coordinator (or several replicas sharing it)."""
    if backend() == "sqlite":
        return f"sqlite://{tmp}/{name}"
    import psycopg

    try:
        url = create_pg_database()
    except psycopg.Error as exc:  # asked for explicitly: an error, not a skip
        raise RuntimeError(f"EDGEML_TEST_STORE=postgresql but PostgreSQL at 127.0.0.1:5432 refused: {exc}") from exc
    _created.append(url)
    return url


def drop_created() -> None:
    """Drop the databases ``cloud_db`` created (at the end of the session), each on its own."""
    import logging

    while _created:
        url = _created.pop()
        try:
            drop_pg_database(url)
        except Exception as exc:  # one that will not go must not keep the others
            logging.getLogger(__name__).warning("could not drop %s: %s", url, exc)
