"""Drives the update machine: reconciles the device to its desired state.

Threads: :meth:`UpdateManager.offer` runs on paho's network thread and only checks
and queues a document; the ``edgeml-updates`` worker thread runs the machine;
:meth:`observe` runs on the predict path during probation (a counter update).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import ValidationError

from .._config import AgentConfig
from .._exceptions import ConfigError, ModelLoadError, SignatureError
from .._json import dumps, loads
from .._models import (
    MODEL_SUFFIXES,
    LoadedModel,
    ModelInfo,
    ModelStore,
    durable_replace,
    model_suffix,
)
from ..protocol import DesiredState
from ._download import UpdateRejected, _hash, check_disk, download, fetch_small
from ._health import check_contract, health_check
from ._machine import Event, State, UpdateLog, next_state
from ._shadow import ShadowRunner

log = logging.getLogger(__name__)

MAX_DOCUMENT_BYTES = 256 * 1024
#: The largest revision the update log (SQLite INTEGER) keeps.
MAX_REVISION = 2**63 - 1
#: Test hook: ``EDGEML_UPDATE_CRASH_AT=<state>`` kills the agent (SIGKILL) right after
#: that state is persisted, to prove that every state resumes or rolls back.
CRASH_AT_ENV = "EDGEML_UPDATE_CRASH_AT"
#: After the worker hit an error mid-update (a full disk), resume the update this much later.
RESUME_AFTER_ERROR_S = 5.0


class Probation:
    """Counts what the new model does in service (called on the predict path)."""

    def __init__(self) -> None:
        self.predictions = 0
        self.errors = 0
        self.latencies: list[float] = []

    def observe(self, latency_us: float | None) -> None:
        if latency_us is None:
            self.errors += 1
        else:
            self.predictions += 1
            if len(self.latencies) < 10_000:
                self.latencies.append(latency_us)


class UpdateManager:
    def __init__(
        self,
        config: AgentConfig,
        store: ModelStore,
        *,
        current: Callable[[], LoadedModel | None],
        activate: Callable[[LoadedModel], None],
        event: Callable[..., None],
        report: Callable[[bytes], None],
        profile: Any = None,
    ) -> None:
        self.config = config
        budgets = profile.budgets if profile is not None else None
        # the settings win; the hardware profile fills what they leave empty
        self.settings = config.updates.model_copy(update={
            "health_latency_budget_ms": config.updates.health_latency_budget_ms
            or (budgets.latency_ms if budgets else None),
            "probation_latency_budget_ms": config.updates.probation_latency_budget_ms
            or (budgets.probation_p95_ms if budgets else None),
            "max_model_bytes": min(config.updates.max_model_bytes,
                                   budgets.memory_mb * 2**20 if budgets and budgets.memory_mb else 1 << 62),
        })
        self.store = store
        self._current = current
        self._activate = activate
        self._event = event
        self._report = report
        self.log = UpdateLog(Path(config.data_dir) / "updates.db")
        self.record = self.log.load()
        self._keys = self._load_keys()
        self._pending: dict[str, Any] | None = None
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._candidate: LoadedModel | None = None
        self.probation: Probation | None = None
        self.last_rejection: dict[str, Any] | None = None
        self._retry_doc: dict[str, Any] | None = None
        # one state document built and handed over at a time: the paho thread (a rejection)
        # and the worker (a transition) must not send an older record's document last
        self._report_lock = threading.Lock()
        self._resume_at: float | None = None  # monotonic time to resume an update an error interrupted
        self._probation_t0: float | None = None  # monotonic time the probation would have begun, served time included
        self._boot_checked = False  # check_boot counted this start's probation crash (if any)
        if os.environ.get(CRASH_AT_ENV):
            log.warning("%s=%s: this agent kills itself (SIGKILL) when an update enters that state; "
                        "a fault injection for tests and HIL rigs, never for a device in service",
                        CRASH_AT_ENV, os.environ[CRASH_AT_ENV])
        self.shadow: ShadowRunner | None = None

    def _load_keys(self) -> Any:
        if not self.config.fleet_pubkeys:
            return None
        from ..protocol.signing import load_public_keys

        try:
            return load_public_keys(self.config.fleet_pubkeys)
        except SignatureError as exc:  # missing, unreadable or not an ed25519 public key
            raise ConfigError("fleet_pubkey", str(exc)) from None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self._thread = threading.Thread(target=self._work, name="edgeml-updates", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(30)
        if self.shadow is not None:
            self.shadow.close()
            self.shadow = None
        if self._thread is None or not self._thread.is_alive():  # the worker is done with the record
            record = self.record
            if record.state is State.PROBATION:  # a clean stop is not a crash; the time served counts
                served = time.monotonic() - self._probation_t0 if self._probation_t0 is not None else 0.0
                extra = {**record.extra, "clean_stop": True, "served_s": max(served, record.extra.get("served_s", 0.0))}
                self.record = self.log.save(replace(record, extra=extra))
            elif record.state is not State.IDLE:  # the action stopped cleanly: not an attempt that died
                attempts = dict(record.extra.get("attempts", {}))
                if attempts.get(record.state.value):
                    attempts[record.state.value] -= 1
                    self.record = self.log.save(replace(record, extra={**record.extra, "attempts": attempts}))
        self.log.close()

    # ------------------------------------------------------------------ paho thread
    def offer(self, payload: bytes) -> None:
        """Check a desired-state document and queue it. Raises UpdateRejected (the caller
        reports malformed messages as such, and the rest through :meth:`note_rejection`)."""
        doc = self._check(payload)
        if doc is None:
            return
        with self._cond:
            self._pending = doc
            self._cond.notify_all()

    def note_rejection(self, exc: UpdateRejected) -> None:
        self._reject(exc.reason, str(exc), None)

    def _check(self, payload: bytes) -> dict[str, Any] | None:
        if len(payload) > MAX_DOCUMENT_BYTES:
            raise UpdateRejected("too_large", f"desired state of {len(payload)} bytes exceeds {MAX_DOCUMENT_BYTES}")
        try:
            doc = loads(payload)
        except ValueError as exc:
            raise UpdateRejected("malformed", f"desired state is not JSON: {exc}") from None
        if not isinstance(doc, dict):
            raise UpdateRejected("malformed", "desired state must be a JSON object")
        if self._keys is not None:
            from ..protocol.signing import verify_document

            try:
                verify_document(doc, self._keys)
            except SignatureError as exc:
                raise UpdateRejected(exc.reason, f"desired state signature: {exc}") from None
        elif self.settings.require_signature:
            raise UpdateRejected("no_trusted_key", "desired states must be signed but no fleet_pubkey is configured")
        try:
            desired = DesiredState.model_validate(doc)
        except ValidationError as exc:
            raise UpdateRejected("malformed", str(exc).splitlines()[0]) from None
        if desired.revision > MAX_REVISION:  # it could not be logged: the worker would die on it
            raise UpdateRejected("malformed", f"desired revision {desired.revision} is beyond {MAX_REVISION}")
        for field_name, mine in (("fleet", self.config.fleet), ("device", self.config.device_id)):
            theirs = getattr(desired, field_name)
            if theirs is not None and theirs != mine:
                raise UpdateRejected("wrong_device", f"desired state is for {field_name} {theirs!r}, this is {mine!r}")
        record = self.record
        seen = max(record.applied_revision or 0, record.revision if record.state is not State.IDLE else 0)
        with self._cond:
            pending = self._pending["revision"] if self._pending else 0
        if desired.revision == seen or desired.revision <= pending:
            return None  # the retained copy again, or older than what is already queued
        if desired.revision < seen:
            raise UpdateRejected(
                "replayed", f"desired revision {desired.revision} is older than revision {seen} already acted on"
            )
        if desired.expires_at is not None and desired.expires_at < time.time():
            raise UpdateRejected("expired", f"desired revision {desired.revision} expired at {desired.expires_at}")
        return doc

    def _reject(self, reason: str, message: str, revision: int | None) -> None:
        log.warning("update rejected (%s): %s", reason, message)
        self.last_rejection = {"reason": reason, "message": message, "revision": revision, "ts": time.time()}
        self._event("update_rejected", level="warning", message=message, data={"reason": reason, "revision": revision})
        self.publish_state()

    # ------------------------------------------------------------------ predict path
    def observe(self, latency_us: float | None) -> None:
        probe = self.probation
        if probe is not None:
            probe.observe(latency_us)

    # ------------------------------------------------------------------ worker thread
    def _work(self) -> None:
        self._guarded(self._restore_shadow)
        self._guarded(self._resume)
        self._guarded(self.publish_state)
        while not self._stop.is_set():
            with self._cond:
                while not self._stop.is_set():
                    if self._resume_at is not None and time.monotonic() >= self._resume_at:
                        break
                    if self._pending is not None:
                        if self.record.state is State.IDLE:
                            break
                        if self._resume_at is None:  # an update caught halfway: finish it first
                            self._resume_at = time.monotonic()
                            break
                    self._cond.wait(1.0)
                doc = None
                if self.record.state is State.IDLE:  # else it waits for the interrupted update
                    doc, self._pending = self._pending, None
            if self._stop.is_set():
                return
            if self._resume_at is not None and time.monotonic() >= self._resume_at:
                self._resume_at = None
                self._guarded(self._resume)
            if doc is not None:
                self._guarded(lambda doc=doc: self._begin(doc), doc)

    def check_boot(self) -> None:
        """At start, before any model loads: an agent that died while a model was on
        probation counts a crash now (the candidate would serve, and maybe kill the agent
        again, before the worker runs), and at the limit the pointer goes back to the
        previous model (if that one loads) so the agent boots into it."""
        self._boot_checked = True  # the worker's probation does not count this start again
        record = self.record
        if record.state is not State.PROBATION or not record.extra.get("entered") or record.extra.get("clean_stop"):
            return
        active, previous = self.store.active_info(), self.store.previous_info()
        if active is None or active.sha256 != (record.candidate or {}).get("sha256"):
            return  # the agent starts on another model: the worker reports candidate_lost
        # "entered" stays set: a start that dies before the worker runs counts at the next one
        crashes = record.crashes + 1
        try:
            self.record = record = self.log.save(replace(record, crashes=crashes))
        except Exception:
            self._boot_checked = False  # not counted: the worker's probation counts it
            raise
        self._event("probation_crash", level="warning", data={"crashes": crashes, "revision": record.revision})
        if crashes < self.settings.crash_loop_limit:
            return
        log.warning("update %s: the agent restarted %d times during probation: rolling back", record.revision, crashes)
        self._fail("crash_loop", f"the agent restarted {crashes} times during probation")
        self._advance(Event.FAILED)  # rolling_back, persisted: the worker finishes it
        if previous is None:
            return
        try:
            self.store.load_info(previous).runtime.close()  # it must load before the device boots into it
        except ModelLoadError as exc:
            log.error("cannot roll back at start: the previous model does not load (%s)", exc)
            return
        self.store.rollback()

    def _resume(self) -> None:
        if self.record.state is not State.IDLE:
            log.warning("resuming the update to revision %s in state %s", self.record.revision, self.record.state.value)
            self._run(Event.RESUME)

    def _guarded(self, step: Any, doc: dict[str, Any] | None = None) -> None:
        """Run one step of the worker; nothing (a full disk, a broken update database) ends
        the worker. The record goes back to what is persisted; an update caught halfway is
        resumed later, like after a restart, and the document is offered again."""
        try:
            step()
        except Exception as exc:
            log.exception("update worker: %s", exc)
            try:
                self.record = self.log.load()
            except Exception:
                log.exception("update worker: cannot read the update state back")
            if self.record.state is not State.IDLE:
                self._resume_at = time.monotonic() + RESUME_AFTER_ERROR_S
            elif doc is not None:
                self._retry_doc = doc
            with contextlib.suppress(Exception):
                self._event("update_worker_error", level="error", message=f"{type(exc).__name__}: {exc}",
                            data={"state": self.record.state.value, "revision": self.record.revision})

    def retry(self) -> None:
        """Offer again a document whose update failed for a transient reason, if it is
        still the newest one and has not expired."""
        if self.record.state is not State.IDLE:  # failing right now: the document is kept for later
            return
        doc, self._retry_doc = self._retry_doc, None
        if doc is None:
            return
        if doc["revision"] <= (self.record.applied_revision or 0):
            return
        if doc.get("expires_at") is not None and doc["expires_at"] < time.time():
            return
        with self._cond:
            if self._pending is None or self._pending["revision"] < doc["revision"]:
                self._pending = doc
            self._cond.notify_all()

    def _begin(self, doc: dict[str, Any]) -> None:
        if self.record.state is not State.IDLE:  # never over an unfinished update: after it
            with self._cond:
                if self._pending is None or self._pending["revision"] < doc["revision"]:
                    self._pending = doc
            return
        desired = DesiredState.model_validate(doc)
        self._retry_doc = None  # a newer document supersedes any retry
        if desired.revision <= (self.record.applied_revision or 0):
            log.warning("ignoring desired revision %s: revision %s was applied", desired.revision,
                        self.record.applied_revision)
            return
        self._set_shadow(desired.shadow.model_dump(exclude_none=True) if desired.shadow else None)
        target = desired.model.model_dump(exclude_none=True) if desired.model else None
        active = self._current()
        if target is None or (active is not None and target.get("sha256") == active.info.sha256):
            self.record = self.log.save(replace(self.record, applied_revision=desired.revision, revision=desired.revision,
                                                document=doc,
                                                result="success", reason="already_active" if target else "no_model_desired"))
            self._event("update_skipped", data={"revision": desired.revision, "reason": self.record.reason})
            self.publish_state()
            return
        self.record = replace(
            self.record, revision=desired.revision, target=target, document=doc, candidate=None, result=None,
            reason=None, started_at=time.time(), probation_started=None, crashes=0, extra={},
        )
        self._run(Event.DESIRED)

    def _run(self, event: Event) -> None:
        while True:
            self._advance(event)
            if self.record.state is State.IDLE or self._stop.is_set():
                return
            event = self._act(self.record.state)
            if event is None:  # stopping: the state stays persisted for the next start
                return

    def _advance(self, event: Event, **fields: Any) -> None:
        state = next_state(self.record.state, event)
        self.record = self.log.save(replace(self.record, state=state, **fields), event)
        log.info("update %s: %s -> %s", self.record.revision, event.value, state.value)
        self._event("update_state", data={"state": state.value, "event": event.value, "revision": self.record.revision,
                                          "result": self.record.result, "reason": self.record.reason})
        if os.environ.get(CRASH_AT_ENV) == state.value and event is not Event.RESUME:
            os.kill(os.getpid(), signal.SIGKILL)  # test hook: a power cut right after the commit
        self.publish_state()

    def _act(self, state: State) -> Event | None:
        try:
            if state is not State.PROBATION:  # probation counts its crashes itself
                self._count_attempt(state)
            return getattr(self, f"_do_{state.value}")()
        except UpdateRejected as exc:
            return self._fail(exc.reason, str(exc), transient=exc.transient)
        except ModelLoadError as exc:
            return self._fail("load_failed", str(exc))
        except Exception as exc:  # disk, database, engine: fail the update, keep the worker alive
            log.exception("update step %s failed", state.value)
            return self._fail("internal_error", f"{type(exc).__name__}: {exc}")

    def _count_attempt(self, state: State) -> None:
        """Each action is persisted as an attempt first: an action that keeps killing the
        agent (a segfaulting or OOM-killed candidate) fails the update instead of looping."""
        attempts = dict(self.record.extra.get("attempts", {}))
        attempts[state.value] = attempts.get(state.value, 0) + 1
        self.record = self.log.save(replace(self.record, extra={**self.record.extra, "attempts": attempts}))
        if attempts[state.value] > self.settings.crash_loop_limit + 1:
            raise UpdateRejected("crash_loop", f"the agent died {attempts[state.value] - 1} times in {state.value}")

    def _fail(self, reason: str, message: str, *, transient: bool = False) -> Event:
        log.warning("update to revision %s failed (%s): %s", self.record.revision, reason, message)
        self._event("update_failed", level="warning", message=message, data={"reason": reason, "revision": self.record.revision})
        rolled = self.record.state in (State.PROBATION, State.SWITCHING)
        applied = self.record.applied_revision if transient else self.record.revision
        if transient:
            self._retry_doc = self.record.document
        if self.record.state is State.ROLLING_BACK:
            result = "failed"
        elif rolled:
            result = "rolled_back"
        else:
            result = "failed" if transient else "rejected"
        self.record = replace(self.record, result=result, reason=reason, applied_revision=applied)
        self._cleanup(keep_partial=transient)
        return Event.FAILED

    # ------------------------------------------------------------------ actions (one per state)
    def _part(self) -> Path:
        return self.store.root / f"incoming-{self.record.revision}.part"

    def _do_downloading(self) -> Event:
        target = self.record.target or {}
        sha = target.get("sha256")
        if sha and any(p.stem == sha and p.suffix in MODEL_SUFFIXES for p in self.store.root.glob(f"{sha}.*")):
            return Event.DOWNLOADED  # already on the device (e.g. the previous model)
        url = target.get("url")
        if not url:
            raise UpdateRejected("no_url", "the desired model has no url and is not on the device")
        size = target.get("size")
        if size is not None and size > self.settings.max_model_bytes:
            raise UpdateRejected("too_large", f"artifact of {size} bytes exceeds the limit of {self.settings.max_model_bytes}")
        part = self._part()
        have = part.stat().st_size if part.exists() else 0
        check_disk(self.store.root, max(0, (size or 0) - have), self.settings.min_free_bytes)
        download(url, part, size=size, sha256=sha, max_bytes=self.settings.max_model_bytes,
                 timeout_s=self.settings.download_timeout_s, retries=self.settings.download_retries,
                 backoff_s=self.settings.retry_backoff_s)
        return Event.DOWNLOADED

    def _do_verifying(self) -> Event:
        target = self.record.target or {}
        sha = target.get("sha256")
        existing = [p for p in self.store.root.glob(f"{sha}.*") if p.suffix in MODEL_SUFFIXES] if sha else []
        part = existing[0] if existing else self._part()
        if not part.exists():
            raise UpdateRejected("truncated", "the downloaded file is gone")
        digest = _hash(part)
        if sha and digest != sha:
            if not existing:
                part.unlink(missing_ok=True)
            raise UpdateRejected("hash_mismatch", f"artifact sha256 is {digest}, the desired state says {sha}")
        if not existing:  # a file already in the store was verified when it came in
            if self._keys is not None and not target.get("url"):
                raise UpdateRejected("missing_signature", "no url to fetch the artifact signature from")
            self._verify_signature(target.get("url", ""), digest, part)
        with part.open("rb") as fh:
            head = fh.read(8)
        final = self.store.root / f"{digest}{model_suffix(head)}"
        if part != final:
            durable_replace(part, final)  # verified: it enters the content-addressed store (the rename too)
        self.record = replace(self.record, candidate={"file": final.name, "sha256": digest})
        return Event.VERIFIED

    def _do_installing(self) -> Event:
        target = self.record.target or {}
        path = self.store.root / self.record.candidate["file"]  # type: ignore[index]
        loaded = self.store.load(path, name=target.get("name"), version=target.get("version"))
        if self.settings.contract == "same":
            check_contract(loaded, self._current())
        report = health_check(loaded, latency_budget_ms=self.settings.health_latency_budget_ms)
        self._event("update_health", data={**report, "revision": self.record.revision})
        self._candidate = loaded
        self.record = replace(self.record, candidate=loaded.info.to_json())
        return Event.HEALTHY

    def _do_switching(self) -> Event:
        info = ModelInfo(**self.record.candidate)  # type: ignore[arg-type]
        model = self._candidate if self._candidate and self._candidate.info.sha256 == info.sha256 else self.store.load_info(info)
        self._candidate = None
        self.store.switch(info)  # one atomic rename: the device now boots into the new model
        self._activate(model)
        self.probation = Probation()  # counts from the first prediction the new model serves
        self.record = replace(self.record, probation_started=time.time())
        return Event.SWITCHED

    def _do_probation(self) -> Event | None:
        try:
            return self._watch_probation()
        finally:
            self.probation = None  # the predict path stops counting, whatever the outcome
            self._probation_t0 = None

    def _watch_probation(self) -> Event | None:
        s = self.settings
        record = self.record
        active = self.store.active_info()
        if active is None or active.sha256 != (record.candidate or {}).get("sha256"):
            # the agent started on another model (the candidate's file failed to load or verify)
            raise UpdateRejected("candidate_lost", "the model on probation is no longer the active one")
        if not self._boot_checked and record.extra.get("entered") and not record.extra.get("clean_stop"):
            crashes = record.crashes + 1  # the agent died while this model was on probation
            record = self.record = self.log.save(replace(record, crashes=crashes))
            self._event("probation_crash", level="warning", data={"crashes": crashes, "revision": record.revision})
            if crashes >= s.crash_loop_limit:
                raise UpdateRejected("crash_loop", f"the agent restarted {crashes} times during probation")
        served = float(record.extra.get("served_s", 0.0))  # before clean restarts
        self.record = self.log.save(replace(record, extra={"entered": True, "served_s": served}))
        # the one _do_switching started (predictions since the switch count), or a new one on a resume
        probe = self.probation = self.probation or Probation()
        started = self._probation_t0 = time.monotonic() - served
        while not self._stop.wait(0.1):
            elapsed = time.monotonic() - started
            n, errors = probe.predictions, probe.errors
            total = n + errors
            if total >= max(1, s.probation_min_predictions) and errors / total > s.max_error_rate:
                raise UpdateRejected("error_rate", f"{errors} of {total} predictions failed during probation")
            if s.probation_latency_budget_ms and n >= max(1, s.probation_min_predictions):
                p95 = float(np.percentile(probe.latencies, 95)) / 1000
                if p95 > s.probation_latency_budget_ms:
                    raise UpdateRejected("latency", f"p95 latency {p95:.3f} ms exceeds {s.probation_latency_budget_ms} ms")
            if elapsed >= s.probation_s and (total >= s.probation_min_predictions or elapsed >= 3 * s.probation_s):
                self.record = replace(self.record, result="success", reason=None,
                                      applied_revision=self.record.revision, extra={})
                self._event("update_succeeded", data={"revision": self.record.revision, "predictions": n,
                                                      "errors": errors})
                for part in self.store.root.glob("incoming-*.part"):  # kept for retries of older revisions
                    part.unlink(missing_ok=True)
                self.store.collect_garbage(keep={self.shadow.model.info.sha256} if self.shadow else set())
                return Event.PASSED
        return None

    def _do_rolling_back(self) -> Event:
        active = self.store.active_info()
        candidate = self.record.candidate or {}
        loaded = None
        if active is not None and active.sha256 == candidate.get("sha256"):
            previous = self.store.previous_info()
            if previous is None:
                self._event("rollback_impossible", level="error", message="no previous model to return to")
                return Event.ROLLED_BACK
            try:  # loaded before the pointer moves: an unusable previous model leaves the device as it is
                loaded = self.store.load_info(previous)
            except ModelLoadError as exc:  # keep serving (and booting into) what runs
                self._event("rollback_failed", level="error", message=str(exc))
                raise UpdateRejected("rollback_failed", str(exc)) from exc
            self.store.rollback()
        restored = self.store.active_info()
        current = self._current()
        if restored is not None and (current is None or current.info.sha256 != restored.sha256):
            try:
                self._activate(loaded if loaded is not None else self.store.load_info(restored))
            except ModelLoadError as exc:  # the previous model is unusable: keep serving what runs
                self._event("rollback_failed", level="error", message=str(exc))
                raise UpdateRejected("rollback_failed", str(exc)) from exc
        self._event("update_rolled_back", level="warning", message=self.record.reason or "",
                    data={"revision": self.record.revision, "restored": restored.to_json() if restored else None})
        self.store.collect_garbage(keep={self.shadow.model.info.sha256} if self.shadow else set())
        self.record = replace(self.record, extra={})
        return Event.ROLLED_BACK

    def _cleanup(self, keep_partial: bool = False) -> None:
        """After a failed update: drop partial downloads (but this revision's when it will be
        retried: the download resumes) and model files nothing refers to any more (a
        rejected candidate), keeping active, previous and shadow."""
        self._candidate = None
        kept = self._part() if keep_partial else None
        for pattern in ("incoming-*.part", "shadow-*.part"):
            for part in self.store.root.glob(pattern):
                if part != kept:
                    part.unlink(missing_ok=True)
        if self.record.state not in (State.PROBATION, State.SWITCHING, State.ROLLING_BACK):  # candidate may be active
            self.store.collect_garbage(keep={self.shadow.model.info.sha256} if self.shadow else set())

    # ------------------------------------------------------------------ shadow
    def _set_shadow(self, ref: dict[str, Any] | None) -> None:
        current = self.shadow
        if ref is None:
            if current is not None:
                self.shadow = None
                current.close()
                self._event("shadow_stopped", data={"model": current.model.name, "version": current.model.version})
            return
        if current is not None and current.model.info.sha256 == ref.get("sha256"):
            return
        try:
            model = self._fetch_shadow(ref)
            if self.settings.contract == "same":
                check_contract(model, self._current())
            health_check(model, latency_budget_ms=self.settings.health_latency_budget_ms)
        except (UpdateRejected, ModelLoadError) as exc:
            reason = getattr(exc, "reason", "load_failed")
            self._event("shadow_rejected", level="warning", message=str(exc), data={"reason": reason})
            self.last_rejection = {"reason": reason, "message": str(exc), "revision": None, "ts": time.time(),
                                   "shadow": True}
            return
        self.shadow = ShadowRunner(model, sample_rate=self.settings.shadow_sample_rate,
                                   cpu_share=self.settings.shadow_cpu_share)
        if current is not None:
            current.close()
        self._event("shadow_started", data={"model": model.name, "version": model.version,
                                             "sha256": model.info.sha256})

    def _fetch_shadow(self, ref: dict[str, Any]) -> LoadedModel:
        """Download and verify a shadow model like a candidate (it never becomes active)."""
        sha = ref.get("sha256")
        if not sha:
            raise UpdateRejected("malformed", "a shadow model must name its sha256")
        stored = [p for p in self.store.root.glob(f"{sha}.*") if p.suffix in MODEL_SUFFIXES]
        if not stored:
            if not ref.get("url"):
                raise UpdateRejected("no_url", "the shadow model has no url")
            part = self.store.root / f"shadow-{sha}.part"
            check_disk(self.store.root, ref.get("size") or 0, self.settings.min_free_bytes)
            digest = download(ref["url"], part, size=ref.get("size"), sha256=sha,
                              max_bytes=self.settings.max_model_bytes, timeout_s=self.settings.download_timeout_s,
                              retries=self.settings.download_retries, backoff_s=self.settings.retry_backoff_s)
            self._verify_signature(ref["url"], digest, part)
            with part.open("rb") as fh:
                head = fh.read(8)
            final = self.store.root / f"{digest}{model_suffix(head)}"
            durable_replace(part, final)
            stored = [final]
        return self.store.load(stored[0], name=ref.get("name"), version=ref.get("version"))

    def _verify_signature(self, url: str, digest: str, path: Path) -> None:
        if self._keys is None:
            if self.settings.require_signature:
                raise UpdateRejected("no_trusted_key", "artifacts must be signed but no fleet_pubkey is configured")
            return
        from ..protocol.signing import verify_digest

        signature = fetch_small(url + ".sig", timeout_s=self.settings.download_timeout_s)
        try:
            verify_digest(digest, signature, self._keys)
        except SignatureError as exc:
            path.unlink(missing_ok=True)
            raise UpdateRejected(exc.reason, f"artifact signature: {exc}") from None

    def _restore_shadow(self) -> None:
        doc = self.record.document or {}
        if doc.get("shadow") and self.record.state is State.IDLE:
            self._set_shadow(doc["shadow"])

    def shadow_report(self) -> dict[str, Any] | None:
        """Shadow statistics since the last report, with the active model named."""
        shadow, active = self.shadow, self._current()
        if shadow is None:
            return None
        shadow.drain()
        stats = shadow.take_stats()
        if stats is None:
            return None
        return {"model": active.name if active else None, "version": active.version if active else None, **stats}

    # ------------------------------------------------------------------ reporting
    def state_document(self) -> dict[str, Any]:
        r = self.record
        active, previous = self.store.active_info(), self.store.previous_info()
        slot = lambda i: i and {k: getattr(i, k) for k in ("name", "version", "sha256", "size", "engine")}  # noqa: E731
        return {
            "v": 1, "fleet": self.config.fleet, "device": self.config.device_id, "ts": time.time(),
            "applied_revision": r.applied_revision, "active": slot(active), "previous": slot(previous),
            "update": {"state": r.state.value, "revision": r.revision, "target": r.target, "result": r.result,
                       "reason": r.reason, "started_at": r.started_at, "updated_at": r.updated_at},
            "last_rejection": self.last_rejection, "hardware_profile": self.config.hardware_profile,
        }

    def publish_state(self) -> None:
        with self._report_lock:
            self._report(dumps(self.state_document()))
