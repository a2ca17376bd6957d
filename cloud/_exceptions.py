"""The coordinator's exception tree.

Every error the cloud side raises derives from :class:`CloudError`. Errors from
dependencies (sqlite3, psycopg, paho-mqtt) are translated at the module boundary with
``raise ... from exc`` so callers never see them.

    CloudError
    ├── ConfigError        a setting or URL is invalid
    ├── StoreError         the store failed (database down, locked, disk full); transient
    │   ├── NotFound       no such row (a device that was never registered)
    │   ├── Conflict       a write contradicts what is stored
    │   ├── Unstorable     a value no store can keep (a NUL character, a lone surrogate); HTTP 400
    │   └── MigrationError a schema migration failed; fatal
    ├── IngestError        the ingestor cannot run (broker refused, not started)
    │   └── PoisonMessage  one message is unusable; ``reason`` names why (counted, acked, skipped)
    ├── InvalidInput       a caller's input is malformed (name, version, reference, JSON); HTTP 400
    ├── InvalidModel       a model file is corrupt, truncated or of an unsupported format
    ├── NotLeader          this replica does not lead: only the leader writes desired states; HTTP 409
    ├── PublishError       the broker did not acknowledge a desired state; transient, HTTP 503
    ├── SigningKeyMissing  no signing key: desired states must be signed; HTTP 503
    ├── KeyFileError       a signing key cannot be written
    │   └── KeyFileExists  refusing to overwrite a key (pass force=True)
    ├── ArtifactError      the artifact store cannot read or write (disk full); transient
        ├── InvalidDigest        not a sha256 (64 lowercase hex characters); HTTP 400
        ├── ArtifactNotFound     no artifact (or signature) with that sha256; HTTP 404
        └── RangeNotSatisfiable  a Range header outside the file; HTTP 416
    └── RolloutError       a rollout request cannot be carried out (cloud.rollouts)
        ├── PolicyError          a rollout policy is invalid (names the bad key); HTTP 400
        └── InvalidTransition    the action is not allowed in the rollout's state; HTTP 409

``transient`` tells the recovery an error needs: retry later (True) or report (False).
"""

from __future__ import annotations

from typing import Any


class CloudError(Exception):
    """Root of every error raised by the edgeml coordinator."""

    transient: bool = False


class ConfigError(CloudError):
    """A setting or URL is invalid."""


class StoreError(CloudError):
    """The store cannot read or write (connection lost, database locked, disk full)."""

    transient = True


class NotFound(StoreError):
    """The row asked for does not exist."""

    transient = False


class Conflict(StoreError):
    """The write contradicts what is stored."""

    transient = False


class Unstorable(StoreError):
    """A value the store cannot keep: a string holding a NUL character (``\\u0000``,
    which PostgreSQL's text and jsonb refuse) or a lone UTF-16 surrogate (not UTF-8).
    In JSON values (tags, states, metadata) and for surrogates both stores refuse it
    alike; a NUL in a plain text field is refused by PostgreSQL only (SQLite keeps it)."""

    transient = False


class MigrationError(StoreError):
    """A schema migration failed; the store is left at the previous version."""

    transient = False


class IngestError(CloudError):
    """The ingestor cannot run."""

    transient = True


class PoisonMessage(IngestError):
    """A message that can never be ingested. ``reason`` is its counter name."""

    transient = False

    def __init__(self, reason: str, detail: str = "") -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


class InvalidInput(CloudError):
    """A caller's input is malformed (a bad name, version, reference or JSON): HTTP 400, CLI exit 2."""


class NotLeader(CloudError):
    """This replica is not the leader: only the leader writes desired states. Retry on the leader."""

    transient = True


class PublishError(CloudError):
    """The broker did not acknowledge a publish in time (or refused it). Retry later.

    ``documents``: what was stored before the publish failed (desired states in a batch)."""

    transient = True

    def __init__(self, message: str, documents: list[dict[str, Any]] | None = None) -> None:
        super().__init__(message)
        self.documents = documents or []


class SigningKeyMissing(CloudError):
    """The coordinator has no signing key, and desired states must be signed."""


class InvalidModel(CloudError):
    """A model file cannot be inspected: corrupt, truncated or of an unsupported format."""


class KeyFileError(CloudError):
    """A signing key file cannot be written."""


class KeyFileExists(KeyFileError):
    """A key file already exists; overwriting it needs ``force=True``."""


class ArtifactError(CloudError):
    """The artifact store cannot read or write (disk full, permissions)."""

    transient = True


class InvalidDigest(ArtifactError):
    """A sha256 that is not 64 lowercase hex characters."""

    transient = False


class ArtifactNotFound(ArtifactError):
    """No artifact (or no signature) is stored under that sha256."""

    transient = False


class RangeNotSatisfiable(ArtifactError):
    """A Range header that selects no byte of the file. ``size`` is the file's length."""

    transient = False

    def __init__(self, header: str, size: int) -> None:
        self.header = header
        self.size = size
        super().__init__(f"range {header!r} is outside the file ({size} bytes)")


# >>> ROLLOUTS: errors of cloud.rollouts
class RolloutError(CloudError):
    """A rollout request cannot be carried out."""


class PolicyError(RolloutError):
    """A rollout policy (YAML or JSON) is invalid; the message names the bad key."""


class InvalidTransition(RolloutError):
    """The action is not allowed in the rollout's current state (e.g. resume a completed rollout)."""

    def __init__(self, rollout_id: str, state: str, action: str) -> None:
        self.rollout_id = rollout_id
        self.state = state
        self.action = action
        super().__init__(f"rollout {rollout_id} is {state}: cannot {action} it")
# <<< ROLLOUTS
