"""The coordinator's desired-state service: election + publisher + writer, behind two calls.

    states = DesiredStates(store, registry, db_url=..., broker_url=..., signing_key="fleet.key",
                           public_base=lambda: "https://edgeml.example.com").start()
    states.deploy("plant", "dev-1", "mlp@champion")     # the signed document, revision n+1
    states.show("plant", "dev-1")                       # the current document
    states.stop()

``deploy`` resolves ``name@version|alias`` through the :class:`ModelRegistry` into a
:class:`~edgeml.protocol.ModelRef` with the absolute artifact URL
``{public_base}/v1/artifacts/{sha256}``, then calls :meth:`DesiredStateWriter.set`. The
REST routes (``cloud.api._desired``) and through them the CLI call these two methods.

Without a signing key nothing is started and both calls raise :class:`SigningKeyMissing`:
desired states must be signed. Leadership comes from a :class:`LeaderElection` on the
store's database (SQLite: always the leader). Each time this replica becomes the leader,
the republish worker thread publishes every stored document again (the election calls
back on its own thread, which must not block on the broker); a failed republish is
retried with backoff while this replica still leads.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any

from edgeml.protocol import ModelRef, check_id

from ._exceptions import (
    CloudError,
    InvalidInput,
    NotFound,
    NotLeader,
    PublishError,
    SigningKeyMissing,
)
from .desired import DesiredStateWriter, MqttPublisher
from .leader import LeaderElection
from .registry.models import ModelRegistry
from .store import Store

log = logging.getLogger(__name__)

__all__ = ["DesiredStates"]

#: Backoff of the republish worker after a failure (seconds): first and longest wait.
REPUBLISH_RETRY_S = (0.5, 30.0)
NO_KEY = ("desired states must be signed, and this coordinator has no signing key: "
          "set signing_key in cloud.yaml (or EDGEML_SIGNING_KEY) and restart it")


class DesiredStates:
    """Leader-only, signed desired states of devices, deployed by model reference."""

    def __init__(
        self, store: Store, registry: ModelRegistry, *, db_url: str, broker_url: str, signing_key: Any,
        public_base: Callable[[], str], preregistered_only: bool = False, election_retry_s: float = 1.0,
        broker_tls: Any = None, ttl_s: int | None = None,
    ) -> None:
        self.store = store
        self.registry = registry
        self.public_base = public_base
        self.preregistered_only = preregistered_only
        self.election: LeaderElection | None = None
        self.publisher: MqttPublisher | None = None
        self.writer: DesiredStateWriter | None = None
        self._stopping = threading.Event()
        self._wake = threading.Event()  # set on the election thread, consumed by the worker
        self._worker: threading.Thread | None = None
        if signing_key is None:
            return
        self.election = LeaderElection(db_url, retry_s=election_retry_s, on_change=self._on_leader_change)
        self.publisher = MqttPublisher(broker_url, tls=broker_tls)
        self.writer = DesiredStateWriter(store, self.publisher, signing_key, is_leader=lambda: self.is_leader,
                                         ttl_s=ttl_s)  # with ttl_s every document expires

    # ------------------------------------------------------------------ lifecycle
    @property
    def enabled(self) -> bool:
        return self.writer is not None

    @property
    def is_leader(self) -> bool:
        return self.election is not None and self.election.is_leader

    def start(self) -> DesiredStates:
        if self.election is None or self.publisher is None or self.writer is None:
            log.warning("no signing_key: the desired-state endpoints answer 503")
            return self
        self._worker = threading.Thread(
            target=self._republish_loop, args=(self.writer,), name="edgeml-desired-republish", daemon=True
        )
        self._worker.start()
        self.publisher.connect()
        self.election.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Step down (another replica takes over), finish or abandon a republish, disconnect."""
        self._stopping.set()
        self._wake.set()
        if self.election is not None:
            self.election.stop(timeout)
        if self._worker is not None:
            self._worker.join(timeout)
            if self._worker.is_alive():
                log.error("desired-state republish did not stop within %.1fs", timeout)
            self._worker = None
        if self.publisher is not None:
            self.publisher.close()

    # ------------------------------------------------------------------ calls
    def show(self, fleet: str, device: str) -> dict[str, Any]:
        """The device's current signed document; :class:`NotFound` if none was issued."""
        writer = self._writer()
        _check_ids(fleet, device)
        doc = writer.get(fleet, device)
        if doc is None:
            raise NotFound(f"no desired state for {fleet}/{device} (set one with `edgeml fleet deploy`)")
        return doc

    def deploy(
        self, fleet: str, device: str, model: str | None, shadow: str | None = None, expires_in: int | None = None,
        *, if_revision: int | None = None,
    ) -> dict[str, Any]:
        """Issue the device's next desired state with these models; return the signed document.
        ``if_revision``: only over that revision (a read-modify-write), else :class:`Conflict`.

        :class:`NotFound` for an unknown model, or an unknown device when only
        pre-registered devices are accepted; :class:`NotLeader` off the leader;
        :class:`PublishError` if the broker did not take it (stored all the same).
        """
        writer = self._writer()
        _check_ids(fleet, device)
        if expires_in is not None and expires_in <= 0:
            raise InvalidInput(f"expires_in must be > 0 seconds, got {expires_in}")
        if not self.is_leader:  # before touching anything else: the message should say this
            raise NotLeader("this coordinator replica is not the leader; desired states are written by the leader")
        if self.preregistered_only:
            self._require_registered(fleet, device)
        refs = self._model_ref(model), self._model_ref(shadow)
        try:
            return writer.set(fleet, device, refs[0], refs[1], expires_in, if_revision=if_revision)
        except PublishError:
            self._wake.set()  # stored: the republish worker sends it once the broker takes it
            raise

    def deploy_many(
        self, fleet: str, items: Sequence[tuple[str, str | None, str | None]],
    ) -> dict[str, dict[str, Any] | CloudError]:
        """:meth:`deploy` for many devices, ``(device, model, shadow)`` each, in one
        transaction and one round of publishes (what a rollout step does). Per device: the
        signed document, or the :class:`CloudError` that kept it from being issued (unknown
        model or device). :class:`InvalidInput` if a device appears twice, :class:`NotLeader`
        off the leader. If the broker did not take the documents they are stored all the
        same, returned as usual, and the republish worker sends them when it can."""
        writer = self._writer()
        if not self.is_leader:
            raise NotLeader("this coordinator replica is not the leader; desired states are written by the leader")
        devices = [device for device, _, _ in items]
        if len(set(devices)) != len(devices):
            twice = sorted({d for d in devices if devices.count(d) > 1})
            raise InvalidInput(f"device(s) {twice} appear more than once in one batch")
        outcome: dict[str, dict[str, Any] | CloudError] = {}
        refs: dict[str | None, ModelRef | CloudError | None] = {None: None}
        batch = []
        for device, model, shadow in items:
            try:
                _check_ids(fleet, device)
                if self.preregistered_only:
                    self._require_registered(fleet, device)
                for ref in (model, shadow):
                    if ref not in refs:
                        try:
                            refs[ref] = self._model_ref(ref)
                        except CloudError as exc:
                            refs[ref] = exc
                    if isinstance(found := refs[ref], CloudError):
                        raise found
            except CloudError as exc:
                outcome[device] = exc
                continue
            batch.append((device, refs[model], refs[shadow]))
        try:
            signed = writer.set_many(fleet, batch)  # type: ignore[arg-type]
        except PublishError as exc:  # stored: the republish worker sends them once the broker takes them
            log.warning("desired states of %d device(s) stored but not published yet: %s", len(batch), exc)
            self._wake.set()
            signed = exc.documents
        for (device, _, _), doc in zip(batch, signed, strict=True):
            outcome[device] = doc
        return outcome

    # ------------------------------------------------------------------ internals
    def _writer(self) -> DesiredStateWriter:
        if self.writer is None:
            raise SigningKeyMissing(NO_KEY)
        return self.writer

    def _require_registered(self, fleet: str, device: str) -> None:
        with self.store.transaction() as tx:
            known = tx.find_device(fleet, device) is not None
        if not known:
            raise NotFound(
                f"no device {fleet}/{device}: with ingest.policy preregistered, register it first "
                f"(PUT /v1/devices/{fleet}/{device} or `edgeml fleet register {device} --fleet {fleet}`)"
            )

    def _model_ref(self, ref: str | None) -> ModelRef | None:
        if ref is None:
            return None
        record = self.registry.resolve(ref)
        url = f"{self.public_base()}/v1/artifacts/{record.sha256}"
        return ModelRef(name=record.name, version=record.version, url=url, sha256=record.sha256, size=record.size)

    # ------------------------------------------------------------------ election thread
    def _on_leader_change(self, leader: bool) -> None:
        log.info("desired states: %s", "leading, republishing every document" if leader else "not leading")
        if leader:
            self._wake.set()  # hand over: republishing waits on the broker, the election must not

    # ------------------------------------------------------------------ republish worker thread
    def _republish_loop(self, writer: DesiredStateWriter) -> None:
        first, longest = REPUBLISH_RETRY_S
        delay = first
        while True:
            self._wake.wait()
            self._wake.clear()
            if self._stopping.is_set():
                return
            if not self.is_leader:
                continue
            try:
                count = writer.republish_all()
            except NotLeader:
                continue  # lost it meanwhile; the next leader republishes
            except CloudError as exc:  # PublishError, StoreError: transient, retry while leading
                log.warning("republishing desired states failed (retrying in %.1fs): %s", delay, exc)
                if self._stopping.wait(delay):
                    return
                delay = min(delay * 2, longest)
                self._wake.set()
                continue
            delay = first
            log.info("republished %d desired state(s)", count)


def _check_ids(fleet: str, device: str) -> None:
    try:
        check_id(fleet, "fleet")
        check_id(device, "device")
    except ValueError as exc:
        raise InvalidInput(str(exc)) from None
