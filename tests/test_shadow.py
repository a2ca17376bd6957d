"""Shadow mode's cost bounds (sample rate, CPU share, a full queue) and a shadow model that
fails: its errors are counted and reported, callers keep getting the primary's answers."""

from __future__ import annotations

import math
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from edgeml._models import LoadedModel, ModelStore
from edgeml._testing import models as modelgen
from edgeml.updates._shadow import ShadowRunner

from .conftest import Broker, wait_until
from .test_updates import Fleet, X, make_agent
from .test_updates import fleet as fleet  # noqa: F401 - the coordinator fixture

BATCH_8 = np.random.default_rng(8).standard_normal((8, 4)).astype(np.float32)



@pytest.fixture
def store(tmp_path: Path) -> ModelStore:
    return ModelStore(tmp_path / "store", warmup_runs=1)


def offer(runner: ShadowRunner, primary: LoadedModel, feeds: dict[str, np.ndarray], n: int) -> None:
    """``n`` predictions by the primary, each offered to the shadow as the agent does."""
    for _ in range(n):
        t0 = time.perf_counter()
        outputs = primary.runtime.run(feeds)
        runner.offer(feeds, primary, outputs, (time.perf_counter() - t0) * 1e6)


@pytest.mark.parametrize("rate", [0.1, 0.25, 0.4, 1.0])
def test_the_shadow_runs_on_its_sample_rate_of_the_predictions(
    rate: float, store: ModelStore, models: dict[str, Path]
) -> None:
    primary, shadow = store.load(models["onnx_float"]), store.load(models["onnx_int8"])
    n = 2000
    runner = ShadowRunner(shadow, sample_rate=rate, cpu_share=1.0, queue_size=n)
    try:
        offer(runner, primary, {"input": X}, n)
        runner.drain(60)
        stats = runner.take_stats()
    finally:
        runner.close()
    assert stats is not None and stats["errors"] == 0 and stats["skipped"] == 0
    assert stats["compared"] == math.floor(n * rate + 1e-9), stats  # exactly its share, not about it


def test_callers_on_many_threads_get_the_same_share(store: ModelStore, models: dict[str, Path]) -> None:
    """offer() runs on every caller's thread (HTTP handlers): concurrent callers must not
    make the sampler lose or double count."""
    primary, shadow = store.load(models["onnx_float"]), store.load(models["onnx_int8"])
    runner = ShadowRunner(shadow, sample_rate=0.25, cpu_share=1.0, queue_size=4000)
    try:
        threads = [threading.Thread(target=offer, args=(runner, primary, {"input": X}, 1000)) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        runner.drain(60)
        stats = runner.take_stats()
    finally:
        runner.close()
    assert stats is not None and stats["compared"] == 1000 and stats["skipped"] == 0


def test_a_zero_sample_rate_never_runs_the_shadow(store: ModelStore, models: dict[str, Path]) -> None:
    primary = store.load(models["onnx_float"])
    runner = ShadowRunner(store.load(models["onnx_v2"]), sample_rate=0.0, cpu_share=1.0)
    try:
        offer(runner, primary, {"input": X}, 200)
        runner.drain(10)
        assert runner.take_stats() is None
    finally:
        runner.close()


def busy_share(store: ModelStore, model: LoadedModel, cpu_share: float, items: int = 100) -> tuple[float, dict]:
    """Queue ``items`` comparisons at once; the shadow's time in inference over the time it
    took to work through them (both measured by the same clock, no absolute duration)."""
    feeds = {"input": np.random.default_rng(1).standard_normal((64, 256)).astype(np.float32)}
    outputs = model.runtime.run(feeds)
    runner = ShadowRunner(model, sample_rate=1.0, cpu_share=cpu_share, queue_size=items)
    try:
        t0 = time.perf_counter()
        for _ in range(items):
            runner.offer(feeds, model, outputs, 1.0)
        runner.drain(120)
        span_us = (time.perf_counter() - t0) * 1e6
        stats = runner.take_stats()
    finally:
        runner.close()
    assert stats is not None and stats["compared"] == items and stats["skipped"] == 0, stats
    busy_us = stats["latency_us_shadow"]["mean"] * stats["compared"]
    return busy_us / span_us, stats


def test_the_shadow_stays_within_its_cpu_share(store: ModelStore, tmp_path: Path) -> None:
    # a model big enough that inference, not Python, is the shadow's work (~ms a run)
    big = store.load(modelgen.build_onnx_mlp(tmp_path / "big.onnx", n_in=256, n_hidden=1024, n_out=8))
    throttled, _ = busy_share(store, big, cpu_share=0.2)
    # it sleeps 4x each run's time: at most 1/5 of the span (one run of slack), whatever the load
    assert throttled <= 0.3, throttled
    free, _ = busy_share(store, big, cpu_share=1.0)
    assert free > 0.5, free  # the measure sees the difference: unthrottled, inference fills the span
    assert free > 2 * throttled


class _Gated:
    """A runtime whose runs wait for a gate: a shadow as slow as the test needs, whatever the machine's load."""

    def __init__(self, inner: object, gate: threading.Event) -> None:
        self.inner, self.gate = inner, gate

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        assert self.gate.wait(60)
        return self.inner.run(feeds)  # type: ignore[attr-defined]

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)


