"""Coordinator storage: devices, telemetry and ingestion counters behind one interface.

    store = open_store("sqlite:///var/lib/edgeml/cloud.db")   # or a plain path
    store = open_store("postgresql://edgeml@db/edgeml")       # shared by replicas
    store.insert_telemetry("plant", "dev-1", stream, records)  # -> InsertResult(inserted, duplicates)

``open_store`` applies pending schema migrations unless ``migrate=False``; see
``store.migrations.pending()`` / ``.apply()``.
"""

from __future__ import annotations

from urllib.parse import parse_qs, urlsplit

from .._exceptions import ConfigError
from ._base import Store, Transaction
from ._migrations import MIGRATIONS, Migration, Migrations
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

__all__ = [
    "MIGRATIONS",
    "Device",
    "DeviceTotals",
    "InsertResult",
    "Migration",
    "Migrations",
    "ModelRecord",
    "PoisonRecord",
    "Store",
    "StreamCounters",
    "TelemetryBatchIn",
    "TelemetryRow",
    "Transaction",
    "open_store",
]


def open_store(url: str, *, migrate: bool = True) -> Store:
    """Open ``sqlite:///path`` (or a plain path) or ``postgresql://...``."""
    parts = urlsplit(url)
    if parts.scheme in ("postgresql", "postgres"):
        from ._postgres import PostgresStore

        store: Store = PostgresStore(url)
    elif parts.scheme in ("sqlite", ""):
        from ._sqlite import SQLiteStore

        path = parts.path if parts.scheme else url
        if parts.scheme == "sqlite" and path.startswith("//"):  # sqlite:////abs/path
            path = path[1:]
        options = {k: v[-1] for k, v in parse_qs(parts.query).items()} if parts.scheme else {}
        if not path:
            raise ConfigError(f"no database path in {url!r}")
        store = SQLiteStore(path, synchronous=options.get("synchronous", "full"))
    else:
        raise ConfigError(f"unsupported store URL {url!r}: use sqlite:///path or postgresql://...")
    if migrate:
        store.migrations.apply()
    return store
