"""The agent's exception tree.

Every error the device side raises derives from :class:`EdgemlError`. Errors from
dependencies (onnxruntime, LiteRT, sqlite3, paho-mqtt, httpx) are translated at the
module boundary with ``raise ... from exc`` so callers never see them.

    EdgemlError
    ├── ConfigError            a setting is missing or invalid (names the key)
    ├── ModelError
    │   ├── ModelLoadError     corrupt, truncated or unsupported model file
    │   ├── NoModelError       no model is loaded (HTTP 503)
    │   └── InputError         wrong name, shape or type of an input (HTTP 400)
    ├── SignatureError         a signed document or artifact failed verification
    ├── StorageError           the telemetry buffer failed (disk full, corrupt db)
    └── SyncError              MQTT transport failures
        └── BrokerNotFound     no broker URL set and none announced on the LAN

``transient`` tells the recovery an error needs: retry later (True) or report (False).
"""

from __future__ import annotations


class EdgemlError(Exception):
    """Root of every error raised by the edgeml agent."""

    transient: bool = False


class ConfigError(EdgemlError):
    """A setting is invalid. ``key`` names it (dotted path), ``reason`` says why."""

    def __init__(self, key: str, reason: str) -> None:
        self.key = key
        self.reason = reason
        super().__init__(f"invalid setting {key!r}: {reason}")


class ModelError(EdgemlError):
    """Base class of model errors."""


class ModelLoadError(ModelError):
    """The model file cannot be loaded (corrupt, truncated, unsupported)."""


class NoModelError(ModelError):
    """No model is loaded, so no prediction can be made."""

    def __init__(self, message: str = "no model loaded") -> None:
        super().__init__(message)


class InputError(ModelError):
    """The inputs of a prediction do not match the model's signature."""


class SignatureError(EdgemlError):
    """A signature is missing, made by an untrusted key, or does not match the content.

    ``reason`` is machine-readable: ``missing_signature``, ``unknown_key``,
    ``bad_signature``, ``digest_mismatch``, ``malformed`` or ``bad_key`` (a key file or
    PEM that is not an ed25519 key).
    """

    def __init__(self, reason: str, message: str) -> None:
        self.reason = reason
        super().__init__(message)


class StorageError(EdgemlError):
    """The telemetry buffer cannot store or read records."""

    transient = True


class SyncError(EdgemlError):
    """MQTT transport failure."""

    transient = True


class BrokerNotFound(SyncError):
    """No broker URL is configured and none was announced on the LAN."""
