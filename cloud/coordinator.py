"""The coordinator's composition root: the only place that knows every cloud piece.

    with Coordinator(load_cloud_config("cloud.yaml")) as coordinator:
        print(coordinator.url)            # http://127.0.0.1:8480
        ...

``start()`` opens the store (applying migrations), the artifact store and the model
registry, starts the :class:`~cloud.ingest.Ingestor` (waiting up to
``broker_wait_s`` for its subscription; a broker that is down is retried in the
background while the API serves), then the HTTP server (uvicorn, on its own thread,
on a socket bound here so a busy port fails ``start()`` with a clear error).
Desired states (:mod:`cloud._desired_states`) are plugged in at the marked hook: a
leader election on the store's database, a publisher to the broker and the writer
signing with ``signing_key`` (none: their endpoints answer 503).
``stop()`` undoes it in reverse order: no more requests, step down as leader, drain
and acknowledge ingestion, close the store. Replicas may run side by side on one PostgreSQL store
(``ingest.shared_group``).
"""

from __future__ import annotations

import enum
import logging
import socket
import threading
from typing import Any

from ._config import CloudConfig
from ._exceptions import CloudError

log = logging.getLogger(__name__)

__all__ = ["Coordinator", "CoordinatorState"]


class CoordinatorState(enum.Enum):
    NEW = "new"
    RUNNING = "running"
    STOPPED = "stopped"


