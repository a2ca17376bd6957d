"""Training in the coordinator: background runs (one at a time) and continuous training.

    service = TrainingService(store, registry, workdir=artifact_dir / "training", recipes_dir=Path("configs/recipes"))
    run_id = service.submit("sensor-mlp.yaml")          # returns at once; the run trains on its own thread
    ct = ContinuousTraining(settings, service, DriftMonitor(store, registry), is_leader=lambda: True)
    ct.start()                                          # apscheduler: ct.check() every check_interval_s
    ct.check()                                          # now: drift, interval and new-label triggers

:class:`TrainingService` starts a run row (``running``) before its thread, so the REST
API can answer 202 with the run id; a second submission while one runs is refused with
:class:`TrainingBusy` (HTTP 409). :class:`ContinuousTraining` acts only while this
replica leads (the same leadership as desired states): for each configured model it
measures drift (:class:`cloud.drift.DriftMonitor`) and retrains when

* ``drift``: a version's PSI (inputs or predictions, any cohort) is above the threshold
  and that version was not retrained yet (a drifted version is retrained once);
* ``interval``: ``retrain_interval_s`` has passed since the last retraining (or since the
  newest version was registered);
* ``new_labels``: ``new_labels`` labeled feedback records arrived since then.

Every trigger is recorded with its reason and evidence (``training_triggers``, schema
migration 6, and the
audit log with actor ``continuous-training``) before the run starts, and updated with
the outcome: the run, the registered versions, an automatic canary rollout. The run
trains on the recipe's own sources (unless ``include_recipe_data`` is false) plus the
fleet's labeled samples of that model (feedback joined to sample records by prediction
id) since the start of the drifted window; the versions it registers point back to
them: the snapshot (hash, rows, devices, time range), the parent (the drifted version)
and the trigger.
"""

from __future__ import annotations

import importlib.util
import logging
import re
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import orjson

from .._exceptions import CloudError, Conflict, InvalidInput, NotFound
from ..store import Store
from ._recipe import FleetSource, InvalidRecipe, Recipe, load_recipe
from ._runs import RunRecord, RunStore

__all__ = ["ACTOR", "ContinuousTraining", "TrainingBusy", "TrainingService", "TrainingUnavailable"]

log = logging.getLogger(__name__)

#: The audit log's actor for what continuous training does.
ACTOR = "continuous-training"
_RECIPE_FILE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


class TrainingBusy(Conflict):
    """A training run is in progress; runs go one at a time (HTTP 409)."""


class TrainingUnavailable(CloudError):
    """This coordinator cannot train: the ``train`` extra (torch, scikit-learn) is missing."""


