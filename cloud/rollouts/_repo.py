"""Rows of the rollout tables (migration 5), read and written inside a store transaction."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from .._exceptions import NotFound
from ..store import Transaction
from ._machine import RolloutState
from ._policy import Policy, parse_policy

_COLUMNS = ("id, fleet, model_ref, baseline_ref, strategy, selector, steps, policy, salt, state, step, "
            "step_started_at, created_at, updated_at, created_by, approvals, result, reason")


def dumps(value: Any) -> str:
    return orjson.dumps(value, option=orjson.OPT_SERIALIZE_NUMPY).decode()


def loads(value: Any) -> Any:
    return orjson.loads(value) if isinstance(value, str | bytes) else value


@dataclass(frozen=True, slots=True)
class Rollout:
    id: str
    fleet: str
    model_ref: str
    baseline_ref: str | None
    strategy: str
    selector: str
    steps: tuple[float, ...]
    policy: Policy
    salt: str
    state: RolloutState
    step: int
    step_started_at: float
    created_at: float
    updated_at: float
    created_by: str
    approvals: list[dict[str, Any]]
    result: dict[str, Any]
    reason: str | None

    @property
    def percent(self) -> float:
        return self.steps[min(self.step, len(self.steps) - 1)]

    @property
    def last_step(self) -> bool:
        return self.step >= len(self.steps) - 1


def _rollout(row: Sequence[Any]) -> Rollout:
    return Rollout(
        id=row[0], fleet=row[1], model_ref=row[2], baseline_ref=row[3], strategy=row[4], selector=row[5],
        steps=tuple(loads(row[6])), policy=parse_policy(loads(row[7])), salt=row[8], state=RolloutState(row[9]),
        step=int(row[10]), step_started_at=row[11], created_at=row[12], updated_at=row[13], created_by=row[14],
        approvals=loads(row[15]), result=loads(row[16]), reason=row[17],
    )


def insert_rollout(tx: Transaction, r: Rollout) -> None:
    tx.execute(
        f"INSERT INTO rollouts ({_COLUMNS}) VALUES ({', '.join('?' * 18)})",
        (r.id, r.fleet, r.model_ref, r.baseline_ref, r.strategy, r.selector, dumps(list(r.steps)),
         dumps(r.policy.model_dump(mode="json")), r.salt, r.state.value, r.step, r.step_started_at, r.created_at,
         r.updated_at, r.created_by, dumps(r.approvals), dumps(r.result), r.reason),
    )


def get_rollout(tx: Transaction, rollout_id: str, *, lock: bool = False) -> Rollout:
    row = tx.execute(f"SELECT {_COLUMNS} FROM rollouts WHERE id = ?{tx.for_update if lock else ''}",
                     (rollout_id,)).fetchone()
    if row is None:
        raise NotFound(f"no rollout {rollout_id}")
    return _rollout(row)


def list_rollouts(tx: Transaction, states: Sequence[str] | None = None) -> list[Rollout]:
    sql, params = f"SELECT {_COLUMNS} FROM rollouts", ()
    if states:
        sql += f" WHERE state IN ({', '.join('?' * len(states))})"
        params = tuple(states)
    return [_rollout(r) for r in tx.execute(sql + " ORDER BY created_at", params).fetchall()]


def update_rollout(tx: Transaction, r: Rollout) -> None:
    tx.execute(
        "UPDATE rollouts SET state = ?, step = ?, step_started_at = ?, updated_at = ?, approvals = ?, result = ?, "
        "reason = ? WHERE id = ?",
        (r.state.value, r.step, r.step_started_at, time.time(), dumps(r.approvals), dumps(r.result), r.reason, r.id),
    )


def insert_devices(tx: Transaction, rollout_id: str, rows: Sequence[tuple[str, int, str | None]]) -> None:
    for device, bucket, previous in rows:
        tx.execute("INSERT INTO rollout_devices (rollout_id, device_id, bucket, cohort, previous_ref) "
                   "VALUES (?, ?, ?, 'baseline', ?)", (rollout_id, device, bucket, previous))


def audit(tx: Transaction, actor: str, action: str, rollout_id: str | None, reason: str,
          evidence: Any = None) -> None:
    tx.execute("INSERT INTO audit_log (ts, actor, action, rollout_id, reason, evidence) VALUES (?, ?, ?, ?, ?, ?)",
               (time.time(), actor, action, rollout_id, reason, dumps(evidence or {})))


def audit_entries(tx: Transaction, rollout_id: str) -> list[dict[str, Any]]:
    """The rollout's own history (what the engine and the commands did). The API's record of
    each HTTP request (``role`` set: who called, allowed or not) is in ``GET /v1/audit``."""
    rows = tx.execute("SELECT ts, actor, action, reason, evidence FROM audit_log WHERE rollout_id = ? "
                      "AND role IS NULL ORDER BY id", (rollout_id,)).fetchall()
    return [{"ts": r[0], "actor": r[1], "action": r[2], "reason": r[3], "evidence": loads(r[4])} for r in rows]


def insert_verdicts(tx: Transaction, rollout_id: str, step: int, verdicts: Sequence[Any]) -> None:
    now = time.time()
    for v in verdicts:
        tx.execute("INSERT INTO rollout_verdicts (rollout_id, step, gate, verdict, evidence, ts) VALUES (?, ?, ?, ?, ?, ?)",
                   (rollout_id, step, v.gate, v.verdict, dumps(v.evidence), now))


def verdicts(tx: Transaction, rollout_id: str) -> list[dict[str, Any]]:
    rows = tx.execute("SELECT step, gate, verdict, evidence, ts FROM rollout_verdicts WHERE rollout_id = ? ORDER BY id",
                      (rollout_id,)).fetchall()
    return [{"step": r[0], "gate": r[1], "verdict": r[2], "evidence": loads(r[3]), "ts": r[4]} for r in rows]
