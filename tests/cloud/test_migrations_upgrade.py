"""Schema upgrades: a database left at an older version, with rows in it, opened by the current store."""

from __future__ import annotations

import time

import pytest

from cloud import Store, open_store
from cloud.desired import DesiredStateWriter
from cloud.hil import Counts, HilRunIn, hil_passed, record_run
from cloud.rollouts import _repo as rollout_repo
from cloud.store import MIGRATIONS, Migrations, ModelRecord, StreamCounters, TelemetryBatchIn
from cloud.tokens import Tokens, audit_entries
from edgeml.protocol import ModelRef
from edgeml.protocol.signing import generate_keypair, verify_document

PRIVATE, PUBLIC = generate_keypair()
LATEST = max(m.version for m in MIGRATIONS)
SHA = "ab" * 32
MODEL = ModelRef(name="mlp", version="1.0.0", url="https://cloud/v1/artifacts/" + SHA, sha256=SHA, size=10)


def recs(seqs: range) -> list[dict[str, object]]:
    return [{"seq": s, "ts": 1000.0 + s, "kind": "prediction", "model": "mlp", "version": "1"} for s in seqs]


def model_record(version: str) -> ModelRecord:
    return ModelRecord(
        name="mlp", version=version, format="onnx", runtime="onnxruntime", quantization="float32", size=10,
        sha256=SHA, inputs=[{"name": "input", "shape": [None, 4], "dtype": "float32"}],
        outputs=[{"name": "probs", "shape": [None, 3], "dtype": "float32"}], metrics={"accuracy": 0.9},
        params={}, metadata={"note": "written at an older schema"}, parent=None, dataset_hash="d" * 64,
        signature_key_id=None, created_at=1000.0,
    )


def writer(store: Store) -> DesiredStateWriter:
    return DesiredStateWriter(store, lambda topic, payload: None, PRIVATE, is_leader=lambda: True)


def open_at(url: str, version: int) -> Store:
    """A store whose schema stops at ``version``: the store's own migrations up to it."""
    store = open_store(url, migrate=False)
    applied = Migrations(store, [m for m in MIGRATIONS if m.version <= version]).apply()
    assert applied == list(range(1, version + 1))
    return store


def populate(store: Store, version: int) -> None:
    """Rows of what a coordinator at schema ``version`` stored."""
    store.upsert_device("plant", "dev-1", tags={"site": "a"}, hardware_profile="rpi4", pre_registered=True)
    store.set_status("plant", "dev-1", {"state": "online"}, seen_at=2000.0)
    store.insert_many([TelemetryBatchIn("plant", "dev-1", "s1", recs(range(1, 6)))], received_at=2000.0)
    store.count_error("invalid_json", "edgeml/v1/plant/dev-1/telemetry", 12)
    if version >= 3:
        store.insert_model(model_record("1.0.0"))
        store.set_alias("mlp", "champion", "1.0.0")
    if version >= 4:
        w = writer(store)
        w.set("plant", "dev-1", MODEL)
        w.set("plant", "dev-1", MODEL, expires_in=3600)
    if version >= 5:
        with store.transaction(write=True) as tx:  # the rollout engine's audit entries (no role column yet)
            rollout_repo.audit(tx, "engine", "promote", "r-1", "step 1 healthy", {"step": 1})


def check_upgraded(store: Store, version: int) -> None:
    """Rows written at ``version`` are intact, and the schema's later tables and columns work."""
    device = store.get_device("plant", "dev-1")
    assert (device.tags, device.hardware_profile, device.pre_registered) == ({"site": "a"}, "rpi4", True)
    assert (device.online, device.last_seen, device.status) == (True, 2000.0, {"state": "online"})
    rows = store.query_telemetry("plant", "dev-1", limit=100)
    assert [(r.seq, r.ts, r.body["model"], r.received_at) for r in rows] == [
        (s, 1000.0 + s, "mlp", 2000.0) for s in range(1, 6)]
    assert store.error_counts() == {"invalid_json": 1}
    # ingestion goes on where it stopped: new records counted, old ones recognised as duplicates
    store.insert_many([TelemetryBatchIn("plant", "dev-1", "s1", recs(range(4, 8)))], received_at=3000.0)
    counters = store.device_counters("plant", "dev-1")["s1"]
    assert counters == StreamCounters("s1", 7, 7, 7, 0, 2, counters.first_seen, counters.last_seen)

    if version >= 3:
        assert store.resolve_alias("mlp", "champion").metadata == {"note": "written at an older schema"}
    store.insert_model(model_record("2.0.0"))
    store.set_alias("mlp", "champion", "2.0.0")
    assert store.resolve_alias("mlp", "champion").version == "2.0.0"

    w = writer(store)
    old = w.get("plant", "dev-1")
    if version >= 4:
        assert old is not None and old["revision"] == 2 and old["expires_at"] == old["issued_at"] + 3600
        verify_document(old, PUBLIC)
    else:
        assert old is None
    assert w.set("plant", "dev-1", MODEL)["revision"] == (3 if version >= 4 else 1)  # revisions keep growing

    if version >= 5:  # the old entry has no role (v7 added the column) and still reads as the engine's
        with store.transaction() as tx:
            history = rollout_repo.audit_entries(tx, "r-1")
        assert [(e["actor"], e["action"], e["evidence"]) for e in history] == [("engine", "promote", {"step": 1})]
    secret, _ = Tokens(store).create("ops", "operator")  # API tokens (v7), audited with a role
    assert Tokens(store).verify(secret) is not None
    entries = audit_entries(store)
    assert entries[0]["action"] == "token_create" and entries[0]["role"] is not None
    assert [(e["actor"], e["role"]) for e in entries[1:]] == ([("engine", None)] if version >= 5 else [])

    run = HilRunIn(model="mlp@2.0.0", scenario="smoke", hardware_profile="rpi4", passed=True,
                   counts=Counts(tests=3, failures=0, errors=0))
    record_run(store, run, now=time.time())  # hardware-in-the-loop runs (v8)
    assert hil_passed(store, "mlp", "2.0.0") is True


@pytest.mark.parametrize("version", [1, 4, 6, LATEST - 1])
def test_an_older_database_with_rows_is_upgraded_in_place(store_url: str, version: int) -> None:
    assert version < LATEST
    old = open_at(store_url, version)
    try:
        populate(old, version)
        assert [m.version for m in old.migrations.pending()] == list(range(version + 1, LATEST + 1))
    finally:
        old.close()
    store = open_store(store_url)  # what a new coordinator does at start
    try:
        assert store.migrations.applied() == [m.version for m in MIGRATIONS] and store.migrations.pending() == []
        check_upgraded(store, version)
    finally:
        store.close()
    again = open_store(store_url)  # and the next start finds nothing to do
    try:
        assert again.migrations.apply() == []
        assert again.get_device("plant", "dev-1").tags == {"site": "a"}
    finally:
        again.close()
