"""Hardware-in-the-loop runs of models, and the gate a rollout asks before its canary starts.

One run is one scenario's result for a model ``name@version`` on one hardware profile
(target, passed, counts, JUnit summary), as ``edgeml hil run --report URL`` posts it
(the REST routes are in ``cloud.api._hil``). The table is migration 8 (``hil_runs``).

:func:`hil_passed` is the rollout engine's question: did this model pass its HIL suite?
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

import orjson
from pydantic import BaseModel, ConfigDict, Field

from ._exceptions import InvalidInput
from .registry.models import parse_ref
from .store import Store

_COLUMNS = "id, model_name, model_version, scenario, hardware_profile, target, passed, tests, failures, errors, skipped, doc, ts"


class Counts(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tests: int = Field(ge=0)
    failures: int = Field(ge=0)
    errors: int = Field(ge=0)
    skipped: int = Field(0, ge=0)


class HilRunIn(BaseModel):
    """One scenario's result against one model on one hardware profile."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="name@version", min_length=3, max_length=300)
    scenario: str = Field(min_length=1, max_length=64)
    hardware_profile: str = Field(min_length=1, max_length=200)
    target: str = Field("local", max_length=300)
    passed: bool
    counts: Counts
    junit: Counts | None = Field(None, description="the JUnit XML's totals (tests, failures, errors, skipped)")
    summary: dict[str, Any] = Field(default_factory=dict)


def _split(ref: str) -> tuple[str, str]:
    if ref.count("@") != 1:
        raise InvalidInput(f"model must be name@version, got {ref!r}")
    return parse_ref(ref)


def record_run(store: Store, run: HilRunIn, now: float | None = None) -> dict[str, Any]:
    name, version = _split(run.model)
    doc = {"junit": run.junit.model_dump() if run.junit else None, "summary": run.summary}
    c = run.counts
    with store.transaction(write=True) as tx:
        row = tx.execute(
            "INSERT INTO hil_runs (model_name, model_version, scenario, hardware_profile, target, passed, tests, "
            "failures, errors, skipped, doc, ts) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING " + _COLUMNS,
            (name, version, run.scenario, run.hardware_profile, run.target, int(run.passed), c.tests, c.failures,
             c.errors, c.skipped, orjson.dumps(doc).decode(), now or time.time()),
        ).fetchone()
    return _run_json(row)


def list_runs(store: Store, name: str | None = None, version: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
    where, params = _where(name, version)
    with store.transaction() as tx:
        rows = tx.execute(f"SELECT {_COLUMNS} FROM hil_runs{where} ORDER BY id DESC LIMIT ?", (*params, limit)).fetchall()
    return [_run_json(r) for r in rows]


def hil_passed(
    store: Store, name: str, version: str, *, scenarios: Iterable[str] | None = None,
    hardware_profiles: Iterable[str] | None = None,
) -> bool | None:
    """Did ``name@version`` pass its HIL suite?

    The latest run of each (scenario, hardware profile) decides for that pair. None: no
    run recorded (of the given scenarios/profiles, if named); False: a pair's latest run
    failed, or a named scenario x profile pair has no run; True: every pair passed.
    """
    verdicts = _latest(store, name, version)
    if scenarios is not None or hardware_profiles is not None:
        wanted_s = set(scenarios) if scenarios is not None else {s for s, _ in verdicts}
        wanted_p = set(hardware_profiles) if hardware_profiles is not None else {p for _, p in verdicts}
        pairs = {(s, p) for s in wanted_s for p in wanted_p}
        if not any(pair in verdicts for pair in pairs):
            return None
        return all(verdicts.get(pair, False) for pair in pairs)
    if not verdicts:
        return None
    return all(verdicts.values())


def _latest(store: Store, name: str, version: str) -> dict[tuple[str, str], bool]:
    with store.transaction() as tx:
        rows = tx.execute(
            "SELECT scenario, hardware_profile, passed FROM hil_runs WHERE model_name = ? AND model_version = ? "
            "ORDER BY id", (name, version)).fetchall()
    return {(r[0], r[1]): bool(r[2]) for r in rows}  # later rows win


def _where(name: str | None, version: str | None) -> tuple[str, tuple[str, ...]]:
    if name and version:
        return " WHERE model_name = ? AND model_version = ?", (name, version)
    if name:
        return " WHERE model_name = ?", (name,)
    return "", ()


def _run_json(row: Any) -> dict[str, Any]:
    doc = orjson.loads(row[11])
    return {
        "id": row[0], "model": f"{row[1]}@{row[2]}", "scenario": row[3], "hardware_profile": row[4], "target": row[5],
        "passed": bool(row[6]), "counts": {"tests": row[7], "failures": row[8], "errors": row[9], "skipped": row[10]},
        "junit": doc.get("junit"), "summary": doc.get("summary"), "ts": row[12],
    }


def verdicts(store: Store, name: str, version: str) -> dict[tuple[str, str], bool]:
    """The latest verdict of each (scenario, hardware profile) of ``name@version``."""
    return _latest(store, name, version)


__all__ = ["Counts", "HilRunIn", "hil_passed", "list_runs", "record_run", "verdicts"]
