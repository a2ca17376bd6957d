"""The fleet simulator: many lightweight devices in one process, on a real broker."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgeml.protocol import TelemetryBatch
from edgeml.protocol.signing import load_public_keys
from edgeml.sim import Faults, Simulator

from .conftest import Broker, Collector, wait_until
from .test_updates import Fleet


def test_simulated_devices_speak_the_protocol_and_follow_desired_states(
    broker: Broker, collector: Collector, models: dict[str, Path], tmp_path: Path
) -> None:
    fleet = Fleet(tmp_path / "cloud", broker)
    try:
        fleet.register(models["onnx_float"], "1.0.0")
        fleet.register(models["onnx_v2"], "2.0.0")
        sim = Simulator(broker.url, models["onnx_float"], devices=20, fleet="plant", rate=5.0, workdir=tmp_path / "sim",
                        public_keys=load_public_keys(fleet.keys / "fleet.pub"),
                        faults=Faults(extra_latency_us={"2.0.0": 500.0}, accuracy={"1.0.0": 0.7}),
                        feedback_rate=0.5)
        sim.start(offline=["sim-00019"])
        try:
            wait_until(lambda: sim.stats()["connected"] == 19, 20, what="connections")
            wait_until(lambda: sim.stats()["predictions"] >= 200, 30, what="predictions")
            # deploy 2.0.0 to one simulated device through the coordinator
            r = fleet.http.put("/v1/devices/plant/sim-00003/desired", json={"model": "mlp@2.0.0"})
            assert r.status_code == 200, r.text
            wait_until(lambda: sim.stats()["versions"].get("2.0.0") == 1, 30, what="the update")
            wait_until(lambda: any(r.get("version") == "2.0.0" for r in collector.records()), 30, what="v2 telemetry")
            # a shadow is fetched and reported (a blue/green preload), not served
            r = fleet.http.put("/v1/devices/plant/sim-00004/desired", json={"model": "mlp@1.0.0", "shadow": "mlp@2.0.0"})
            assert r.status_code == 200, r.text
            wait_until(lambda: sim.stats()["shadows"] == {"2.0.0": 1}, 30, what="the preload")
            wait_until(lambda: any(s["device"] == "sim-00004" and (s.get("shadow") or {}).get("version") == "2.0.0"
                                   for s in collector.payloads("state")), 30, what="the preload reported")
            assert sim.stats()["versions"] == {"1.0.0": 19, "2.0.0": 1}
            # a device offline from the start takes its retained document when it connects
            r = fleet.http.put("/v1/devices/plant/sim-00019/desired", json={"model": "mlp@2.0.0"})
            assert r.status_code == 200, r.text
            assert sim.stats()["versions"] == {"1.0.0": 19, "2.0.0": 1}
            sim.connect(["sim-00019"])
            wait_until(lambda: sim.stats()["connected"] == 20, 20, what="the late device")
            wait_until(lambda: sim.stats()["versions"].get("2.0.0") == 2, 30, what="the late device's update")
            assert sim.drain()
        finally:
            sim.stop()
    finally:
        fleet.close()
    batches = [TelemetryBatch.model_validate(p) for p in collector.payloads("telemetry")]
    by_device: dict[str, list[int]] = {}
    for batch in batches:
        by_device.setdefault(batch.device, []).extend(r.seq for r in batch.records)
    assert len(by_device) == 20
    for device, seqs in by_device.items():
        assert sorted(set(seqs)) == list(range(1, max(seqs) + 1)), device  # no gap per device
    slow = [r for b in batches if b.device == "sim-00003" for r in b.records
            if r.kind == "prediction" and r.version == "2.0.0"]  # type: ignore[union-attr]
    assert slow and min(r.latency_us for r in slow) >= 500  # type: ignore[union-attr]
    feedback = [r for b in batches for r in b.records if r.kind == "feedback"]
    v1 = [r for r in feedback if r.version == "1.0.0"]  # type: ignore[union-attr]
    assert len(v1) > 100 and all(r.correct == (r.label == r.predicted) for r in feedback)  # type: ignore[union-attr]
    assert 0.55 < sum(bool(r.correct) for r in v1) / len(v1) < 0.85  # type: ignore[union-attr]
    states = collector.payloads("state")
    assert any(s["device"] == "sim-00003" and s["active"]["version"] == "2.0.0" for s in states)


def test_a_simulated_device_with_a_service_time_reports_its_own_latency_not_the_hosts() -> None:
    # simulated devices share this host's cores with the coordinator and the tests: a busy host (here a 50 ms
    # run) must not show up as a slow model, or latency gates would judge the host's load
    faults = Faults(service_time_us=2000.0, latency_factor={"1.1.0": 1.3}, extra_latency_us={"1.1.0": 100.0})
    rng = np.random.default_rng(7)
    calm = np.array([faults.latency_of("1.0.0", 5.0, rng) for _ in range(2000)])
    busy = np.array([faults.latency_of("1.0.0", 50_000.0, rng) for _ in range(2000)])
    assert 1900 < np.median(calm) < 2100 and 1900 < np.median(busy) < 2100 and busy.max() < 10_000
    slower = np.array([faults.latency_of("1.1.0", 50_000.0, rng) for _ in range(2000)])
    assert 1.25 < (np.median(slower) - 100.0) / np.median(calm) < 1.35
    # without a service time the device is this host: its measured time, scaled
    assert Faults(latency_factor={"*": 2.0}).latency_of("1.0.0", 40.0, rng) == 80.0
