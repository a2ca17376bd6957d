"""Schema migrations: an ordered list of (version, name, SQL per dialect).

``Migrations(store).pending()`` lists what is not applied; ``apply()`` applies it in one
transaction and records each version in ``schema_version``. Concurrent ``apply()`` calls
(replicas starting together) serialise: SQLite on ``BEGIN IMMEDIATE``, PostgreSQL on a
transaction-scoped advisory lock. A version is never applied twice.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .._exceptions import MigrationError, StoreError

if TYPE_CHECKING:
    from ._base import Store

#: Arbitrary key of the PostgreSQL advisory lock taken while migrating.
PG_LOCK_KEY = 0x6564676D6C  # "edgml"


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: dict[str, str]  # dialect -> statements separated by ";\n"

    def statements(self, dialect: str) -> list[str]:
        return [s.strip() for s in self.sql[dialect].split(";\n") if s.strip()]


_V1_SQLITE = """
CREATE TABLE devices (
    fleet TEXT NOT NULL,
    device_id TEXT NOT NULL,
    tags TEXT NOT NULL DEFAULT '{}',
    hardware_profile TEXT,
    registered_at REAL NOT NULL,
    last_seen REAL,
    online INTEGER NOT NULL DEFAULT 0,
    status TEXT,
    reported_state TEXT,
    pre_registered INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (fleet, device_id)
);
CREATE TABLE telemetry (
    fleet TEXT NOT NULL,
    device_id TEXT NOT NULL,
    stream TEXT NOT NULL,
    seq INTEGER NOT NULL,
    ts REAL NOT NULL,
    kind TEXT NOT NULL,
    body TEXT NOT NULL,
    received_at REAL NOT NULL,
    PRIMARY KEY (fleet, device_id, stream, seq)
) WITHOUT ROWID;
CREATE TABLE ingest_counters (
    fleet TEXT NOT NULL,
    device_id TEXT NOT NULL,
    stream TEXT NOT NULL,
    records INTEGER NOT NULL DEFAULT 0,
    max_seq INTEGER NOT NULL DEFAULT 0,
    max_contiguous_seq INTEGER NOT NULL DEFAULT 0,
    gaps INTEGER NOT NULL DEFAULT 0,
    duplicates INTEGER NOT NULL DEFAULT 0,
    first_seen REAL NOT NULL,
    last_seen REAL NOT NULL,
    PRIMARY KEY (fleet, device_id, stream)
);
CREATE TABLE ingest_errors (
    reason TEXT PRIMARY KEY,
    count INTEGER NOT NULL,
    last_ts REAL NOT NULL
);
CREATE TABLE poison_messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    ts REAL NOT NULL,
    topic TEXT NOT NULL,
    reason TEXT NOT NULL,
    detail TEXT NOT NULL,
    size INTEGER NOT NULL
)
"""

_V1_POSTGRESQL = """
CREATE TABLE devices (
    fleet TEXT NOT NULL,
    device_id TEXT NOT NULL,
    tags JSONB NOT NULL DEFAULT '{}',
    hardware_profile TEXT,
    registered_at DOUBLE PRECISION NOT NULL,
    last_seen DOUBLE PRECISION,
    online BOOLEAN NOT NULL DEFAULT FALSE,
    status JSONB,
    reported_state JSONB,
    pre_registered BOOLEAN NOT NULL DEFAULT FALSE,
    PRIMARY KEY (fleet, device_id)
);
CREATE TABLE telemetry (
    fleet TEXT NOT NULL,
    device_id TEXT NOT NULL,
    stream TEXT NOT NULL,
    seq BIGINT NOT NULL,
    ts DOUBLE PRECISION NOT NULL,
    kind TEXT NOT NULL,
    body JSONB NOT NULL,
    received_at DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (fleet, device_id, stream, seq)
);
CREATE TABLE ingest_counters (
    fleet TEXT NOT NULL,
    device_id TEXT NOT NULL,
    stream TEXT NOT NULL,
    records BIGINT NOT NULL DEFAULT 0,
    max_seq BIGINT NOT NULL DEFAULT 0,
    max_contiguous_seq BIGINT NOT NULL DEFAULT 0,
    gaps BIGINT NOT NULL DEFAULT 0,
    duplicates BIGINT NOT NULL DEFAULT 0,
    first_seen DOUBLE PRECISION NOT NULL,
    last_seen DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (fleet, device_id, stream)
);
CREATE TABLE ingest_errors (
    reason TEXT PRIMARY KEY,
    count BIGINT NOT NULL,
    last_ts DOUBLE PRECISION NOT NULL
);
CREATE TABLE poison_messages (
    id BIGSERIAL PRIMARY KEY,
    ts DOUBLE PRECISION NOT NULL,
    topic TEXT NOT NULL,
    reason TEXT NOT NULL,
    detail TEXT NOT NULL,
    size BIGINT NOT NULL
)
"""

_V2_BOTH = "CREATE INDEX telemetry_by_ts ON telemetry (fleet, device_id, ts)"

_V3_SQLITE = """
CREATE TABLE models (
    name TEXT NOT NULL,
    version TEXT NOT NULL,
    format TEXT NOT NULL,
    runtime TEXT NOT NULL,
    quantization TEXT NOT NULL,
    size INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    inputs TEXT NOT NULL,
    outputs TEXT NOT NULL,
    metrics TEXT NOT NULL DEFAULT '{}',
    params TEXT NOT NULL DEFAULT '{}',
    metadata TEXT NOT NULL DEFAULT '{}',
    parent_name TEXT,
    parent_version TEXT,
    dataset_hash TEXT,
    signature_key_id TEXT,
    created_at REAL NOT NULL,
    PRIMARY KEY (name, version)
);
CREATE INDEX models_by_sha256 ON models (sha256);
CREATE TABLE model_aliases (
    name TEXT NOT NULL,
    alias TEXT NOT NULL,
    version TEXT NOT NULL,
    updated_at REAL NOT NULL,
    PRIMARY KEY (name, alias),
    FOREIGN KEY (name, version) REFERENCES models (name, version)
);
CREATE INDEX telemetry_by_kind_ts ON telemetry (kind, ts)
"""

_V3_POSTGRESQL = """
CREATE TABLE models (
    name TEXT NOT NULL,
    version TEXT NOT NULL,
    format TEXT NOT NULL,
    runtime TEXT NOT NULL,
    quantization TEXT NOT NULL,
    size BIGINT NOT NULL,
    sha256 TEXT NOT NULL,
    inputs JSONB NOT NULL,
    outputs JSONB NOT NULL,
    metrics JSONB NOT NULL DEFAULT '{}',
    params JSONB NOT NULL DEFAULT '{}',
    metadata JSONB NOT NULL DEFAULT '{}',
    parent_name TEXT,
    parent_version TEXT,
    dataset_hash TEXT,
    signature_key_id TEXT,
    created_at DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (name, version)
);
CREATE INDEX models_by_sha256 ON models (sha256);
CREATE TABLE model_aliases (
    name TEXT NOT NULL,
    alias TEXT NOT NULL,
    version TEXT NOT NULL,
    updated_at DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (name, alias),
    FOREIGN KEY (name, version) REFERENCES models (name, version)
);
CREATE INDEX telemetry_by_kind_ts ON telemetry (kind, ts)
"""

_V4_SQLITE = """
CREATE TABLE desired_states (
    fleet TEXT NOT NULL,
    device_id TEXT NOT NULL,
    revision INTEGER NOT NULL,
    payload TEXT,
    updated_at REAL NOT NULL,
    PRIMARY KEY (fleet, device_id)
)
"""

_V4_POSTGRESQL = """
CREATE TABLE desired_states (
    fleet TEXT NOT NULL,
    device_id TEXT NOT NULL,
    revision BIGINT NOT NULL,
    payload TEXT,
    updated_at DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (fleet, device_id)
)
"""

MIGRATIONS: list[Migration] = [
    Migration(1, "devices, telemetry, counters, errors", {"sqlite": _V1_SQLITE, "postgresql": _V1_POSTGRESQL}),
    Migration(2, "telemetry by time", {"sqlite": _V2_BOTH, "postgresql": _V2_BOTH}),
    Migration(3, "model registry, aliases, events by time", {"sqlite": _V3_SQLITE, "postgresql": _V3_POSTGRESQL}),
    Migration(4, "desired states (signed documents, revisions)", {"sqlite": _V4_SQLITE, "postgresql": _V4_POSTGRESQL}),
]

# >>> ROLLOUTS (migration 5): rollouts, cohort membership, verdicts and the audit log (cloud.rollouts)
_V5 = """
CREATE TABLE rollouts (
    id TEXT PRIMARY KEY,
    fleet TEXT NOT NULL,
    model_ref TEXT NOT NULL,
    baseline_ref TEXT,
    strategy TEXT NOT NULL,
    selector TEXT NOT NULL,
    steps TEXT NOT NULL,
    policy TEXT NOT NULL,
    salt TEXT NOT NULL,
    state TEXT NOT NULL,
    step INTEGER NOT NULL,
    step_started_at {real} NOT NULL,
    created_at {real} NOT NULL,
    updated_at {real} NOT NULL,
    created_by TEXT NOT NULL,
    approvals TEXT NOT NULL DEFAULT '[]',
    result TEXT NOT NULL DEFAULT '{{}}',
    reason TEXT
);
CREATE TABLE rollout_devices (
    rollout_id TEXT NOT NULL REFERENCES rollouts (id),
    device_id TEXT NOT NULL,
    bucket INTEGER NOT NULL,
    cohort TEXT NOT NULL,
    joined_step INTEGER,
    previous_ref TEXT,
    revision BIGINT,
    deployed_at {real},
    applied INTEGER NOT NULL DEFAULT 0,
    reverted INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (rollout_id, device_id)
);
CREATE TABLE rollout_verdicts (
    id {serial},
    rollout_id TEXT NOT NULL REFERENCES rollouts (id),
    step INTEGER NOT NULL,
    gate TEXT NOT NULL,
    verdict TEXT NOT NULL,
    evidence TEXT NOT NULL,
    ts {real} NOT NULL
);
CREATE INDEX rollout_verdicts_by_rollout ON rollout_verdicts (rollout_id, id);
CREATE TABLE audit_log (
    id {serial},
    ts {real} NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    rollout_id TEXT,
    reason TEXT NOT NULL,
    evidence TEXT NOT NULL DEFAULT '{{}}'
);
CREATE INDEX audit_log_by_rollout ON audit_log (rollout_id, id)
"""
MIGRATIONS.append(Migration(5, "rollouts, cohorts, verdicts, audit log", {
    "sqlite": _V5.format(real="REAL", serial="INTEGER PRIMARY KEY AUTOINCREMENT"),
    "postgresql": _V5.format(real="DOUBLE PRECISION", serial="BIGSERIAL PRIMARY KEY"),
}))
# <<< ROLLOUTS

# >>> TRAINING (migration 6): training runs, drift measurements and continuous-training triggers
# (IF NOT EXISTS throughout: before this migration, training created its tables on first use)
_V6 = """
CREATE TABLE IF NOT EXISTS training_runs (
    run_id TEXT PRIMARY KEY, name TEXT NOT NULL, status TEXT NOT NULL, recipe TEXT NOT NULL,
    recipe_sha256 TEXT NOT NULL, dataset_hash TEXT, code_version TEXT NOT NULL, metrics TEXT,
    artifacts TEXT, result TEXT, error TEXT, started_at DOUBLE PRECISION NOT NULL,
    finished_at DOUBLE PRECISION
);
CREATE TABLE IF NOT EXISTS training_epochs (
    run_id TEXT NOT NULL, epoch INTEGER NOT NULL, loss DOUBLE PRECISION NOT NULL,
    train_accuracy DOUBLE PRECISION NOT NULL, test_accuracy DOUBLE PRECISION NOT NULL,
    seconds DOUBLE PRECISION NOT NULL, PRIMARY KEY (run_id, epoch)
);
CREATE TABLE IF NOT EXISTS training_snapshots (
    hash TEXT PRIMARY KEY, summary TEXT NOT NULL, path TEXT NOT NULL, created_at DOUBLE PRECISION NOT NULL
);
CREATE TABLE IF NOT EXISTS drift_measurements (
    id TEXT PRIMARY KEY, ts DOUBLE PRECISION NOT NULL, fleet TEXT NOT NULL, model TEXT NOT NULL,
    version TEXT NOT NULL, cohort TEXT NOT NULL, status TEXT NOT NULL, psi DOUBLE PRECISION,
    doc TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS drift_measurements_by_model ON drift_measurements (model, version, cohort, ts);
CREATE INDEX IF NOT EXISTS drift_measurements_by_ts ON drift_measurements (ts);
CREATE TABLE IF NOT EXISTS training_triggers (
    id TEXT PRIMARY KEY, ts DOUBLE PRECISION NOT NULL, model TEXT NOT NULL, kind TEXT NOT NULL,
    reason TEXT NOT NULL, status TEXT NOT NULL, parent TEXT, run_id TEXT, evidence TEXT NOT NULL,
    outcome TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS training_triggers_by_model ON training_triggers (model, ts)
"""
MIGRATIONS.append(Migration(6, "training runs, drift measurements, retraining triggers",
                            {"sqlite": _V6, "postgresql": _V6}))
# <<< TRAINING

# >>> AUTH (migration 7): API tokens (only their sha256 is stored) and the actor's role in the audit log
_V7 = """
CREATE TABLE api_tokens (
    name TEXT PRIMARY KEY,
    role TEXT NOT NULL,
    token_sha256 TEXT NOT NULL UNIQUE,
    created_at {real} NOT NULL,
    created_by TEXT NOT NULL,
    revoked_at {real}
);
ALTER TABLE audit_log ADD COLUMN role TEXT;
CREATE INDEX audit_log_by_ts ON audit_log (ts)
"""
MIGRATIONS.append(Migration(7, "API tokens, roles in the audit log", {
    "sqlite": _V7.format(real="REAL"), "postgresql": _V7.format(real="DOUBLE PRECISION"),
}))
# <<< AUTH

# >>> HIL (migration 8): hardware-in-the-loop runs reported by `edgeml hil run --report` (cloud/hil.py)
_V8 = """
CREATE TABLE hil_runs (
    id {serial},
    model_name TEXT NOT NULL,
    model_version TEXT NOT NULL,
    scenario TEXT NOT NULL,
    hardware_profile TEXT NOT NULL,
    target TEXT NOT NULL,
    passed INTEGER NOT NULL,
    tests INTEGER NOT NULL,
    failures INTEGER NOT NULL,
    errors INTEGER NOT NULL,
    skipped INTEGER NOT NULL,
    doc TEXT NOT NULL,
    ts {real} NOT NULL
);
CREATE INDEX hil_runs_by_model ON hil_runs (model_name, model_version, id)
"""
MIGRATIONS.append(Migration(8, "hardware-in-the-loop runs", {
    "sqlite": _V8.format(real="REAL", serial="INTEGER PRIMARY KEY AUTOINCREMENT"),
    "postgresql": _V8.format(real="DOUBLE PRECISION", serial="BIGSERIAL PRIMARY KEY"),
}))
# <<< HIL

_CREATE_VERSION_TABLE = (
    "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at {real} NOT NULL)"
)


class Migrations:
    """``pending()`` and ``apply()`` over a store's schema."""

    def __init__(self, store: Store, migrations: list[Migration] | None = None) -> None:
        self.store = store
        self.migrations = sorted(migrations if migrations is not None else MIGRATIONS, key=lambda m: m.version)

    def applied(self) -> list[int]:
        with self.store.transaction(write=True) as tx:  # it may create schema_version
            return self._applied(tx)

    def pending(self) -> list[Migration]:
        done = set(self.applied())
        return [m for m in self.migrations if m.version not in done]

    def apply(self) -> list[int]:
        """Apply every pending migration in one transaction; return the versions applied."""
        dialect = self.store.dialect
        try:
            with self.store.transaction(write=True) as tx:
                done = set(self._applied(tx))
                todo = [m for m in self.migrations if m.version not in done]
                for m in todo:
                    for statement in m.statements(dialect):
                        tx.execute(statement)
                    tx.execute(
                        "INSERT INTO schema_version (version, name, applied_at) VALUES (?, ?, ?)",
                        (m.version, m.name, time.time()),
                    )
                return [m.version for m in todo]
        except StoreError as exc:
            raise MigrationError(f"schema migration failed: {exc}") from exc

    def _applied(self, tx: object) -> list[int]:
        if self.store.dialect == "postgresql":  # CREATE TABLE IF NOT EXISTS races without it
            tx.execute("SELECT pg_advisory_xact_lock(?)", (PG_LOCK_KEY,))  # type: ignore[attr-defined]
        real = "DOUBLE PRECISION" if self.store.dialect == "postgresql" else "REAL"
        tx.execute(_CREATE_VERSION_TABLE.format(real=real))  # type: ignore[attr-defined]
        rows = tx.execute("SELECT version FROM schema_version ORDER BY version").fetchall()  # type: ignore[attr-defined]
        return [r[0] for r in rows]
