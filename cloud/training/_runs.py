"""Experiment tracking in the coordinator's store: runs, per-epoch metrics, snapshots.

The tables are the store's migration 6 (``training_runs``, ``training_epochs``,
``training_snapshots``). A run row is written (``running``) before the
training starts and finished (``succeeded``/``failed``) after, so a crash leaves a run
visibly unfinished rather than missing.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from .._exceptions import NotFound
from ..store import Store

__all__ = ["RunRecord", "RunStore", "compare_runs"]

_RUN_COLUMNS = ("run_id, name, status, recipe, recipe_sha256, dataset_hash, code_version, metrics, artifacts, "
                "result, error, started_at, finished_at")


def _dumps(value: Any) -> str | None:
    return None if value is None else orjson.dumps(value).decode()


def _loads(value: Any) -> Any:
    return orjson.loads(value) if isinstance(value, str | bytes) else value


@dataclass(frozen=True)
class RunRecord:
    run_id: str
    name: str
    status: str
    recipe: dict[str, Any]
    recipe_sha256: str
    dataset_hash: str | None
    code_version: dict[str, Any]
    metrics: dict[str, Any]
    artifacts: dict[str, Any]
    result: dict[str, Any]
    error: str | None
    started_at: float
    finished_at: float | None
    epochs: tuple[dict[str, Any], ...] = ()

    def as_json(self) -> dict[str, Any]:
        from dataclasses import asdict

        doc = asdict(self)
        doc["epochs"] = list(self.epochs)
        return doc


class RunStore:
    """Runs of one coordinator store (SQLite or PostgreSQL)."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def start(self, name: str, recipe: Mapping[str, Any], recipe_sha256: str, code_version: Mapping[str, Any]) -> str:
        run_id = f"run-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:6]}"
        with self.store.transaction(write=True) as tx:
            tx.execute(
                f"INSERT INTO training_runs ({_RUN_COLUMNS}) VALUES (?, ?, 'running', ?, ?, NULL, ?, NULL, NULL, NULL, NULL, ?, NULL)",
                (run_id, name, _dumps(dict(recipe)), recipe_sha256, _dumps(dict(code_version)), time.time()),
            )
        return run_id

    def set_code_version(self, run_id: str, code_version: Mapping[str, Any]) -> None:
        with self.store.transaction(write=True) as tx:
            tx.execute("UPDATE training_runs SET code_version = ? WHERE run_id = ?", (_dumps(dict(code_version)), run_id))

    def set_dataset(self, run_id: str, digest: str, summary: Mapping[str, Any], path: str) -> None:
        with self.store.transaction(write=True) as tx:
            tx.execute("UPDATE training_runs SET dataset_hash = ? WHERE run_id = ?", (digest, run_id))
            if tx.execute("SELECT 1 FROM training_snapshots WHERE hash = ?", (digest,)).fetchone() is None:
                tx.execute("INSERT INTO training_snapshots (hash, summary, path, created_at) VALUES (?, ?, ?, ?)",
                           (digest, _dumps(dict(summary)), path, time.time()))

    def add_epoch(self, run_id: str, epoch: Mapping[str, Any]) -> None:
        with self.store.transaction(write=True) as tx:
            tx.execute(
                "INSERT INTO training_epochs (run_id, epoch, loss, train_accuracy, test_accuracy, seconds) VALUES (?, ?, ?, ?, ?, ?)",
                (run_id, epoch["epoch"], epoch["loss"], epoch["train_accuracy"], epoch["test_accuracy"], epoch["seconds"]),
            )

    def finish(self, run_id: str, *, metrics: Mapping[str, Any], artifacts: Mapping[str, Any], result: Mapping[str, Any]) -> None:
        self._end(run_id, "succeeded", metrics, artifacts, result, None)

    def fail(self, run_id: str, error: str) -> None:
        self._end(run_id, "failed", None, None, None, error)

    def _end(self, run_id: str, status: str, metrics: Any, artifacts: Any, result: Any, error: str | None) -> None:
        with self.store.transaction(write=True) as tx:
            tx.execute(
                "UPDATE training_runs SET status = ?, metrics = ?, artifacts = ?, result = ?, error = ?, finished_at = ? WHERE run_id = ?",
                (status, _dumps(metrics), _dumps(artifacts), _dumps(result), error, time.time(), run_id),
            )

    def get(self, run_id: str) -> RunRecord:
        with self.store.transaction() as tx:
            row = tx.execute(f"SELECT {_RUN_COLUMNS} FROM training_runs WHERE run_id = ?", (run_id,)).fetchone()
            if row is None:
                raise NotFound(f"no training run {run_id!r}")
            epochs = tx.execute(
                "SELECT epoch, loss, train_accuracy, test_accuracy, seconds FROM training_epochs WHERE run_id = ? ORDER BY epoch",
                (run_id,),
            ).fetchall()
        return _run(row, tuple({"epoch": e[0], "loss": e[1], "train_accuracy": e[2], "test_accuracy": e[3], "seconds": e[4]}
                               for e in epochs))

    def list(self, name: str | None = None) -> list[RunRecord]:
        sql = f"SELECT {_RUN_COLUMNS} FROM training_runs"
        params: tuple[Any, ...] = ()
        if name is not None:
            sql += " WHERE name = ?"
            params = (name,)
        with self.store.transaction() as tx:
            rows = tx.execute(sql + " ORDER BY started_at, run_id", params).fetchall()
        return [_run(r) for r in rows]

    def snapshot(self, digest: str) -> dict[str, Any]:
        with self.store.transaction() as tx:
            row = tx.execute("SELECT summary, path FROM training_snapshots WHERE hash = ?", (digest,)).fetchone()
        if row is None:
            raise NotFound(f"no snapshot {digest}")
        return {**_loads(row[0]), "path": row[1]}


