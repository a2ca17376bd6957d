"""The update worker's bookkeeping, on a real model store and update log, without a broker:
what it does with a document that arrives while an update is unfinished, what a clean stop
leaves, what a transient failure keeps, and what the store's cleanup may delete."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from edgeml._config import AgentConfig
from edgeml._models import LoadedModel, ModelStore
from edgeml._testing import models as modelgen
from edgeml.updates import State, UpdateManager


class Device:
    """An update manager with the agent's callbacks reduced to what they record."""

    def __init__(self, root: Path, **updates: Any) -> None:
        self.a = modelgen.build_onnx_mlp(root / "a.onnx")
        self.b = modelgen.build_onnx_mlp(root / "b.onnx", seed=7, version="2.0.0")
        config = AgentConfig(data_dir=root / "data", device_id="dev", api_addr=None,
                             updates={"require_signature": False, "probation_s": 0, **updates})
        self.store = ModelStore(root / "data" / "models", warmup_runs=1)
        self.serving: LoadedModel | None = None
        self.events: list[str] = []
        self.manager = UpdateManager(config, self.store, current=lambda: self.serving, activate=self._activate,
                                     event=lambda name, **kw: self.events.append(name), report=lambda payload: None)

    def _activate(self, model: LoadedModel) -> None:
        self.serving = model

    def desired(self, revision: int, model: LoadedModel) -> dict[str, Any]:
        return {"v": 1, "revision": revision, "issued_at": int(time.time()),
                "model": {"name": "mlp", "version": model.info.version, "sha256": model.info.sha256}}


def _saved(device: Device) -> Any:
    """The update record as the next start reads it."""
    from edgeml.updates._machine import UpdateLog

    log = UpdateLog(device.a.parent / "data" / "updates.db")
    try:
        return log.load()
    finally:
        log.close()


@pytest.fixture
def device(tmp_path: Path) -> Device:
    return Device(tmp_path)


def test_a_newer_document_waits_until_the_interrupted_update_is_finished(device: Device) -> None:
    a = device.serving = device.store.install(device.a)
    b = device.store.load(device.b)
    stored = device.store.keep(device.b, b)
    m = device.manager
    # revision 5 was caught halfway by an error (its candidate verified into the store)
    m.record = m.log.save(replace(m.record, state=State.INSTALLING, revision=5, target={"sha256": stored.sha256},
                                  candidate={"file": stored.file, "sha256": stored.sha256}))
    newer = device.desired(6, a)  # the operator goes back to model A
    m._guarded(lambda: m._begin(newer), newer)
    assert (m.record.state, m.record.revision) == (State.INSTALLING, 5)  # not applied over the unfinished one
    assert m._pending is newer and m.record.applied_revision is None
    m._resume()  # revision 5 finishes first ...
    assert (m.record.state, m.record.result, m.record.revision) == (State.IDLE, "success", 5)
    assert device.serving is not None and device.serving.info.sha256 == b.info.sha256
    doc, m._pending = m._pending, None
    m._begin(doc)  # ... then revision 6 brings model A back
    assert (m.record.result, m.record.applied_revision) == ("success", 6)
    assert device.serving.info.sha256 == a.info.sha256 and device.store.active_info().sha256 == a.info.sha256


def test_a_clean_stop_is_no_attempt_and_probation_keeps_the_time_served(device: Device) -> None:
    m = device.manager
    m.record = m.log.save(replace(m.record, state=State.DOWNLOADING, revision=3, extra={"attempts": {"downloading": 2}}))
    m.stop()
    assert _saved(device).extra["attempts"] == {"downloading": 1}  # the interrupted attempt did not die
    again = Device(device.a.parent).manager
    again.record = again.log.save(replace(again.record, state=State.PROBATION, revision=3,
                                          extra={"entered": True, "served_s": 10.0}))
    again._probation_t0 = time.monotonic() - 25  # 15 s more served in this run
    again.stop()
    extra = _saved(device).extra
    assert extra["clean_stop"] is True and 24 <= extra["served_s"] < 30


