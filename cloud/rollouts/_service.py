"""The rollout engine: start, act on commands, and ``tick()`` the running rollouts.

    service = RolloutService(store, desired_states, registry)
    r = service.start("mlp@2.0.0", "canary", "env=prod", steps=[5, 25, 100], actor="ana")
    service.tick()          # the coordinator runs this on a thread (start_background)
    service.status(r["id"])

Devices are driven only through ``DesiredStates.deploy`` (signed, retained documents),
and only while this replica is the leader (``desired.is_leader``): a follower's tick
does nothing. Each action is persisted (state + audit entry) in the same transaction
that decides it; ``promoting``/``rolling_back`` are written before the documents and
resumed by the next tick after a crash.

A step is *done* when each member's reported state shows the step's desired revision
applied (``applied_revision``), or the update failed/rolled back (the health gate sees
it), or the device is offline. Offline devices are never waited for: their document
is retained on the broker and they take it when they return. Gates then compare the
canary cohort (prediction records of the candidate version) with the baseline cohort
(the other targets) over the window since the step started, once ``min_dwell_s`` has
passed. Devices registered after the start are not targeted.

Feedback records (labels fed back by applications) give the accuracy gate its samples.
A policy's maintenance ``windows`` hold every deployment (a step, a promotion, a
blue/green flip) while the clock is outside them: the rollout stays ``promoting``, its
``reason`` and ``result.waiting`` say until when; rollbacks are never held.

Strategies: ``canary``/``phased`` follow the steps and promote on pass; ``ab`` keeps a
fixed split (the first step), reports differences with confidence intervals and waits
for a person's ``promote``; ``bluegreen`` preloads the candidate as the shadow of every
target, ``promote`` flips them all, ``rollback`` flips back; ``shadow`` runs the
candidate in shadow on the cohort and finishes when the agreement gate passes; it never
serves.
"""

from __future__ import annotations

import datetime
import logging
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any, Protocol

from .._exceptions import (
    CloudError,
    InvalidTransition,
    NotLeader,
    PolicyError,
    SigningKeyMissing,
)
from ..store import Store, Transaction
from . import _repo as repo
from ._gates import FAIL, INCONCLUSIVE, PASS, CohortSamples, Verdict, ab_report, evaluate, overall
from ._machine import ACTIVE, RolloutEvent, RolloutState, next_state
from ._policy import STRATEGIES, Policy, parse_policy
from ._targeting import bucket, parse_selector

log = logging.getLogger(__name__)

E, S = RolloutEvent, RolloutState
ENGINE = "engine"
#: Gates each strategy evaluates (the rest of a policy's gates are ignored for it).
STRATEGY_GATES: dict[str, set[str]] = {
    "canary": {"latency_p95", "error_rate", "psi", "accuracy", "health"},
    "phased": {"latency_p95", "error_rate", "psi", "accuracy", "health"},
    "ab": {"health"},
    "bluegreen": set(),
    "shadow": {"shadow_agreement", "health"},
}

#: Documents written between two commits of the deployment progress.
DEPLOY_CHUNK = 50

#: Gates that need no baseline cohort.
NON_COMPARATIVE = {"health", "shadow_agreement"}


class Deployer(Protocol):
    """What the engine needs of :class:`cloud._desired_states.DesiredStates`."""

    @property
    def is_leader(self) -> bool: ...

    def deploy(self, fleet: str, device: str, model: str | None, shadow: str | None = None) -> dict[str, Any]: ...

    def deploy_many(
        self, fleet: str, items: Sequence[tuple[str, str | None, str | None]],
    ) -> Mapping[str, dict[str, Any] | CloudError]: ...


