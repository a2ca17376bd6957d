"""edgeml cloud coordinator.

    from cloud import Coordinator, load_cloud_config
    with Coordinator(load_cloud_config("cloud.yaml")) as coordinator:
        print(coordinator.url)

or its pieces:

    from cloud import Ingestor, open_store
    store = open_store("sqlite:///var/lib/edgeml/cloud.db")
    with Ingestor(store, broker_url="mqtt://broker:1883"):
        ...

Everything else lives in private modules; ``cloud.store`` is the storage interface.
"""

from ._config import CloudConfig, load_cloud_config
from ._exceptions import (
    CloudError,
    ConfigError,
    Conflict,
    IngestError,
    InvalidInput,
    MigrationError,
    NotFound,
    NotLeader,
    PoisonMessage,
    PublishError,
    SigningKeyMissing,
    StoreError,
    Unstorable,
)
from .coordinator import Coordinator
from .ingest import IngestConfig, Ingestor, IngestStats
from .store import Store, open_store

__all__ = [
    "CloudConfig",
    "CloudError",
    "ConfigError",
    "Conflict",
    "Coordinator",
    "IngestConfig",
    "IngestError",
    "IngestStats",
    "Ingestor",
    "InvalidInput",
    "MigrationError",
    "NotFound",
    "NotLeader",
    "PoisonMessage",
    "PublishError",
    "SigningKeyMissing",
    "Store",
    "StoreError",
    "Unstorable",
    "load_cloud_config",
    "open_store",
]