def _run(row: Any, epochs: tuple[dict[str, Any], ...] = ()) -> RunRecord:
    return RunRecord(
        run_id=row[0], name=row[1], status=row[2], recipe=_loads(row[3]), recipe_sha256=row[4], dataset_hash=row[5],
        code_version=_loads(row[6]), metrics=_loads(row[7]) or {}, artifacts=_loads(row[8]) or {},
        result=_loads(row[9]) or {}, error=row[10], started_at=row[11], finished_at=row[12], epochs=epochs,
    )


def _flatten(doc: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(doc, Mapping):
        out: dict[str, Any] = {}
        for key, value in doc.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: doc}


def compare_runs(a: RunRecord, b: RunRecord) -> dict[str, Any]:
    """Recipe keys that differ, metrics side by side (with b - a), data and code of each."""
    ra, rb = _flatten(a.recipe), _flatten(b.recipe)
    params = {k: {"a": ra.get(k), "b": rb.get(k)} for k in sorted(ra.keys() | rb.keys()) if ra.get(k) != rb.get(k)}
    ma, mb = _flatten(a.metrics), _flatten(b.metrics)
    metrics = {}
    for key in sorted(ma.keys() | mb.keys()):
        va, vb = ma.get(key), mb.get(key)
        entry: dict[str, Any] = {"a": va, "b": vb}
        if isinstance(va, int | float) and isinstance(vb, int | float) and not isinstance(va, bool) and not isinstance(vb, bool):
            entry["delta"] = vb - va
        metrics[key] = entry
    return {
        "a": a.run_id, "b": b.run_id,
        "status": {"a": a.status, "b": b.status},
        "same_dataset": a.dataset_hash == b.dataset_hash,
        "dataset_hash": {"a": a.dataset_hash, "b": b.dataset_hash},
        "code_version": {"a": a.code_version, "b": b.code_version},
        "params": params,
        "metrics": metrics,
        "epochs": {"a": len(a.epochs), "b": len(b.epochs)},
    }
