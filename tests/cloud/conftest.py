"""Store fixtures: every store test runs on SQLite and on a throwaway PostgreSQL database."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest

from cloud import Store, open_store

from .._stores import PG_ADMIN, create_pg_database, drop_pg_database


def _pg_available() -> bool:
    try:
        psycopg.connect(PG_ADMIN, connect_timeout=3).close()
        return True
    except psycopg.Error:
        return False


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A URL of an empty store: a SQLite file, or a new PostgreSQL database dropped after."""
    if request.param == "sqlite":
        yield f"sqlite://{tmp_path}/cloud.db"
        return
    if not _pg_available():
        pytest.skip("PostgreSQL is not reachable at 127.0.0.1:5432")
    url = create_pg_database()
    try:
        yield url
    finally:
        drop_pg_database(url)


@pytest.fixture
def make_store(store_url: str) -> Iterator[Callable[[], Store]]:
    """Open stores on ``store_url`` (each one its own connections, like a replica)."""
    opened: list[Store] = []

    def make() -> Store:
        opened.append(open_store(store_url))
        return opened[-1]

    yield make
    for s in opened:
        s.close()


@pytest.fixture
def store(make_store: Callable[[], Store]) -> Store:
    return make_store()
