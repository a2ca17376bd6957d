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
