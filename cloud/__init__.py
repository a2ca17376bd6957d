"""edgeml cloud coordinator.

    from cloud import Ingestor, open_store
    store = open_store("sqlite:///var/lib/edgeml/cloud.db")
    with Ingestor(store, broker_url="mqtt://broker:1883"):
        ...

Everything else lives in private modules; ``cloud.store`` is the storage interface.
"""

from ._exceptions import (
    CloudError,
    ConfigError,
    Conflict,
    IngestError,
    MigrationError,
    NotFound,
    PoisonMessage,
    StoreError,
)
from .ingest import IngestConfig, Ingestor, IngestStats
from .store import Store, open_store

__all__ = [
    "CloudError",
    "ConfigError",
    "Conflict",
    "IngestConfig",
    "IngestError",
    "IngestStats",
    "Ingestor",
    "MigrationError",
    "NotFound",
    "PoisonMessage",
    "Store",
    "StoreError",
    "open_store",
]
