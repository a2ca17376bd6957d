"""The agent's composition root: wires buffer, runtime, MQTT sync, local API and jobs."""

from __future__ import annotations

import itertools
import logging
import os
import random
import secrets
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

from . import __version__
from ._config import AgentConfig
from ._exceptions import (
    BrokerNotFound,
    ConfigError,
    InputError,
    ModelError,
    ModelLoadError,
    NoModelError,
)
from ._memory import limit_arenas
from ._models import LoadedModel, ModelStore, copied
from ._process import CpuMeter, rss_bytes
from .buffer import TelemetryBuffer
from .protocol import DESIRED, parse_topic

log = logging.getLogger(__name__)


class Prediction(NamedTuple):
    """What ``Agent.predict`` answers (a NamedTuple: cheap on the hot path).

    ``outputs`` are the engine's arrays, not copied: the telemetry summary of the first
    output is taken from them when the buffer flushes (within ``flush_interval_ms``).
    Copy an output before changing it in place (``probs = probs / probs.sum()`` rather
    than ``probs /= ...``) or the summary may show the changed values.
    """

    outputs: dict[str, Any]
    model: str
    version: str
    latency_us: float
    number: int = 0  # the agent's prediction counter
    boot: str = ""  # the agent's per-boot prefix

    @property
    def id(self) -> str:
        """``{boot}-{number}``: unique per device (made only when asked for: the hot path builds no string)."""
        return f"{self.boot}-{self.number}"

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "outputs": self.outputs, "model": self.model, "version": self.version,
                "latency_us": self.latency_us}


#: ``Prediction(...)`` runs NamedTuple's __new__ in Python; the hot path builds the tuple in C.
_new_prediction = tuple.__new__


