"""The fleet simulator: many lightweight devices in one process, on a real broker."""

from __future__ import annotations

from pathlib import Path

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
                        faults=Faults(extra_latency_us={"2.0.0": 500.0}))
        sim.start()
        try:
            wait_until(lambda: sim.stats()["connected"] == 20, 20, what="connections")
            wait_until(lambda: sim.stats()["predictions"] >= 200, 30, what="predictions")
            # deploy 2.0.0 to one simulated device through the coordinator
            r = fleet.http.put("/v1/devices/plant/sim-00003/desired", json={"model": "mlp@2.0.0"})
            assert r.status_code == 200, r.text
            wait_until(lambda: sim.stats()["versions"].get("2.0.0") == 1, 30, what="the update")
            wait_until(lambda: any(r.get("version") == "2.0.0" for r in collector.records()), 30, what="v2 telemetry")
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
    states = collector.payloads("state")
    assert any(s["device"] == "sim-00003" and s["active"]["version"] == "2.0.0" for s in states)