class Coordinator:
    """Store + ingestion + registry + REST API, with ``start()``/``stop()``."""

    def __init__(self, config: CloudConfig | None = None) -> None:
        self.config = config or CloudConfig()
        self.state = CoordinatorState.NEW
        self.store: Any = None
        self.artifacts: Any = None
        self.registry: Any = None
        self.ingestor: Any = None
        self.desired: Any = None  # DESIRED-STATE HOOK: the DesiredStates service (election + writer)
        self.expiry: Any = None  # DESIRED-STATE HOOK: the ExpiryRefresher (desired.ttl_s set)
        self.rollouts: Any = None  # ROLLOUTS HOOK: the RolloutService (ticks on its own thread)
        self.training: Any = None  # TRAINING HOOK: ContinuousTraining (its scheduler, its TrainingService)
        self.app: Any = None
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self._address: tuple[str, int] | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> Coordinator:
        if self.state is not CoordinatorState.NEW:
            raise CloudError(f"coordinator is {self.state.value}; make a new one to start again")
        try:
            self._start()
        except BaseException:
            self._shutdown()
            raise
        self.state = CoordinatorState.RUNNING
        return self

    def _start(self) -> None:
        from .artifacts import ArtifactStore
        from .ingest import Ingestor
        from .registry.models import ModelRegistry
        from .store import open_store

        cfg = self.config
        sock = _bind(*cfg.http_host_port)  # first: a busy port fails before anything else starts
        bound = sock.getsockname()[:2]
        if cfg.public_url is None and bound[0] in ("0.0.0.0", "::"):
            log.warning("public_url is not set and http_addr listens on every interface: desired states "
                        "give devices %s artifact URLs; set public_url", cfg.public_base(bound))
        try:
            self.store = open_store(cfg.store_url)
            self.artifacts = ArtifactStore(cfg.artifact_dir)
            self.registry = ModelRegistry(self.store, self.artifacts, cfg.signing_key)
            if self.registry.key_id is None:
                log.warning("no signing_key: models are registered unsigned and devices will refuse them")
            self.ingestor = Ingestor(self.store, cfg.ingest_config())
            self.ingestor.start(timeout=None)
            if not self.ingestor.subscribed.wait(cfg.broker_wait_s):
                log.warning("broker %s not reachable yet; serving the API and retrying", cfg.broker_url)
            routers = self._plug_desired_state()
            routers += self._plug_rollouts()
            routers += self._plug_training()
            routers += self._plug_console()
            routers += self._plug_hil()
            self.app = self._make_app(routers)
            self._serve(sock)
        except BaseException:
            sock.close()
            raise

    # ------------------------------------------------------------------ desired-state hook
    # >>> DESIRED-STATE HOOK
    def _plug_desired_state(self) -> list[Any]:
        """Build and start the desired-state service (election, publisher, writer); its routes.

        Without a signing key nothing runs and the routes answer 503 (desired states must
        be signed). With ``desired.ttl_s`` every document expires, and an
        :class:`~cloud.desired.ExpiryRefresher` re-issues them while this replica leads.
        Stopped in ``_shutdown``, after the HTTP server and before ingestion."""
        from ._desired_states import DesiredStates
        from .api._desired import desired_router
        from .desired import ExpiryRefresher

        cfg = self.config
        self.desired = DesiredStates(
            self.store, self.registry, db_url=cfg.store_url, broker_url=cfg.broker_url, signing_key=cfg.signing_key,
            public_base=self._public_base, preregistered_only=cfg.ingest.policy == "preregistered",
            broker_tls=cfg.broker_tls, ttl_s=cfg.desired.ttl_s,
        )
        self.desired.start()
        if cfg.desired.ttl_s is not None and self.desired.writer is not None:
            self.expiry = ExpiryRefresher(self.desired.writer).start()
        return [desired_router(self.desired)]

    def _public_base(self) -> str:
        return self.config.public_base(self._address)

    # <<< DESIRED-STATE HOOK

    # >>> ROLLOUTS HOOK
    def _plug_rollouts(self) -> list[Any]:
        """The rollout engine over the desired states; it ticks every ``EDGEML_ROLLOUTS_TICK_S``
        seconds (default 5) and acts only while this replica leads. Stopped before desired states."""
        import os

        from .api._rollouts import rollout_router
        from .rollouts import RolloutService

        self.rollouts = RolloutService(self.store, self.desired, self.registry)
        if self.desired.enabled:
            self.rollouts.start_background(float(os.environ.get("EDGEML_ROLLOUTS_TICK_S", "5")))
        return [rollout_router(self.rollouts)]

    # <<< ROLLOUTS HOOK

    # >>> TRAINING HOOK
    def _plug_training(self) -> list[Any]:
        """Training runs (REST), drift measurements and continuous training: an apscheduler job
        every ``training.check_interval_s`` when ``training.enabled``, acting only while this
        replica leads (a lone SQLite coordinator always leads). Stopped before rollouts."""
        from .api._training import training_router
        from .drift import DriftMonitor
        from .training._service import ContinuousTraining, TrainingService

        cfg, tc = self.config, self.config.training
        service = TrainingService(self.store, self.registry, workdir=cfg.artifact_dir / "training",
                                  recipes_dir=tc.recipes_dir)
        monitor = DriftMonitor(self.store, self.registry, threshold=tc.drift_threshold, window_s=tc.window_s,
                               min_samples=tc.min_samples, min_predictions=tc.min_predictions, cohort_tag=tc.cohort_tag)
        desired = self.desired

        def leads() -> bool:
            return desired.is_leader if desired.election is not None else self.store.dialect == "sqlite"

        self.training = ContinuousTraining(tc, service, monitor, is_leader=leads, rollouts=self.rollouts)
        if tc.enabled:
            self.training.start()
        return [training_router(service, self.training, monitor)]

    # <<< TRAINING HOOK

    def _plug_hil(self) -> list[Any]:
        """HIL runs reported by ``edgeml hil run --report``: what a rollout's HIL gate reads."""
        from .api._hil import hil_router

        return [hil_router(self.store)]

    # >>> CONSOLE HOOK
    def _plug_console(self) -> list[Any]:
        """The web console (``/console/``) and its JSON and live-update (SSE) routes."""
        from .api._console import console_router

        return [console_router(self.store, self.registry, self.rollouts,
                               closing=lambda: self._server is not None and self._server.should_exit)]

    # <<< CONSOLE HOOK

    def _make_app(self, routers: list[Any]) -> Any:
        from .api import create_app

        cfg = self.config
        return create_app(
            self.store, self.registry, self.artifacts, ingestor=self.ingestor, max_upload_bytes=cfg.max_upload_bytes,
            metrics=cfg.metrics.enabled, lag_window_s=cfg.metrics.lag_window_s, routers=routers,
            auth_required=cfg.auth.required,
        )

    def _serve(self, sock: socket.socket) -> None:
        import uvicorn

        config = uvicorn.Config(
            self.app, log_config=None, log_level=self.config.log_level, access_log=False, lifespan="off",
        )
        self._server = uvicorn.Server(config)
        self._address = sock.getsockname()[:2]
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [sock]}, name="edgeml-coordinator-http", daemon=True
        )
        self._thread.start()
        while not self._server.started:
            self._thread.join(0.02)
            if not self._thread.is_alive():
                raise CloudError(f"the HTTP server on {self.config.http_addr} stopped while starting (see the log)")

    def stop(self, timeout: float = 10.0) -> None:
        """Stop serving, drain ingestion (commit and acknowledge what was received), close the store."""
        if self.state is CoordinatorState.RUNNING:
            self._shutdown(timeout)
        self.state = CoordinatorState.STOPPED

    def _shutdown(self, timeout: float = 10.0) -> None:
        if self._server is not None and self._thread is not None:
            self._server.should_exit = True
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.error("HTTP server did not stop within %.1fs", timeout)
        if self.training is not None:
            self.training.stop(timeout)  # TRAINING HOOK: no check, no run after this
        if self.rollouts is not None:
            self.rollouts.stop(timeout)  # ROLLOUTS HOOK: no tick after desired states stop
        if self.expiry is not None:
            self.expiry.stop(timeout)  # DESIRED-STATE HOOK: no re-issue after desired states stop
        if self.desired is not None:
            self.desired.stop(timeout)  # DESIRED-STATE HOOK: stopped before ingestion
        if self.ingestor is not None:
            self.ingestor.stop(timeout)
        if self.store is not None:
            self.store.close()

    def __enter__(self) -> Coordinator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ where
    @property
    def address(self) -> tuple[str, int]:
        """``(host, port)`` the API listens on (the real port when ``http_addr`` ends in ``:0``)."""
        if self._address is None:
            raise CloudError("coordinator not started")
        return self._address

    @property
    def url(self) -> str:
        host, port = self.address
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise CloudError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    sock.set_inheritable(True)
    return sock