class Agent:
    """One device's agent. ``start()`` brings it up, ``predict()`` serves in-process.

    Usage::

        with Agent(load_config("agent.yaml")) as agent:
            agent.predict({"input": [[0.1, 0.2, 0.3, 0.4]]})
    """

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.data_dir = Path(config.data_dir)
        self.started_at = time.time()
        self._model: LoadedModel | None = None
        self._counter_lock = threading.Lock()
        self._predictions = 0
        self._prediction_counter = itertools.count(1)
        self._boot = secrets.token_hex(4)  # prefix of this boot's prediction ids
        self._errors = 0
        self._bad_messages = 0
        self._last_dropped_reported = 0
        self._cpu = CpuMeter()
        self._sample_rate = config.telemetry.sample_rate
        self._buffer: TelemetryBuffer | None = None
        self._store: ModelStore | None = None
        self._sync: Any = None
        self._api: Any = None
        self._scheduler: Any = None
        self._announcer: Any = None
        self._updates: Any = None
        self._running = False
        self.profile: Any = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> Agent:
        """Bring the agent up. A setting that cannot work here (an ``api_addr`` that cannot
        be bound, a ``data_dir`` that cannot be created) raises ConfigError naming it; on any
        failure, what was already started is stopped before the error propagates. A broker
        that cannot be reached is not an error: the agent runs offline and keeps retrying."""
        try:
            self._start()
        except BaseException as exc:
            self._abandon_start(exc)
            raise
        return self

    def _start(self) -> None:
        cfg = self.config
        limit_arenas(cfg.runtime.malloc_arenas)  # before the agent's threads take arenas of their own
        try:
            self.data_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError("data_dir", f"cannot create {self.data_dir}: {exc.strerror or exc}") from exc
        if cfg.hardware_profile:
            from ._hardware import load_profile

            self.profile = load_profile(cfg.hardware_profile, self.data_dir)
        self._buffer = TelemetryBuffer(
            self.data_dir / "telemetry.db",
            max_bytes=cfg.telemetry.buffer_max_bytes,
            flush_interval_ms=cfg.telemetry.flush_interval_ms,
            fsync=cfg.telemetry.fsync,
            segment_max_records=cfg.mqtt.batch_max_records,
            segment_max_bytes=cfg.mqtt.batch_max_bytes,
        )
        self._buffer.start()
        threads = cfg.runtime.threads or (self.profile.runtime.threads if self.profile else 1)
        try:
            self._store = ModelStore(
                self.data_dir / "models", engine=cfg.runtime.engine, threads=threads,
                warmup_runs=cfg.runtime.warmup_runs,
            )
        except OSError as exc:
            raise ConfigError("data_dir", f"cannot create {self.data_dir / 'models'}: {exc.strerror or exc}") from exc
        self.event("agent_started", message=f"edgeml agent {__version__}", data={"pid": os.getpid()})
        self._start_updates()
        try:  # a crash during probation counts before the candidate serves again
            self._updates.check_boot()
        except Exception:  # the update log unwritable, say: serve anyway; the worker retries
            log.exception("checking the interrupted update at start failed")
        self._load_initial_model()
        if cfg.api_addr:
            from .api import LocalAPI

            try:
                self._api = LocalAPI(self, *cfg.api_host_port)  # type: ignore[misc]
            except OSError as exc:  # in use (errno 98), not an address of this host, a name that does not resolve
                raise ConfigError("api_addr", f"cannot listen on {cfg.api_addr}: {exc.strerror or exc}") from exc
            self._api.start()
        self._start_sync()
        self._updates.start()
        self._start_jobs()
        if cfg.discovery.announce and self._api is not None:
            self._announce()
        self._running = True
        from ._systemd import notify

        notify("READY=1")

    def _abandon_start(self, exc: BaseException) -> None:
        """Stop what a failed start() had started (threads, sockets, the database)."""
        if self._buffer is not None:
            self.event("agent_start_failed", level="error", message=str(exc)[:300])
        try:
            self.stop()
        except Exception as cleanup:  # the start's error is the one to report
            log.error("cleanup after a failed start: %s", cleanup)

    def stop(self) -> None:
        """Stop everything that runs, each part even if another failed to stop (the first
        error is raised at the end): no thread, socket or database is left behind."""
        from ._systemd import notify

        errors: list[Exception] = []

        def step(what: str, action: Any) -> None:
            try:
                action()
            except Exception as exc:
                log.error("stopping the %s failed: %s", what, exc)
                errors.append(exc)

        step("notification", lambda: notify("STOPPING=1"))
        if self._scheduler is not None:
            step("scheduler", lambda: self._scheduler.shutdown(wait=False))
            self._scheduler = None
        if self._announcer is not None:
            step("announcer", self._announcer.close)
            self._announcer = None
        if self._api is not None:
            step("local API", self._api.stop)
            self._api = None
        if self._updates is not None:
            step("update worker", self._updates.stop)
            self._updates = None
        if self._buffer is not None:
            step("telemetry flush", lambda: (self.event("agent_stopped"), self._buffer.flush()))
        if self._sync is not None:
            step("MQTT sync", self._sync.stop)
            self._sync = None
        if self._buffer is not None:
            step("telemetry buffer", self._buffer.close)
            self._buffer = None
        self._model = None
        self._running = False
        if errors:
            raise errors[0]

    def __enter__(self) -> Agent:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _load_initial_model(self) -> None:
        """Serve the stored model; install ``model_path`` first if it is new.

        ``model_path`` is the model to *start* with: it is installed on the first start,
        and again only when the file's content changes. A model the fleet deployed since
        then stays active across restarts.
        """
        assert self._store is not None
        path = self.config.model_path
        if path is not None:
            try:
                from ._models import sha256_file

                digest = sha256_file(Path(path)) if Path(path).exists() else None
                if digest is None or digest != self._store.seed():
                    self._activate(self._store.install(Path(path), seed=True))
                    return
            except (ModelLoadError, OSError) as exc:  # OSError: model_path unreadable (permissions)
                log.error("%s", exc)
                self.event("model_load_failed", level="error", message=str(exc), data={"path": str(path)})
        try:
            model = self._store.load_active()
        except ModelLoadError as exc:
            log.error("%s", exc)
            self.event("model_load_failed", level="error", message=str(exc))
            model = self._fall_back(exc)
        if model is not None:
            self._activate(model)
        else:
            log.warning("no model loaded: /v1/predict answers 503 until one is")

    def _fall_back(self, cause: ModelLoadError) -> LoadedModel | None:
        """The active model does not load or verify: serve the previous one (the rollback
        target) if it does, and make it the active one in the store (one atomic write)."""
        assert self._store is not None
        failed, previous = self._store.active_info(), self._store.previous_info()
        if previous is None:
            return None
        try:
            model = self._store.load_info(previous)
        except ModelLoadError as exc:
            log.error("the previous model does not load either: %s", exc)
            self.event("model_load_failed", level="error", message=str(exc), data={"slot": "previous"})
            return None
        self._store.rollback()
        message = (f"active model {failed.name if failed else '?'} {failed.version if failed else '?'} failed to load "
                   f"({cause}); serving the previous model {previous.name} {previous.version}")
        log.error("%s", message)
        self.event("model_fallback", level="error", message=message,
                   data={"reason": str(cause), "failed": failed.to_json() if failed else None,
                         "restored": previous.to_json()})
        return model

    def _activate(self, model: LoadedModel) -> None:
        # one reference assignment: a request in flight finishes on the model it started
        # with (the old runtime is freed when the last such request drops it)
        self._model = model
        log.info("serving model %s %s (%s)", model.name, model.version, model.info.engine)
        self.event("model_loaded", data={**model.info.to_json(), **model.signature()})

    def load_model(self, path: str | os.PathLike[str]) -> LoadedModel:
        """Install a model file and serve it; the current model stays if it fails."""
        assert self._store is not None
        try:
            model = self._store.install(Path(path))
        except ModelLoadError as exc:
            self.event("model_load_failed", level="error", message=str(exc), data={"path": str(path)})
            raise
        self._activate(model)
        return model

    # ------------------------------------------------------------------ inference
    def predict(self, inputs: Mapping[str, Any]) -> Prediction:
        """Run the active model on ``inputs`` (name -> array or nested list).

        Raises NoModelError (no model), InputError (bad inputs) or ModelError.
        """
        model = self._model
        if model is None:
            raise NoModelError()
        runtime = model.runtime
        try:
            feeds = runtime.prepare(inputs)
            t0 = time.perf_counter()
            outputs = runtime.run(feeds)
            latency = (time.perf_counter() - t0) * 1e6
        except InputError:
            self._count_error()
            raise
        except Exception as exc:  # an engine failure on valid inputs
            self._count_error()
            if self._updates is not None:
                self._updates.observe(None)
            raise ModelError(f"inference failed: {exc}") from exc
        name, version = model.name, model.version
        self._predictions = number = next(self._prediction_counter)  # atomic under the GIL, no lock; the id
        buffer = self._buffer
        if buffer is not None:
            buffer.append_prediction(name, version, latency, model.first_output, outputs[model.first_output])
            if self._sample_rate and random.random() < self._sample_rate:
                # copies: encoded later, and an application may reuse its input buffer (a camera frame)
                buffer.append("sample", {"model": name, "version": version, "prediction_id": f"{self._boot}-{number}",
                                         "inputs": copied(feeds), "outputs": copied(outputs)})
        updates = self._updates
        if updates is not None:  # read each attribute once: the update thread may clear it
            probation, shadow = updates.probation, updates.shadow
            if probation is not None:
                probation.observe(latency)
            if shadow is not None:
                shadow.offer(feeds, model, outputs, latency)
        return _new_prediction(Prediction, (outputs, name, version, latency, number, self._boot))

    def feedback(self, label: Any, predicted: Any = None, inputs: Mapping[str, Any] | None = None,
                 prediction_id: str | None = None) -> dict[str, Any]:
        """Record the true label of a prediction (``predicted``: what the application got).
        With ``inputs``, the record is also a labeled sample for retraining; with
        ``prediction_id`` (the ``id`` of the predict answer) the cloud joins it to that
        prediction's sample record."""
        if not isinstance(label, int | float | str) or isinstance(label, bool):
            raise InputError('"label" must be a number or a string')
        if prediction_id is not None and (not isinstance(prediction_id, str) or not 0 < len(prediction_id) <= 64):
            raise InputError('"id" must be the prediction id (a string of at most 64 characters)')
        if predicted is not None and (not isinstance(predicted, int | float | str) or isinstance(predicted, bool)):
            raise InputError('"predicted" must be a number or a string')
        model = self._model
        fields: dict[str, Any] = {
            "model": model.name if model else None, "version": model.version if model else None,
            "label": label, "predicted": predicted, "correct": None if predicted is None else label == predicted,
        }
        if prediction_id is not None:
            fields["prediction_id"] = prediction_id
        if inputs is not None:
            if model is None:
                raise NoModelError()
            fields["inputs"] = dict(model.runtime.prepare(inputs))  # checked like a prediction's
        if self._buffer is not None:
            self._buffer.append("feedback", fields)
        return {k: v for k, v in fields.items() if k != "inputs"}

    def _count_error(self) -> None:
        with self._counter_lock:
            self._errors += 1

    @property
    def model(self) -> LoadedModel | None:
        return self._model

    # ------------------------------------------------------------------ telemetry
    def event(self, name: str, *, level: str = "info", message: str = "", data: dict[str, Any] | None = None) -> None:
        if self._buffer is not None:
            self._buffer.append("event", {"name": name, "level": level, "message": message, "data": data or {}})

    def _metrics(self) -> None:
        assert self._buffer is not None
        stats = self._buffer.stats()
        with self._counter_lock:
            predictions, errors = self._predictions, self._errors
        self._buffer.append(
            "metrics",
            {
                "cpu_percent": self._cpu.percent(),
                "rss_bytes": rss_bytes(),
                "uptime_s": round(time.time() - self.started_at, 3),
                "predictions_total": predictions,
                "prediction_errors_total": errors,
                "buffer_records": stats.records + stats.pending,
                "buffer_bytes": stats.bytes,
                "dropped_total": stats.dropped_total,
                "dropped": stats.dropped,
            },
        )
        shadow = self._updates.shadow_report() if self._updates is not None else None
        if shadow is not None:
            self._buffer.append("shadow", shadow)
        if stats.dropped_total > self._last_dropped_reported:
            self.event(
                "telemetry_dropped", level="warning",
                message=f"{stats.dropped_total - self._last_dropped_reported} telemetry records dropped: over the buffer "
                        "budget (counted by class) or, while the disk refuses writes, over the in-memory limit "
                        "(counted as memory)",
                data={"dropped": stats.dropped, "budget_bytes": self.config.telemetry.buffer_max_bytes},
            )
            self._last_dropped_reported = stats.dropped_total

    def flush_metrics(self) -> None:
        """Record a metrics sample (and shadow statistics) now; also runs on the scheduler."""
        self._metrics()

    # ------------------------------------------------------------------ sync
    def _start_sync(self) -> None:
        from .sync import MqttSync

        assert self._buffer is not None
        self._last_dropped_reported = self._buffer.stats().dropped_total
        self._sync = MqttSync(self.config, self._buffer, agent_version=__version__, on_message=self._on_message)
        broker = self.config.broker_url
        if broker is None and self.config.discovery.browse:
            try:
                from .discovery import find_broker

                broker = find_broker(self.config.discovery.timeout_s)
            except BrokerNotFound as exc:
                log.warning("%s; running offline, telemetry is kept in the buffer", exc)
                self.event("broker_not_found", level="warning", message=str(exc))
        if broker is not None:
            self._sync.start(broker)

    def _start_updates(self) -> None:
        from .updates import UpdateManager

        assert self._store is not None
        self._updates = UpdateManager(
            self.config, self._store, current=lambda: self._model, activate=self._activate,
            event=self.event, report=self._report_state, profile=self.profile,
        )

    def _report_state(self, payload: bytes) -> None:
        if self._sync is not None:
            self._sync.publish_state(payload)

    def _on_message(self, topic: str, payload: bytes) -> None:
        """Runs on paho's network thread: check and hand over, never block."""
        from .updates import UpdateRejected

        updates = self._updates
        if updates is None:  # stopping
            return
        try:
            _, _, leaf = parse_topic(topic)
            if leaf != DESIRED:
                raise UpdateRejected("malformed", f"unexpected topic {topic}")
            updates.offer(payload)
        except (ValueError, UpdateRejected) as exc:
            reason = getattr(exc, "reason", "malformed")
            message = str(exc).splitlines()[0][:300]
            if reason in ("malformed", "too_large"):
                with self._counter_lock:
                    self._bad_messages += 1
                log.warning("rejected message on %s: %s", topic, message)
                self.event("bad_message", level="warning", message=message, data={"topic": topic, "bytes": len(payload)})
            else:
                updates.note_rejection(exc)

    # ------------------------------------------------------------------ jobs
    def _start_jobs(self) -> None:
        from apscheduler.schedulers.background import BackgroundScheduler

        tel = self.config.telemetry
        scheduler = BackgroundScheduler(daemon=True)
        scheduler.add_job(self._metrics, "interval", seconds=tel.metrics_interval_s, id="metrics",
                          coalesce=True, max_instances=1)
        scheduler.add_job(self._housekeeping, "interval", seconds=tel.housekeeping_interval_s, id="housekeeping",
                          coalesce=True, max_instances=1)
        from ._systemd import watchdog_interval

        interval = watchdog_interval()
        if interval is not None:
            scheduler.add_job(self._watchdog, "interval", seconds=interval, id="watchdog", coalesce=True,
                              max_instances=1)
        scheduler.start()
        self._scheduler = scheduler

    def alive(self) -> bool:
        """True while the threads the agent needs are running (what the watchdog vouches for)."""
        buffer, sync = self._buffer, self._sync
        threads = [getattr(buffer, "_thread", None), getattr(sync, "_thread", None)]
        return self._running and all(t is None or t.is_alive() for t in threads)

    def _watchdog(self) -> None:
        from ._systemd import notify

        if self.alive():
            notify("WATCHDOG=1")

    def _housekeeping(self) -> None:
        if self._buffer is not None:
            self._buffer.housekeeping()
        if self._updates is not None:
            self._updates.retry()

    def _announce(self) -> None:
        """Announce the local API on the LAN, in the background (probing takes seconds)."""

        def register() -> None:
            try:
                from .discovery import Announcer

                self._announcer = Announcer(self.config.device_id, self.config.fleet, self._api.port, __version__)
            except Exception as exc:  # zeroconf needs multicast; a device without it still works
                log.warning("cannot announce the agent on the LAN: %s", exc)

        threading.Thread(target=register, name="edgeml-announce", daemon=True).start()

    # ------------------------------------------------------------------ status
    def health(self) -> dict[str, Any]:
        model = self._model
        return {
            "status": "ok" if model is not None else "no_model",
            "model": model.name if model else None,
            "version": model.version if model else None,
        }

    def status(self) -> dict[str, Any]:
        model = self._model
        with self._counter_lock:
            counters = {"predictions": self._predictions, "prediction_errors": self._errors,
                        "bad_messages": self._bad_messages}
        buffer = self._buffer.stats().to_json() if self._buffer else None
        sync = self._sync.stats() if self._sync else {"connected": False, "broker": None}
        return {
            "running": self._running,
            "agent_version": __version__,
            "device_id": self.config.device_id,
            "fleet": self.config.fleet,
            "uptime_s": round(time.time() - self.started_at, 3),
            "model": ({**model.info.to_json(), **model.signature()} if model else None),
            "applied_revision": self._updates.record.applied_revision if self._updates else None,
            "update": self._updates.state_document()["update"] if self._updates else None,
            "last_rejection": self._updates.last_rejection if self._updates else None,
            "counters": counters,
            "buffer": buffer,
            "sync": sync,
            "api": f"http://{self._api.host}:{self._api.port}" if self._api else None,
            "hardware_profile": self.profile.model_dump() if self.profile else None,
        }


__all__ = ["Agent", "Prediction"]