def test_a_transient_failure_keeps_the_partial_download(device: Device) -> None:
    m = device.manager
    m.record = replace(m.record, state=State.DOWNLOADING, revision=9, document={"revision": 9})
    part, other = m._part(), device.store.root / "incoming-8.part"
    part.write_bytes(b"x" * 100)
    other.write_bytes(b"y")
    m._fail("download_failed", "the server went away", transient=True)
    assert part.read_bytes() == b"x" * 100 and not other.exists()  # resumed from byte 100 on the retry
    m._fail("hash_mismatch", "not the artifact")
    assert not part.exists()


def test_cleanup_deletes_nothing_while_the_pointer_cannot_be_read(device: Device) -> None:
    store = device.store
    a = store.install(device.a)
    orphan = store.root / ("0" * 64 + ".ort")
    orphan.write_bytes(b"ORTM")
    pointer = store.root / "active.json"
    good = pointer.read_text()
    pointer.write_text("{torn")
    assert store.collect_garbage() == 0 and orphan.exists() and store.path_of(a.info).exists()
    pointer.write_text(good)
    assert store.collect_garbage() == 1 and not orphan.exists() and store.path_of(a.info).exists()


def test_every_start_that_follows_a_crash_on_probation_counts_until_the_limit(tmp_path: Path) -> None:
    """The candidate kills the agent before the worker runs (while it loads, or on its first
    request): each start counts, and the one at the limit boots into the previous model."""
    first = Device(tmp_path, crash_loop_limit=3)
    a = first.store.install(first.a)
    b = first.store.install(first.b)  # switched: a is the rollback target
    m = first.manager
    m.record = m.log.save(replace(m.record, state=State.PROBATION, revision=4, candidate=b.info.to_json(),
                                  extra={"entered": True}))
    m.log.close()
    for crashes in (1, 2, 3):
        boot = Device(tmp_path, crash_loop_limit=3)  # a new process, same data dir
        boot.manager.check_boot()
        assert _saved(boot).crashes == crashes
        active = boot.store.active_info()
        assert active is not None and active.sha256 == (b if crashes < 3 else a).info.sha256
        boot.manager.log.close()  # and it dies again before the worker runs
    record = _saved(first)
    assert (record.state, record.result, record.reason) == (State.ROLLING_BACK, "rolled_back", "crash_loop")


def test_a_start_on_another_model_is_no_crash_on_probation(tmp_path: Path) -> None:
    first = Device(tmp_path)
    a = first.store.install(first.a)
    b = first.store.install(first.b)
    first.store.switch(a.info)  # the candidate no longer loaded: the agent fell back
    m = first.manager
    m.record = m.log.save(replace(m.record, state=State.PROBATION, revision=4, candidate=b.info.to_json(),
                                  extra={"entered": True}))
    m.check_boot()
    assert _saved(first).crashes == 0  # the worker reports candidate_lost


def test_a_crash_on_probation_that_the_start_could_not_save_is_counted_by_the_worker(tmp_path: Path) -> None:
    first = Device(tmp_path)
    first.store.install(first.a)
    b = first.store.install(first.b)
    m = first.manager
    m.record = m.log.save(replace(m.record, state=State.PROBATION, revision=4, candidate=b.info.to_json(),
                                  extra={"entered": True}))
    save = m.log.save

    def full_disk(record: Any) -> Any:
        raise OSError(28, "No space left on device")

    m.log.save = full_disk  # type: ignore[method-assign]
    with pytest.raises(OSError):
        m.check_boot()  # the agent logs it and serves anyway
    m.log.save = save  # type: ignore[method-assign]
    assert _saved(first).crashes == 0 and m._boot_checked is False  # so the worker's probation counts it
    m.check_boot()
    assert _saved(first).crashes == 1 and m._boot_checked is True  # counted once: the worker does not again