def test_a_full_queue_skips_instead_of_blocking(store: ModelStore, tmp_path: Path) -> None:
    model = store.load(modelgen.build_onnx_mlp(tmp_path / "m.onnx"))
    feeds = {"input": X}
    outputs = model.runtime.run(feeds)
    gate = threading.Event()
    slow = LoadedModel(model.info, _Gated(model.runtime, gate), model.first_output)  # type: ignore[arg-type]
    runner = ShadowRunner(slow, sample_rate=1.0, cpu_share=1.0, queue_size=4)
    try:
        t0 = time.monotonic()
        for _ in range(50):  # the shadow is stuck in its first run: the queue fills, then offers skip
            runner.offer(feeds, model, outputs, 1.0)
        offering_s = time.monotonic() - t0
        gate.set()
        runner.drain(60)
        stats = runner.take_stats()
    finally:
        gate.set()
        runner.close()
    assert offering_s < 30  # never waited for the shadow (the gate would have held it 60 s)
    assert stats is not None and stats["errors"] == 0, stats
    # the run the worker had taken (if it had taken one) and the 4 queued ones are compared, the rest skipped
    assert stats["compared"] + stats["skipped"] == 50 and 4 <= stats["compared"] <= 5, stats


def test_a_failing_shadow_is_counted_and_callers_get_the_primary(
    broker: Broker, fleet: Fleet, models: dict[str, Path], tmp_path: Path
) -> None:
    fleet.register(models["onnx_float"], "1.0.0")
    # passes its health check (batch 1), fails inside ONNX Runtime on any other batch
    fleet.register(modelgen.build_onnx_mlp(tmp_path / "b1.onnx", seed=7, version="2.0.0-b1", inner_batch=1),
                   "2.0.0-b1")
    agent = make_agent(tmp_path, broker, fleet, models["onnx_float"], EDGEML_UPDATES__SHADOW_SAMPLE_RATE=1.0,
                       EDGEML_UPDATES__SHADOW_CPU_SHARE=1.0, EDGEML_TELEMETRY__METRICS_INTERVAL_S=3600)
    weights = modelgen.mlp_weights(seed=0)
    with agent:
        r = fleet.http.put("/v1/devices/plant/dev-1/desired", json={"model": "mlp@1.0.0", "shadow": "mlp@2.0.0-b1"})
        assert r.status_code == 200, r.text
        wait_until(lambda: agent._updates.shadow is not None, 30, what="shadow model")
        for _ in range(20):
            out = agent.predict({"input": BATCH_8})  # the shadow fails on every one of these
            assert out.version == "1.0.0"
            np.testing.assert_allclose(out.outputs["probs"], modelgen.reference_forward(BATCH_8, weights), atol=1e-5)
        for _ in range(10):
            assert agent.predict({"input": X}).version == "1.0.0"  # these the shadow runs
        assert agent.status()["counters"]["prediction_errors"] == 0
        agent.flush_metrics()
        rows = wait_until(lambda: fleet.http.get("/v1/devices/plant/dev-1/telemetry", params={"kind": "shadow"}).json(),
                          30, what="shadow record at the coordinator")
    record = rows[0]["body"]
    assert (record["errors"], record["compared"], record["skipped"]) == (20, 10, 0), record
    assert record["shadow_version"] == "2.0.0-b1" and record["version"] == "1.0.0"
