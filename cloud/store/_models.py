"""Value objects the store reads and writes."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple


class InsertResult(NamedTuple):
    """What one insert did: rows stored, and records that were already there."""

    inserted: int
    duplicates: int


class TelemetryBatchIn(NamedTuple):
    """Records of one (fleet, device, stream) to insert. Each record has seq, ts, kind."""

    fleet: str
    device: str
    stream: str
    records: Sequence[Mapping[str, Any]]


@dataclass(frozen=True, slots=True)
class Device:
    fleet: str
    device_id: str
    tags: dict[str, Any]
    hardware_profile: str | None
    registered_at: float
    last_seen: float | None
    online: bool
    status: dict[str, Any] | None
    reported_state: dict[str, Any] | None
    pre_registered: bool


@dataclass(frozen=True, slots=True)
class StreamCounters:
    """Ingestion counters of one (fleet, device, stream).

    ``records`` distinct seqs stored; ``max_seq`` the highest seen; ``max_contiguous_seq``
    the largest k with 1..k all stored; ``gaps`` seqs missing below ``max_seq``
    (``max_seq - records``); ``duplicates`` records received again and not stored.
    """

    stream: str
    records: int
    max_seq: int
    max_contiguous_seq: int
    gaps: int
    duplicates: int
    first_seen: float
    last_seen: float


@dataclass(frozen=True, slots=True)
class TelemetryRow:
    fleet: str
    device_id: str
    stream: str
    seq: int
    ts: float
    kind: str
    body: dict[str, Any]
    received_at: float


@dataclass(frozen=True, slots=True)
class PoisonRecord:
    """One rejected message (the store keeps the most recent ones)."""

    ts: float
    topic: str
    reason: str
    detail: str
    size: int


@dataclass(frozen=True, slots=True)
class ModelRecord:
    """One registered model version (unique by ``name`` and ``version``).

    ``inputs``/``outputs`` are the signature as read from the file (name, shape, dtype,
    scale, zero_point); ``parent`` is ``"name@version"`` of the model it was derived from;
    ``signature_key_id`` names the fleet key that signed the artifact (None: unsigned);
    ``aliases`` the aliases pointing at this version when it was read.
    """

    name: str
    version: str
    format: str
    runtime: str
    quantization: str
    size: int
    sha256: str
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    metrics: dict[str, Any]
    params: dict[str, Any]
    metadata: dict[str, Any]
    parent: str | None
    dataset_hash: str | None
    signature_key_id: str | None
    created_at: float
    aliases: tuple[str, ...] = ()

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"


@dataclass(frozen=True, slots=True)
class DeviceTotals:
    """Ingestion counters of a device summed over its streams."""

    records: int = 0
    max_contiguous_seq: int = 0
    gaps: int = 0
    duplicates: int = 0
    last_seen: float | None = None
