"""The update lifecycle as one transition table, persisted before every action.

    idle ──desired──► downloading ──downloaded──► verifying ──verified──► installing
      ▲                    │ failed                  │ failed                │ healthy / failed
      │◄───────────────────┴─────────────────────────┘◄──────────────────────┤
      │                                                                      ▼
      │◄──passed── probation ◄──switched── switching ◄───────────────────────┘
      │               │ failed
      └◄─rolled_back─ rolling_back

``resume`` (the agent started while an update was running) maps each state to
itself: every action is idempotent and safe to repeat, and the active model only
changes inside ``switching`` and ``rolling_back`` by one atomic rename. Until the
switch, the device keeps serving its verified model; after it, the previous verified
model stays on disk as the rollback target.
"""

from __future__ import annotations

import contextlib
import enum
import json
import sqlite3
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from .._exceptions import StorageError


class State(enum.StrEnum):
    IDLE = "idle"
    DOWNLOADING = "downloading"
    VERIFYING = "verifying"
    INSTALLING = "installing"
    SWITCHING = "switching"
    PROBATION = "probation"
    ROLLING_BACK = "rolling_back"


class Event(enum.StrEnum):
    DESIRED = "desired"
    DOWNLOADED = "downloaded"
    VERIFIED = "verified"
    HEALTHY = "healthy"
    SWITCHED = "switched"
    PASSED = "passed"
    FAILED = "failed"
    ROLLED_BACK = "rolled_back"
    RESUME = "resume"


S, E = State, Event

#: (state, event) -> next state. Nothing else moves the machine.
TRANSITIONS: dict[tuple[State, Event], State] = {
    (S.IDLE, E.DESIRED): S.DOWNLOADING,
    (S.DOWNLOADING, E.DOWNLOADED): S.VERIFYING,
    (S.DOWNLOADING, E.FAILED): S.IDLE,
    (S.VERIFYING, E.VERIFIED): S.INSTALLING,
    (S.VERIFYING, E.FAILED): S.IDLE,
    (S.INSTALLING, E.HEALTHY): S.SWITCHING,
    (S.INSTALLING, E.FAILED): S.IDLE,
    (S.SWITCHING, E.SWITCHED): S.PROBATION,
    (S.SWITCHING, E.FAILED): S.ROLLING_BACK,  # the pointer may already name the candidate
    (S.ROLLING_BACK, E.FAILED): S.IDLE,  # nothing to return to: stay on the active model
    (S.PROBATION, E.PASSED): S.IDLE,
    (S.PROBATION, E.FAILED): S.ROLLING_BACK,
    (S.ROLLING_BACK, E.ROLLED_BACK): S.IDLE,
    **{(state, E.RESUME): state for state in State},
}


class InvalidTransition(RuntimeError):
    """A (state, event) pair the table does not allow: a bug, never user input."""


def next_state(state: State, event: Event) -> State:
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        raise InvalidTransition(f"no transition from {state.value} on {event.value}") from None


@dataclass(frozen=True)
class UpdateRecord:
    """Everything needed to resume an update after a crash (one SQLite row)."""

    state: State = State.IDLE
    revision: int | None = None
    target: dict[str, Any] | None = None  # the desired ModelRef
    document: dict[str, Any] | None = None  # the desired state as received (signed)
    candidate: dict[str, Any] | None = None  # ModelInfo of the verified candidate
    result: str | None = None
    reason: str | None = None
    started_at: float | None = None
    updated_at: float | None = None
    probation_started: float | None = None
    crashes: int = 0
    applied_revision: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["state"] = self.state.value
        return doc

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> UpdateRecord:
        return cls(**{**doc, "state": State(doc["state"])})


class UpdateLog:
    """The persisted record (one row) plus a history of transitions, in ``updates.db``."""

    def __init__(self, path: Path) -> None:
        try:
            self._conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=FULL")
            self._conn.execute("CREATE TABLE IF NOT EXISTS current (id INTEGER PRIMARY KEY CHECK (id = 1), doc TEXT)")
            self._conn.execute(
                "CREATE TABLE IF NOT EXISTS history (id INTEGER PRIMARY KEY, ts REAL, state TEXT, event TEXT,"
                " revision INTEGER, reason TEXT)"
            )
        except sqlite3.Error as exc:
            raise StorageError(f"cannot open update log {path}: {exc}") from exc

    def load(self) -> UpdateRecord:
        row = self._conn.execute("SELECT doc FROM current WHERE id = 1").fetchone()
        return UpdateRecord.from_json(json.loads(row[0])) if row else UpdateRecord()

    def save(self, record: UpdateRecord, event: Event | None = None) -> UpdateRecord:
        """Commit ``record`` (fsync) before the caller acts on it."""
        record = replace(record, updated_at=time.time())
        try:
            self._conn.execute("BEGIN IMMEDIATE")
            self._conn.execute("INSERT OR REPLACE INTO current VALUES (1, ?)", (json.dumps(record.to_json()),))
            self._conn.execute(
                "INSERT INTO history (ts, state, event, revision, reason) VALUES (?, ?, ?, ?, ?)",
                (record.updated_at, record.state.value, event.value if event else None, record.revision, record.reason),
            )
            self._conn.execute("DELETE FROM history WHERE id <= (SELECT max(id) - 1000 FROM history)")
            self._conn.execute("COMMIT")
        except sqlite3.Error as exc:
            with contextlib.suppress(sqlite3.Error):
                self._conn.execute("ROLLBACK")
            raise StorageError(f"cannot save the update state: {exc}") from exc
        return record

    def history(self, limit: int = 100) -> list[dict[str, Any]]:
        rows = self._conn.execute(
            "SELECT ts, state, event, revision, reason FROM history ORDER BY id DESC LIMIT ?", (limit,)
        ).fetchall()
        return [dict(zip(("ts", "state", "event", "revision", "reason"), r, strict=True)) for r in reversed(rows)]

    def close(self) -> None:
        self._conn.close()