class TrainingService:
    """Training runs of one coordinator, each on a background thread, one at a time."""

    def __init__(self, store: Store, registry: Any, *, workdir: str | Path, recipes_dir: str | Path) -> None:
        self.store = store
        self.registry = registry
        self.workdir = Path(workdir)
        self.recipes_dir = Path(recipes_dir)
        self.runs = RunStore(store)
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._current: str | None = None

    # ------------------------------------------------------------------ recipes
    def load(self, recipe: str | Mapping[str, Any], *, paths: bool = False) -> Recipe:
        """A recipe by file name under ``recipes_dir`` (``paths``: or any path), or inline;
        InvalidInput if it is bad, NotFound if there is no such file."""
        try:
            if isinstance(recipe, Mapping):
                return load_recipe(dict(recipe))
            return load_recipe(self.recipe_path(recipe, paths=paths))
        except InvalidRecipe as exc:
            raise InvalidInput(str(exc)) from exc
        except CloudError as exc:
            if isinstance(exc, InvalidInput | NotFound):
                raise
            raise InvalidInput(str(exc)) from exc

    def recipe_path(self, name: str, *, paths: bool = False) -> Path:
        path = Path(name)
        if paths and (path.is_absolute() or len(path.parts) > 1):
            if path.is_file():
                return path
            raise NotFound(f"no recipe file {name}")
        if not _RECIPE_FILE.match(name):
            raise InvalidInput(f"not a recipe file name: {name!r}")
        for candidate in (self.recipes_dir / name, self.recipes_dir / f"{name}.yaml"):
            if candidate.is_file():
                return candidate
        raise NotFound(f"no recipe {name!r} under {self.recipes_dir}")

    # ------------------------------------------------------------------ runs
    @property
    def current(self) -> str | None:
        """The run in progress, if any."""
        return self._current

    def submit(self, recipe: Recipe, *, parent: str | None = None, version: str | None = None,
               lineage: Mapping[str, Any] | None = None, register: bool = True,
               on_done: Callable[[str, dict[str, Any] | None, str | None], None] | None = None) -> str:
        """Start ``recipe`` on a background thread; its run id at once. TrainingBusy if one runs."""
        if importlib.util.find_spec("torch") is None or importlib.util.find_spec("sklearn") is None:
            raise TrainingUnavailable("training needs the train extra: pip install 'edgeml[train]'")
        with self._lock:
            if self._current is not None:
                raise TrainingBusy(f"training run {self._current} is in progress; one run at a time")
            run_id = self.runs.start(recipe.name, recipe.as_json(), recipe.digest(), {})
            self._current = run_id
            self._thread = threading.Thread(
                target=self._run, args=(run_id, recipe, parent, version, dict(lineage or {}), register, on_done),
                name=f"edgeml-training-{run_id}", daemon=True)
            self._thread.start()
        return run_id

    def _run(self, run_id: str, recipe: Recipe, parent: str | None, version: str | None, lineage: dict[str, Any],
             register: bool, on_done: Callable[[str, dict[str, Any] | None, str | None], None] | None) -> None:
        from ._pipeline import train

        result: dict[str, Any] | None = None
        error: str | None = None
        try:
            result = train(recipe, workdir=self.workdir, store=self.store, registry=self.registry if register else None,
                           version=version, parent=parent, run_id=run_id, lineage=lineage,
                           progress=lambda line: log.info("training: %s", line))
        except Exception as exc:  # the thread's boundary: every failure ends in the run's row
            error = f"{type(exc).__name__}: {exc}"
            log.error("training run %s failed: %s", run_id, error)
            self._fail_if_running(run_id, error)
        finally:
            with self._lock:
                self._current = None
        if on_done is not None:
            try:
                on_done(run_id, result, error)
            except Exception:
                log.exception("after training run %s", run_id)

    def _fail_if_running(self, run_id: str, error: str) -> None:
        try:
            if self.runs.get(run_id).status == "running":
                self.runs.fail(run_id, error)
        except CloudError:
            log.exception("cannot record the failure of run %s", run_id)

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the run in progress; True when none is left."""
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
            return not thread.is_alive()
        return True

    def list(self, name: str | None = None) -> list[RunRecord]:
        return self.runs.list(name)

    def get(self, run_id: str) -> RunRecord:
        return self.runs.get(run_id)

    def stop(self, timeout: float = 10.0) -> None:
        if not self.wait(timeout):
            log.error("training run %s still running at shutdown", self._current)


class ContinuousTraining:
    """Drift / interval / new-label triggers for the configured models, on the leader only."""

    def __init__(self, settings: Any, service: TrainingService, monitor: Any, *, is_leader: Callable[[], bool],
                 rollouts: Any = None, policies_dir: str | Path | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.service = service
        self.monitor = monitor
        self.is_leader = is_leader
        self.rollouts = rollouts
        self.policies_dir = Path(policies_dir) if policies_dir is not None else Path(settings.recipes_dir).parent / "rollouts"
        self.clock = clock
        self.store = service.store
        self._lock = threading.Lock()
        self._scheduler: Any = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> ContinuousTraining:
        from apscheduler.schedulers.background import BackgroundScheduler

        self._scheduler = BackgroundScheduler(daemon=True)
        self._scheduler.add_job(self._scheduled, "interval", seconds=self.settings.check_interval_s,
                                id="training-check", max_instances=1, coalesce=True)
        self._scheduler.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        if self._scheduler is not None:
            self._scheduler.shutdown(wait=True)
            self._scheduler = None
        self.service.stop(timeout)

    def _scheduled(self) -> None:  # the scheduler's thread
        try:
            self.check()
        except CloudError as exc:  # the store is down, a recipe went missing: log, try next time
            log.warning("continuous training check failed: %s", exc)

    # ------------------------------------------------------------------ the check
    def check(self) -> list[dict[str, Any]]:
        """Measure drift and start a retraining where a trigger fires; one outcome per model."""
        if not self.is_leader():
            return [{"model": name, "status": "not_leader"} for name in self.settings.models]
        with self._lock:
            return [self._check_model(name, ms) for name, ms in self.settings.models.items()]

    def _check_model(self, name: str, ms: Any) -> dict[str, Any]:
        now = self.clock()
        last = self._last_trigger(name)
        measurements = self.monitor.measure(fleet=ms.fleet, models=[name], now=now)
        out: dict[str, Any] = {"model": name, "status": "no_trigger", "measurements": [
            {k: m.get(k) for k in ("id", "version", "cohort", "status", "psi", "input_psi", "prediction_psi",
                                   "samples", "predictions")} for m in measurements]}
        trigger = self._drift_trigger(name, measurements) or self._interval_trigger(name, last, now) \
            or self._labels_trigger(name, ms, last, now)
        if trigger is None:
            return out
        if self.service.current is not None:
            out.update(status="busy", reason=f"{trigger['reason']}; waiting: run {self.service.current} is training")
            return out
        trigger["parent"] = trigger.get("parent") or self._newest_version(name)
        try:
            recipe = self._recipe(name, ms, trigger)
        except CloudError as exc:
            self._record(name, trigger, "failed", outcome={"error": str(exc)})
            out.update(status="failed", reason=str(exc))
            return out
        trigger_id = self._record(name, trigger, "training")
        lineage = {"trigger": {"id": trigger_id, "kind": trigger["kind"], "reason": trigger["reason"],
                               "evidence": trigger["evidence"]}}
        try:
            run_id = self.service.submit(recipe, parent=trigger["parent"], lineage=lineage,
                                         on_done=lambda rid, res, err: self._done(trigger_id, ms, rid, res, err))
        except CloudError as exc:
            self._update(trigger_id, "failed", outcome={"error": str(exc)})
            out.update(status="failed", reason=str(exc), trigger=trigger_id)
            return out
        self._update(trigger_id, "training", run_id=run_id)
        out.update(status="triggered", trigger=trigger_id, run_id=run_id, kind=trigger["kind"], reason=trigger["reason"])
        log.info("continuous training: %s -> run %s", trigger["reason"], run_id)
        return out

    def _drift_trigger(self, name: str, measurements: list[dict[str, Any]]) -> dict[str, Any] | None:
        drifted = [m for m in measurements if m["status"] == "drift"]
        retrained = self._retrained_parents(name)
        for m in sorted(drifted, key=lambda m: -m["psi"]):
            ref = f"{name}@{m['version']}"
            if ref in retrained:
                continue
            return {"kind": "drift", "parent": ref, "since": m["window"][0],
                    "reason": f"drift on {ref} (cohort {m['cohort']}): {m['reason']}",
                    "evidence": {"measurement": m["id"], "version": m["version"], "cohort": m["cohort"],
                                 "psi": m["psi"], "input_psi": m["input_psi"], "prediction_psi": m["prediction_psi"],
                                 "threshold": m["threshold"], "window": m["window"], "samples": m["samples"],
                                 "predictions": m["predictions"], "devices": m["devices"]}}
        return None

    def _interval_trigger(self, name: str, last: dict[str, Any] | None, now: float) -> dict[str, Any] | None:
        every = self.settings.retrain_interval_s
        if every is None:
            return None
        since = last["ts"] if last else self._newest_created(name)
        if since is not None and now - since < every:
            return None
        return {"kind": "interval", "since": since,
                "reason": f"scheduled retraining every {every:g} s" + (f" (last {now - since:.0f} s ago)" if since else ""),
                "evidence": {"interval_s": every, "last": since}}

    def _labels_trigger(self, name: str, ms: Any, last: dict[str, Any] | None, now: float) -> dict[str, Any] | None:
        wanted = self.settings.new_labels
        if wanted is None:
            return None
        since = last["ts"] if last else self._newest_created(name)
        count = self._count_labels(name, ms.fleet, since)
        if count < wanted:
            return None
        return {"kind": "new_labels", "since": since, "reason": f"{count} new labeled samples of {name} (trigger: {wanted})",
                "evidence": {"labels": count, "trigger": wanted, "since": since}}

    def _count_labels(self, name: str, fleet: str, since: float | None) -> int:
        sql = "SELECT body FROM telemetry WHERE kind = 'feedback' AND fleet = ?"
        params: list[Any] = [fleet]
        if since is not None:
            sql += " AND ts > ?"
            params.append(since)
        with self.store.transaction() as tx:
            rows = tx.execute(sql, params).fetchall()
        count = 0
        for (raw,) in rows:
            body = orjson.loads(raw) if isinstance(raw, str | bytes) else raw
            count += body.get("model") == name and body.get("label") is not None
        return count

    def _recipe(self, name: str, ms: Any, trigger: dict[str, Any]) -> Recipe:
        base = self.service.load(ms.recipe, paths=True)  # from the coordinator's own settings
        fleet = FleetSource(fleet=ms.fleet, model=name, since=trigger.get("since"))
        sources = (*base.data.sources, fleet) if ms.include_recipe_data else (fleet,)
        return base.model_copy(update={"name": name, "data": base.data.model_copy(update={"sources": sources})})

    # ------------------------------------------------------------------ after the run
    def _done(self, trigger_id: str, ms: Any, run_id: str, result: dict[str, Any] | None, error: str | None) -> None:
        if result is None:
            self._update(trigger_id, "failed", run_id=run_id, outcome={"error": error})
            return
        outcome: dict[str, Any] = {"registered": result.get("registered", []), "dataset": result.get("dataset"),
                                   "float_accuracy": result["float"]["accuracy"],
                                   "int8_accuracy": result["int8"]["accuracy"] if result.get("int8") else None}
        canary = self.settings.auto_canary
        if canary.enabled:
            outcome["canary"] = self._canary(canary, ms, result, trigger_id)
        self._update(trigger_id, "registered", run_id=run_id, outcome=outcome)

    def _canary(self, canary: Any, ms: Any, result: dict[str, Any], trigger_id: str) -> dict[str, Any]:
        refs = result.get("registered", [])
        if canary.artifact == "int8":
            if result.get("int8") is None or len(refs) < 2:
                return {"started": False, "reason": "no int8 artifact passed the quantization gate"}
            ref, accuracy = refs[1], result["int8"]["accuracy"]
        else:
            if not refs:
                return {"started": False, "reason": "nothing was registered"}
            ref, accuracy = refs[0], result["float"]["accuracy"]
        if accuracy < canary.min_accuracy:
            return {"started": False, "reason": f"held-out accuracy {accuracy:.4f} < {canary.min_accuracy:.4f}"}
        if self.rollouts is None:
            return {"started": False, "reason": "no rollout service"}
        try:
            rollout = self.rollouts.start(ref, "canary", canary.target, policy=self._policy(canary.policy),
                                          actor=ACTOR, fleet=ms.fleet, reason=f"retrained (trigger {trigger_id})")
        except CloudError as exc:
            return {"started": False, "model": ref, "reason": f"{type(exc).__name__}: {exc}"}
        return {"started": True, "model": ref, "rollout": rollout["id"]}

    def _policy(self, policy: str | Mapping[str, Any]) -> Any:
        if isinstance(policy, Mapping):
            return dict(policy)
        from ..rollouts import load_policy

        path = Path(policy)
        if not path.is_file():
            path = self.policies_dir / f"{policy}.yaml"
        return load_policy(path)

    # ------------------------------------------------------------------ the record
    def _record(self, name: str, trigger: dict[str, Any], status: str, outcome: Mapping[str, Any] | None = None) -> str:
        trigger_id = uuid.uuid4().hex[:12]
        with self.store.transaction(write=True) as tx:
            tx.execute(
                "INSERT INTO training_triggers (id, ts, model, kind, reason, status, parent, run_id, evidence, outcome) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, NULL, ?, ?)",
                (trigger_id, self.clock(), name, trigger["kind"], trigger["reason"], status, trigger.get("parent"),
                 orjson.dumps(trigger["evidence"]).decode(), orjson.dumps(dict(outcome or {})).decode()),
            )
            tx.execute("INSERT INTO audit_log (ts, actor, action, rollout_id, reason, evidence) VALUES (?, ?, ?, NULL, ?, ?)",
                       (time.time(), ACTOR, f"retrain:{trigger['kind']}", trigger["reason"],
                        orjson.dumps({"trigger": trigger_id, "model": name, "parent": trigger.get("parent"),
                                      **trigger["evidence"]}).decode()))
        return trigger_id

    def _update(self, trigger_id: str, status: str, *, run_id: str | None = None,
                outcome: Mapping[str, Any] | None = None) -> None:
        with self.store.transaction(write=True) as tx:
            tx.execute("UPDATE training_triggers SET status = ?, run_id = COALESCE(?, run_id), "
                       "outcome = COALESCE(?, outcome) WHERE id = ?",
                       (status, run_id, None if outcome is None else orjson.dumps(dict(outcome)).decode(), trigger_id))

    def triggers(self, model: str | None = None, limit: int = 200) -> list[dict[str, Any]]:
        """Recorded triggers, newest first: kind, reason, evidence, status, run and outcome."""
        sql, params = ("SELECT id, ts, model, kind, reason, status, parent, run_id, evidence, outcome "
                       "FROM training_triggers"), []
        if model is not None:
            sql += " WHERE model = ?"
            params.append(model)
        with self.store.transaction() as tx:
            rows = tx.execute(sql + " ORDER BY ts DESC, id LIMIT ?", (*params, limit)).fetchall()
        return [{"id": r[0], "ts": r[1], "model": r[2], "kind": r[3], "reason": r[4], "status": r[5], "parent": r[6],
                 "run_id": r[7], "evidence": orjson.loads(r[8]), "outcome": orjson.loads(r[9])} for r in rows]

    def _last_trigger(self, name: str) -> dict[str, Any] | None:
        found = [t for t in self.triggers(name, limit=20) if t["status"] != "failed"]
        return found[0] if found else None

    def _retrained_parents(self, name: str) -> set[str]:
        with self.store.transaction() as tx:
            rows = tx.execute("SELECT parent FROM training_triggers WHERE model = ? AND status != 'failed' "
                              "AND parent IS NOT NULL", (name,)).fetchall()
        parents = {r[0] for r in rows}
        return parents | {p.removesuffix("+int8") for p in parents} | {f"{p}+int8" for p in parents}

    def _versions(self, name: str) -> list[Any]:
        try:
            return [m for m in self.service.registry.list(name) if m.name == name]
        except NotFound:
            return []

    def _newest_version(self, name: str) -> str | None:
        versions = [m for m in self._versions(name) if "+" not in m.version]
        return max(versions, key=lambda m: m.created_at).ref if versions else None

    def _newest_created(self, name: str) -> float | None:
        versions = self._versions(name)
        return max(m.created_at for m in versions) if versions else None