class RolloutService:
    def __init__(self, store: Store, desired: Deployer, registry: Any, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.desired = desired
        self.registry = registry
        self.clock = clock
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ commands
    def start(self, model_ref: str, strategy: str, selector: str, *, steps: Sequence[float] | None = None,
              policy: Policy | dict[str, Any] | None = None, actor: str, fleet: str = "default",
              reason: str = "", salt: str | None = None) -> dict[str, Any]:
        """Start a rollout; ``salt`` fixes the cohorts (default: a random one per rollout)."""
        if not getattr(self.desired, "enabled", True):
            raise SigningKeyMissing("rollouts write signed desired states, and this coordinator has no signing key")
        if strategy not in STRATEGIES:
            raise PolicyError(f"strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
        pol = _policy_for(strategy, policy, steps)
        sel = parse_selector(selector)
        model = self.registry.resolve(model_ref)
        if pol.hil.required:
            self._check_hil(model, pol)
        now = self.clock()
        with self._lock, self.store.transaction(write=True) as tx:
            targets = sel.select(tx.list_devices(fleet))
            if not targets:
                raise PolicyError(f"selector {selector!r} matches no device of fleet {fleet!r}")
            actives = {d.device_id: _active_ref(d.reported_state) for d in targets}
            common = Counter(a for a in actives.values() if a and a != model.ref).most_common(1)
            rid = uuid.uuid4().hex[:12]
            waiting = pol.approval.before_start
            r = repo.Rollout(
                id=rid, fleet=fleet, model_ref=model.ref, baseline_ref=common[0][0] if common else None,
                strategy=strategy, selector=sel.text, steps=pol.steps, policy=pol, salt=salt or uuid.uuid4().hex,
                state=S.PENDING_APPROVAL if waiting else S.PROMOTING, step=0, step_started_at=now, created_at=now,
                updated_at=now, created_by=actor, approvals=[], result={}, reason=reason or None,
            )
            repo.insert_rollout(tx, r)
            repo.insert_devices(tx, rid, [(d, bucket(d, r.salt), a if a != model.ref else None)
                                          for d, a in sorted(actives.items())])
            repo.audit(tx, actor, "start", rid, reason or f"{strategy} rollout of {model.ref} to {sel.text}",
                       {"targets": len(targets), "steps": list(pol.steps), "baseline": r.baseline_ref,
                        "state": r.state.value})
        return self.status(rid)

    def _check_hil(self, model: Any, pol: Policy) -> None:
        """The policy's HIL gate: the latest recorded run of each required scenario (and profile) passed."""
        from ..hil import hil_passed

        verdict = hil_passed(self.store, model.name, model.version, scenarios=pol.hil.scenarios,
                             hardware_profiles=pol.hil.hardware_profiles)
        if verdict is not True:
            wanted = ", ".join(pol.hil.scenarios) if pol.hil.scenarios else "its HIL scenarios"
            why = "no HIL run is recorded" if verdict is None else "its latest HIL run failed (or one is missing)"
            raise PolicyError(f"the policy requires {model.ref} to pass {wanted} before a rollout; {why} "
                              f"(edgeml hil run SCENARIO --report URL)")

    def pause(self, rollout_id: str, actor: str, reason: str = "") -> dict[str, Any]:
        return self._command(rollout_id, E.PAUSE, actor, reason)

    def resume(self, rollout_id: str, actor: str, reason: str = "") -> dict[str, Any]:
        return self._command(rollout_id, E.RESUME, actor, reason)

    def abort(self, rollout_id: str, actor: str, reason: str = "") -> dict[str, Any]:
        """Stop where it is: devices keep the documents they have (use ``rollback`` to undo)."""
        return self._command(rollout_id, E.ABORT, actor, reason)

    def rollback(self, rollout_id: str, actor: str, reason: str = "") -> dict[str, Any]:
        return self._command(rollout_id, E.ROLLBACK, actor, reason)

    def approve(self, rollout_id: str, actor: str, reason: str = "") -> dict[str, Any]:
        return self._command(rollout_id, E.APPROVE, actor, reason)

    def promote(self, rollout_id: str, actor: str, reason: str = "") -> dict[str, Any]:
        """Go to the next step now (gates or not); on blue/green, flip the fleet."""
        return self._command(rollout_id, E.PROMOTE, actor, reason)

    def _command(self, rollout_id: str, event: RolloutEvent, actor: str, reason: str) -> dict[str, Any]:
        with self._lock, self.store.transaction(write=True) as tx:
            r = repo.get_rollout(tx, rollout_id, lock=True)
            flip = r.strategy == "bluegreen" and r.step == 0  # blue/green: promote = the flip
            if event is E.PROMOTE and r.state in (S.RUNNING, S.PAUSED) and r.last_step and not flip:
                if r.state is S.PAUSED:
                    raise InvalidTransition(r.id, r.state.value, "promote past the last step of")
                event = E.FINISH
            target = next_state(r.state, event)
            if target is None:
                raise InvalidTransition(r.id, r.state.value, event.value)
            changes: dict[str, Any] = {"state": target}
            if event is E.APPROVE:
                changes["approvals"] = [*r.approvals, {"actor": actor, "ts": self.clock(), "step": r.step}]
            if event is E.PROMOTE:
                changes["step"] = r.step + 1
            if event is E.PROMOTE and r.strategy == "bluegreen":
                tx.execute("UPDATE rollout_devices SET deployed_at = NULL, applied = 0 WHERE rollout_id = ?", (r.id,))
            if target is S.ROLLING_BACK:
                tx.execute("UPDATE rollout_devices SET reverted = 0 WHERE rollout_id = ?", (r.id,))
            self._move(tx, replace(r, **changes), actor, event.value, reason or f"{event.value} by {actor}")
        return self.status(rollout_id)

    # ------------------------------------------------------------------ queries
    def status(self, rollout_id: str) -> dict[str, Any]:
        with self.store.transaction() as tx:
            r = repo.get_rollout(tx, rollout_id)
            rows = tx.execute("SELECT cohort, COUNT(*), SUM(applied), SUM(reverted) FROM rollout_devices "
                              "WHERE rollout_id = ? GROUP BY cohort", (rollout_id,)).fetchall()
            doc = _summary(r)
            doc["cohorts"] = {c: {"devices": int(n), "applied": int(a or 0), "reverted": int(v or 0)}
                              for c, n, a, v in rows}
            doc["verdicts"] = repo.verdicts(tx, rollout_id)
            doc["audit"] = repo.audit_entries(tx, rollout_id)
            doc["policy"] = r.policy.model_dump(mode="json")
        return doc

    def list(self) -> list[dict[str, Any]]:
        with self.store.transaction() as tx:
            return [_summary(r) for r in repo.list_rollouts(tx)]

    # ------------------------------------------------------------------ the engine
    def tick(self) -> int:
        """Advance every active rollout once; return how many moved. Leader only."""
        if not self.desired.is_leader:
            return 0
        with self.store.transaction() as tx:
            ids = [r.id for r in repo.list_rollouts(tx, [s.value for s in ACTIVE])]
        moved = 0
        for rid in ids:
            try:
                with self._lock:
                    moved += self._advance(rid)
            except NotLeader:
                return moved
            except CloudError as exc:
                log.warning("rollout %s: tick failed (retrying next tick): %s", rid, exc)
            except Exception:  # a bug or bad data in one rollout must not stop the others
                log.exception("rollout %s: tick failed unexpectedly (retrying next tick)", rid)
        return moved

    def start_background(self, interval_s: float = 5.0) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, args=(interval_s,), name="edgeml-rollouts", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _loop(self, interval_s: float) -> None:  # the rollout thread
        while not self._stop.wait(interval_s):
            try:
                self.tick()
            except CloudError as exc:
                log.warning("rollout tick failed: %s", exc)
            except Exception:  # the thread lives on: the next tick tries again
                log.exception("rollout tick failed unexpectedly")

    def _advance(self, rid: str) -> int:
        with self.store.transaction() as tx:
            r = repo.get_rollout(tx, rid)
        if r.state is S.PROMOTING:
            if not r.policy.in_window(self.clock()):
                return self._wait_for_window(r)
            self._deploy_step(r)
            return 1
        if r.state is S.ROLLING_BACK:
            self._revert(r)
            return 1
        if r.state is S.RUNNING:
            return self._judge(r)
        return 0

    def _wait_for_window(self, r: repo.Rollout) -> int:
        """Outside every maintenance window: keep ``promoting`` and say until when (audited once)."""
        opens = r.policy.next_window(self.clock())
        why = "outside the maintenance windows" + (f"; the next opens at {_utc(opens)}" if opens else "")
        with self.store.transaction(write=True) as tx:
            current = repo.get_rollout(tx, r.id, lock=True)
            if current.state is not S.PROMOTING or (current.result.get("waiting") or {}).get("next_window") == opens:
                return 0
            waiting = {"why": "maintenance_window", "since": self.clock(), "next_window": opens}
            self._move(tx, replace(current, result={**current.result, "waiting": waiting}), ENGINE, "wait_window",
                       why, {"next_window": opens, "windows": [w.model_dump() for w in r.policy.windows]})
        return 0

    def _deploy_step(self, r: repo.Rollout) -> None:
        percent = 100.0 if r.strategy == "bluegreen" else r.percent
        with self.store.transaction(write=True) as tx:
            tx.execute("UPDATE rollout_devices SET cohort = 'canary', joined_step = ? WHERE rollout_id = ? "
                       "AND cohort = 'baseline' AND bucket < ?", (r.step, r.id, round(percent * 100)))
            todo = tx.execute("SELECT device_id, previous_ref FROM rollout_devices WHERE rollout_id = ? "
                              "AND cohort = 'canary' AND deployed_at IS NULL ORDER BY device_id", (r.id,)).fetchall()
        for start in range(0, len(todo), DEPLOY_CHUNK):
            chunk = todo[start:start + DEPLOY_CHUNK]
            revisions = self._deploy_many(r, [(device, *self._documents(r, previous)) for device, previous in chunk])
            done = [(self.clock(), revisions.get(device), r.id, device) for device, _ in chunk]
            with self.store.transaction(write=True) as tx:  # a crash re-sends at most one chunk (idempotent)
                for row in done:
                    tx.execute("UPDATE rollout_devices SET deployed_at = ?, revision = ? WHERE rollout_id = ? "
                               "AND device_id = ?", row)
        with self.store.transaction(write=True) as tx:
            current = repo.get_rollout(tx, r.id, lock=True)
            if current.state is S.PROMOTING:
                result = {k: v for k, v in current.result.items() if k != "waiting"}
                self._move(tx, replace(current, state=S.RUNNING, step_started_at=self.clock(), result=result), ENGINE,
                           "step_started", f"step {r.step + 1}/{len(r.steps)} ({percent:g} %) deployed to "
                           f"{len(todo)} new device(s)", {"step": r.step, "percent": percent, "deployed": len(todo)})

    def _documents(self, r: repo.Rollout, previous: str | None) -> tuple[str | None, str | None]:
        current = previous or r.baseline_ref
        if r.strategy == "shadow" or (r.strategy == "bluegreen" and r.step == 0):
            return current, r.model_ref  # the candidate as the shadow: preloaded, compared, never served
        return r.model_ref, None

    def _deploy_many(self, r: repo.Rollout, items: list[tuple[str, str | None, str | None]]) -> dict[str, int | None]:
        """Issue a chunk's documents in one batch; each device's revision, None for a device
        that cannot take it (unknown device, ...), which is then not waited for."""
        if not items:
            return {}
        revisions: dict[str, int | None] = {}
        for device, outcome in self.desired.deploy_many(r.fleet, items).items():
            if isinstance(outcome, CloudError):
                log.warning("rollout %s: cannot deploy to %s/%s: %s", r.id, r.fleet, device, outcome)
                revisions[device] = None
            else:
                revisions[device] = int(outcome["revision"])
        return revisions

    def _send_back(self, r: repo.Rollout) -> int:
        """Every canary device not sent back yet gets its previous model again, with no shadow
        (chunk by chunk, each chunk marked once its documents are out); how many."""
        with self.store.transaction() as tx:
            todo = tx.execute("SELECT device_id, previous_ref FROM rollout_devices WHERE rollout_id = ? "
                              "AND cohort = 'canary' AND reverted = 0 ORDER BY device_id", (r.id,)).fetchall()
        for start in range(0, len(todo), DEPLOY_CHUNK):
            chunk = todo[start:start + DEPLOY_CHUNK]
            self._deploy_many(r, [(device, target, None) for device, previous in chunk
                                  if (target := previous or r.baseline_ref) is not None])
            with self.store.transaction(write=True) as tx:
                for device, _ in chunk:
                    tx.execute("UPDATE rollout_devices SET reverted = 1 WHERE rollout_id = ? AND device_id = ?",
                               (r.id, device))
        return len(todo)

    def _revert(self, r: repo.Rollout) -> None:
        sent = self._send_back(r)
        with self.store.transaction(write=True) as tx:
            current = repo.get_rollout(tx, r.id, lock=True)
            if current.state is S.ROLLING_BACK:
                self._move(tx, replace(current, state=S.ROLLED_BACK), ENGINE, "rolled_back",
                           f"{sent} device(s) sent back to their previous model", {"devices": sent})

    # ------------------------------------------------------------------ judging a step
    def _judge(self, r: repo.Rollout) -> int:
        progress = self._progress(r)
        dwelled = self.clock() - r.step_started_at >= r.policy.min_dwell_s
        if not dwelled or progress["pending"] > 0:
            return 0
        if r.strategy == "bluegreen":
            return self._finish(r, "blue/green flipped") if r.step >= 1 else 0  # preloaded: waits for promote
        if r.last_step and r.strategy != "shadow":
            return self._finish(r, f"every target runs {r.model_ref}")
        if progress["members"] == 0 and r.strategy != "ab":  # a small fleet: this step drew nobody
            with self.store.transaction(write=True) as tx:
                current = repo.get_rollout(tx, r.id, lock=True)
                if current.state is S.RUNNING and current.step == r.step:
                    self._next_step(tx, current, f"step {r.step + 1} ({r.percent:g} %) drew no device", {})
            return 1
        canary, baseline = self.collect(r)
        gates = STRATEGY_GATES[r.strategy]
        if progress["baseline"] == 0:  # a small fleet: the step drew every target; nothing to compare with
            gates = gates & NON_COMPARATIVE
        results = evaluate(r.policy, canary, baseline, gates)
        locks = None
        if r.policy.test == "fixed":
            results, locks = _lock_verdicts(r, results)
        decision = overall(results)
        evidence = {"decision": decision, "gates": {v.gate: v.verdict for v in results}, "progress": progress}
        if r.strategy == "ab":
            evidence["ab"] = ab_report(canary, baseline, r.policy.confidence, r.policy.min_samples)
        with self.store.transaction(write=True) as tx:
            current = repo.get_rollout(tx, r.id, lock=True)
            if current.state is not S.RUNNING or current.step != r.step:
                return 0  # a command got there first
            if locks is not None:
                current = replace(current, result={**current.result, "gate_locks": locks})
            current = replace(current, result={**current.result, "last_evaluation": {
                "ts": self.clock(), **evidence, "verdicts": [{"gate": v.gate, "verdict": v.verdict, "evidence": v.evidence} for v in results]}})
            moved = self._act(tx, current, decision, results, evidence)
        if moved and r.strategy == "shadow" and decision == PASS:
            self._remove_shadow(r)
        return moved

    def _remove_shadow(self, r: repo.Rollout) -> None:
        """A passed shadow rollout stops the shadow on its cohort (it has said what it had to say)."""
        sent = self._send_back(r)
        with self.store.transaction(write=True) as tx:
            repo.audit(tx, ENGINE, "shadow_removed", r.id, f"shadow {r.model_ref} stopped on {sent} device(s)",
                       {"devices": sent})

    def _act(self, tx: Transaction, r: repo.Rollout, decision: str, results: list[Any],
             evidence: dict[str, Any]) -> int:
        pol = r.policy
        if decision == FAIL:
            repo.insert_verdicts(tx, r.id, r.step, results)
            failed = ", ".join(v.gate for v in results if v.verdict == FAIL)
            event = E.FAIL if pol.on_fail == "rollback" else E.PAUSE
            if event is E.FAIL:
                tx.execute("UPDATE rollout_devices SET reverted = 0 WHERE rollout_id = ?", (r.id,))
            self._move(tx, replace(r, state=next_state(r.state, event)), ENGINE, "rollback" if event is E.FAIL
                       else "pause", f"gate(s) failed at step {r.step + 1}: {failed}", evidence)
            return 1
        if decision == INCONCLUSIVE:
            timed_out = pol.inconclusive_timeout_s is not None and (
                self.clock() - r.step_started_at - pol.min_dwell_s > pol.inconclusive_timeout_s)
            if pol.on_inconclusive == "pause" or timed_out:
                repo.insert_verdicts(tx, r.id, r.step, results)
                self._move(tx, replace(r, state=S.PAUSED), ENGINE, "pause",
                           f"gates inconclusive at step {r.step + 1}", evidence)
                return 1
            repo.update_rollout(tx, r)  # keep waiting; the last evaluation shows why
            return 0
        assert decision == PASS
        repo.insert_verdicts(tx, r.id, r.step, results)
        if r.strategy == "ab":
            repo.update_rollout(tx, replace(r, result={**r.result, "ab": evidence["ab"]}))
            return 0  # A/B never promotes itself
        if r.last_step:  # shadow
            self._move(tx, replace(r, state=S.COMPLETED), ENGINE, "complete",
                       f"shadow gates passed on {r.percent:g} % of the targets", evidence)
            return 1
        self._next_step(tx, r, f"gates passed at step {r.step + 1}", evidence)
        return 1

    def _next_step(self, tx: Transaction, r: repo.Rollout, why: str, evidence: dict[str, Any]) -> None:
        nxt = r.step + 1
        if r.steps[nxt] >= 100 and r.policy.approval.before_full:
            self._move(tx, replace(r, state=S.PENDING_APPROVAL, step=nxt), ENGINE, "await_approval",
                       f"{why}; 100 % needs approval", evidence)
        else:
            self._move(tx, replace(r, state=S.PROMOTING, step=nxt), ENGINE, "promote",
                       f"{why}: on to {r.steps[nxt]:g} %", evidence)

    def _finish(self, r: repo.Rollout, why: str) -> int:
        with self.store.transaction(write=True) as tx:
            current = repo.get_rollout(tx, r.id, lock=True)
            if current.state is not S.RUNNING:
                return 0
            self._move(tx, replace(current, state=S.COMPLETED), ENGINE, "complete", why)
        return 1

    def _progress(self, r: repo.Rollout) -> dict[str, int]:
        """Mark members whose device applied the step's document; count those still pending."""
        with self.store.transaction(write=True) as tx:
            sizes = dict(tx.execute("SELECT cohort, COUNT(*) FROM rollout_devices WHERE rollout_id = ? "
                                    "GROUP BY cohort", (r.id,)).fetchall())
            rows = tx.execute(
                "SELECT rd.device_id, rd.revision, d.online, d.reported_state FROM rollout_devices rd "
                "LEFT JOIN devices d ON d.fleet = ? AND d.device_id = rd.device_id "
                "WHERE rd.rollout_id = ? AND rd.cohort = 'canary' AND rd.applied = 0",
                (r.fleet, r.id)).fetchall()
            pending = offline = 0
            for device, revision, online, state in rows:
                reported = repo.loads(state)
                applied = reported.get("applied_revision") if isinstance(reported, dict) else None
                if revision is not None and type(applied) is int and applied >= revision:
                    tx.execute("UPDATE rollout_devices SET applied = 1 WHERE rollout_id = ? AND device_id = ?",
                               (r.id, device))
                elif revision is None or not online:
                    offline += 1  # not waited for: the retained document reaches it when it returns
                else:
                    pending += 1
        return {"members": int(sizes.get("canary", 0)), "baseline": int(sizes.get("baseline", 0)),
                "pending": pending, "offline_or_unreachable": offline}

    def collect(self, r: repo.Rollout) -> tuple[CohortSamples, CohortSamples]:
        """Canary and baseline samples since the step started, from the telemetry table."""
        name, _, version = r.model_ref.partition("@")
        with self.store.transaction() as tx:
            cohorts = dict(tx.execute("SELECT device_id, cohort FROM rollout_devices WHERE rollout_id = ?",
                                      (r.id,)).fetchall())
            # only this rollout's devices, through the (fleet, device_id, ts) index: the cost
            # follows the rollout's targets, not the whole fleet's traffic
            rows = tx.execute("SELECT t.device_id, t.kind, t.ts, t.body FROM rollout_devices rd "
                              "JOIN telemetry t ON t.fleet = ? AND t.device_id = rd.device_id AND t.ts >= ? "
                              "WHERE rd.rollout_id = ? AND t.kind IN ('prediction', 'metrics', 'shadow', 'feedback') "
                              "ORDER BY t.ts", (r.fleet, r.step_started_at, r.id)).fetchall()
            states = {d.device_id: d.reported_state for d in tx.list_devices(r.fleet) if d.device_id in cohorts}
        samples = {"canary": CohortSamples(), "baseline": CohortSamples()}
        counters: dict[str, list[tuple[int, int]]] = defaultdict(list)
        malformed = 0
        for device, kind, _ts, body in rows:
            cohort = cohorts.get(device)
            if cohort is None:
                continue
            try:  # stored as the device sent it (validation: fast): one bad record must not stall the step
                _add_record(samples[cohort], counters[device], kind, repo.loads(body), cohort, name, version)
            except (TypeError, ValueError, KeyError, AttributeError):
                malformed += 1
        if malformed:
            log.warning("rollout %s: %d telemetry record(s) of the wrong shape left out of the gates", r.id, malformed)
        for device, seen in counters.items():
            if len(seen) >= 2:
                s = samples[cohorts[device]]
                s.predictions += max(0, seen[-1][0] - seen[0][0])
                s.errors += max(0, seen[-1][1] - seen[0][1])
        for device, cohort in cohorts.items():
            samples[cohort].devices += 1
            update = _object(states.get(device), "update")
            if cohort == "canary" and update.get("result") in ("rolled_back", "failed") \
                    and _object(update, "target").get("version") == version:
                samples[cohort].unhealthy.append(device)
        return samples["canary"], samples["baseline"]

    # ------------------------------------------------------------------ persistence of a move
    def _move(self, tx: Transaction, r: repo.Rollout, actor: str, action: str, why: str,
              evidence: dict[str, Any] | None = None) -> None:
        """Persist the new state and its audit entry in the caller's transaction."""
        repo.update_rollout(tx, replace(r, reason=why))
        repo.audit(tx, actor, action, r.id, why, {"state": r.state.value, "step": r.step, **(evidence or {})})
        log.info("rollout %s: %s by %s -> %s (%s)", r.id, action, actor, r.state.value, why)


def _policy_for(strategy: str, policy: Policy | dict[str, Any] | None, steps: Sequence[float] | None) -> Policy:
    data = policy.model_dump(mode="json") if isinstance(policy, Policy) else dict(policy or {})
    if steps:
        data["steps"] = list(steps)
    elif strategy == "bluegreen":
        data["steps"] = [100]
    elif strategy == "ab" and "steps" not in data:
        data["steps"] = [50, 100]
    pol = parse_policy(data)
    if strategy == "ab" and (len(pol.steps) != 2 or pol.steps[-1] != 100):
        pol = parse_policy({**data, "steps": [pol.steps[0], 100] if pol.steps[0] < 100 else [50, 100]})
    return pol


#: Gates whose verdict is a statistical test: judged once per step under ``test: fixed``.
#: (health reacts at any time; PSI is a threshold on an estimate that only gets better.)
LOCKED_GATES = frozenset({"latency_p95", "error_rate", "accuracy", "shadow_agreement"})


def _lock_verdicts(r: repo.Rollout, results: list[Verdict]) -> tuple[list[Verdict], dict[str, Any]]:
    """``test: fixed``: the first conclusive verdict of each statistical gate in a step is
    kept (with its evidence) for the rest of the step: one look per test."""
    saved = r.result.get("gate_locks") or {}
    locks = dict(saved.get("verdicts") or {}) if saved.get("step") == r.step else {}
    out = []
    for v in results:
        if v.gate in locks:
            kept = locks[v.gate]
            out.append(Verdict(v.gate, kept["verdict"], {**kept["evidence"], "judged_once": True}))
            continue
        if v.gate in LOCKED_GATES and v.verdict != INCONCLUSIVE:
            locks[v.gate] = {"verdict": v.verdict, "evidence": v.evidence}
        out.append(v)
    return out, {"step": r.step, "verdicts": locks}


def _correct(feedback: dict[str, Any]) -> bool | None:
    """Whether a feedback record says its prediction was right (``correct``, else label == predicted)."""
    if feedback.get("correct") is not None:
        return bool(feedback["correct"])
    if feedback.get("label") is not None and feedback.get("predicted") is not None:
        return str(feedback["label"]) == str(feedback["predicted"])
    return None


def _utc(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")


def _active_ref(state: dict[str, Any] | None) -> str | None:
    active = (state or {}).get("active")
    return f"{active['name']}@{active['version']}" if active else None


def _summary(r: repo.Rollout) -> dict[str, Any]:
    return {
        "id": r.id, "fleet": r.fleet, "model": r.model_ref, "baseline": r.baseline_ref, "strategy": r.strategy,
        "selector": r.selector, "steps": list(r.steps), "step": r.step, "percent": r.percent,
        "state": r.state.value, "step_started_at": r.step_started_at, "created_at": r.created_at,
        "updated_at": r.updated_at, "created_by": r.created_by, "approvals": r.approvals, "result": r.result,
        "reason": r.reason,
    }


def _object(doc: Any, key: str) -> dict[str, Any]:
    """``doc[key]`` of a stored JSON document when both are objects, else ``{}``."""
    value = doc.get(key) if isinstance(doc, dict) else None
    return value if isinstance(value, dict) else {}


def _add_record(s: CohortSamples, counters: list[tuple[int, int]], kind: str, b: dict[str, Any], cohort: str,
                name: str, version: str) -> None:
    """One telemetry record into its cohort's samples (raises on a record of the wrong shape)."""
    candidate = b.get("model") == name and b.get("version") == version
    if kind == "prediction" and candidate == (cohort == "canary"):
        latency = float(b["latency_us"])  # read everything first: a bad record adds nothing
        top1 = (b.get("summary") or {}).get("top1")
        top1 = None if top1 is None else int(top1)
        s.latencies.append(latency)
        if top1 is not None:
            s.top1[top1] += 1
    elif kind == "feedback" and candidate == (cohort == "canary") and (ok := _correct(b)) is not None:
        s.labeled += 1
        s.correct += ok
    elif kind == "metrics":
        counters.append((int(b["predictions_total"]), int(b["prediction_errors_total"])))
    elif kind == "shadow" and cohort == "canary" and b.get("shadow_version") == version and b.get("compared"):
        compared = int(b["compared"])
        agreed = float(b.get("top1_agreement") or 0.0) * compared
        p95s = [(target, float(b[key]["p95"])) for key, target in (("latency_us_shadow", s.shadow_latency_p95),
                                                                   ("latency_us_primary", s.primary_latency_p95))
                if (b.get(key) or {}).get("p95") is not None]
        s.shadow_compared += compared
        s.shadow_agreed += agreed
        for target, value in p95s:
            target.append(value)
