"""edgeml device agent: local quantized inference, durable telemetry, MQTT sync.

The public API is small::

    from edgeml import Agent, load_config
    with Agent(load_config("agent.yaml")) as agent:
        agent.predict({"input": [[0.1, 0.2, 0.3, 0.4]]})

Everything else lives in private modules; ``edgeml.protocol`` is the wire protocol
shared with the coordinator.
"""

__version__ = "0.1.0"

from ._config import AgentConfig, load_config  # noqa: E402
from ._exceptions import (  # noqa: E402
    BrokerNotFound,
    ConfigError,
    EdgemlError,
    InputError,
    ModelError,
    ModelLoadError,
    NoModelError,
    StorageError,
    SyncError,
)
from .agent import Agent, Prediction  # noqa: E402


def __getattr__(name: str) -> object:
    # the HTTP client (httpx) is for applications; the agent itself does not load it
    if name in ("AgentClient", "AgentUnavailable"):
        from . import client

        return getattr(client, name)
    raise AttributeError(f"module 'edgeml' has no attribute {name!r}")

__all__ = [
    "Agent",
    "AgentClient",
    "AgentConfig",
    "AgentUnavailable",
    "BrokerNotFound",
    "ConfigError",
    "EdgemlError",
    "InputError",
    "ModelError",
    "ModelLoadError",
    "NoModelError",
    "Prediction",
    "StorageError",
    "SyncError",
    "__version__",
    "load_config",
]
