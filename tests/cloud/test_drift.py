"""Drift: PSI against hand computations, measurements per version and cohort on a real store,
and continuous training end to end: simulated devices (edgeml.sim on a real Mosquitto) serve a
model on a drifted sensor stream, a real coordinator (SQLite) measures the drift, retrains on
the devices' labeled samples and registers a version whose lineage points at that data. No
drift, no retraining."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import yaml

from cloud import Store
from cloud.artifacts import ArtifactStore
from cloud.drift import PSI_FLOOR, DriftMonitor, build_reference, input_psi, prediction_psi, psi
from cloud.registry.models import ModelRegistry
from edgeml._testing import models as modelgen
from edgeml._testing.sensor import SensorStream

from ..conftest import Broker, wait_until

ROOT = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------------- PSI by hand
def test_psi_matches_a_hand_computation() -> None:
    # shares e = (.5, .3, .2), a = (.3, .3, .4):
    # (.3-.5) ln(.3/.5) + 0 + (.4-.2) ln(.4/.2) = .2 ln(5/3) + .2 ln 2
    expected = 0.2 * math.log(5 / 3) + 0.2 * math.log(2)
    assert psi([50, 30, 20], [30, 30, 40]) == pytest.approx(expected, rel=1e-12)
    assert psi([50, 30, 20], [5, 3, 2]) == pytest.approx(0.0, abs=1e-15)  # shares, not counts, matter
    assert psi([1, 2], [2, 1]) == pytest.approx(psi([2, 1], [1, 2]))  # symmetric


def test_an_empty_bin_counts_as_rare_not_impossible() -> None:
    # e = (1, 0) -> (1, floor); a = (.5, .5): (.5-1) ln(.5/1) + (.5-floor) ln(.5/floor)
    expected = -0.5 * math.log(0.5) + (0.5 - PSI_FLOOR) * math.log(0.5 / PSI_FLOOR)
    assert psi([10, 0], [5, 5]) == pytest.approx(expected, rel=1e-12)
    with pytest.raises(ValueError):
        psi([0, 0], [1, 1])
    with pytest.raises(ValueError):
        psi([1, 1], [1, 1, 1])


def test_reference_bins_and_input_psi_by_hand() -> None:
    x = np.arange(100, dtype=float).reshape(-1, 1)
    ref = build_reference(x, np.zeros(100, dtype=int), bins=4, classes=2)
    # quartiles of 0..99: 24.75, 49.5, 74.25 -> 25 rows per bin
    assert ref["inputs"]["edges"] == [[24.75, 49.5, 74.25]] and ref["inputs"]["counts"] == [[25, 25, 25, 25]]
    assert ref["predictions"]["counts"] == {"0": 100, "1": 0}
    assert input_psi(ref, x) == [pytest.approx(0.0)]
    # 50..149 falls in bins (0, 0, 25, 75) of 100: shares (0, 0, .25, .75) against .25 each
    e, f = 0.25, PSI_FLOOR
    by_hand = 2 * (f - e) * math.log(f / e) + 0.0 + (0.75 - e) * math.log(0.75 / e)
    assert input_psi(ref, x + 50) == [pytest.approx(by_hand, rel=1e-9)]


def test_prediction_psi_counts_classes_the_reference_never_saw() -> None:
    ref = build_reference(np.zeros((4, 1)), np.array([0, 0, 1, 1]))
    assert prediction_psi(ref, [0, 1, 0, 1]) == pytest.approx(0.0)
    # reference (.5, .5, 0) -> (.5, .5, floor); measured (.25, .25, .5)
    f = PSI_FLOOR
    by_hand = 2 * (0.25 - 0.5) * math.log(0.25 / 0.5) + (0.5 - f) * math.log(0.5 / f)
    assert prediction_psi(ref, [0, 1, 2, 2]) == pytest.approx(by_hand, rel=1e-9)


def test_a_dialed_drift_raises_the_psi() -> None:
    stream = SensorStream(seed=3)
    x0, _ = stream.sample(4000, drift=0.0, rng=1)
    ref = build_reference(x0, np.zeros(len(x0), dtype=int))
    figures = [float(np.mean(input_psi(ref, stream.sample(2000, drift=d, rng=2)[0]))) for d in (0.0, 0.25, 0.5, 1.0)]
    assert figures[0] < 0.05 < figures[1] < figures[2] < figures[3]
    assert figures[2] > 0.2  # the default threshold is crossed well before drift 1


def test_the_sensor_stream_is_deterministic_and_drift_hurts_a_fixed_rule() -> None:
    stream = SensorStream()
    a, b = stream.sample(100, drift=0.5, rng=9), stream.sample(100, drift=0.5, rng=9)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    x, y = stream.sample(3000, drift=0.0, rng=4)
    nearest = lambda xs: np.argmin(((xs[:, None, :] - stream.class_means[None]) ** 2).sum(-1), axis=1)  # noqa: E731
    xd, yd = stream.sample(3000, drift=1.0, rng=4)
    assert (nearest(x) == y).mean() > 0.9 > 0.7 > (nearest(xd) == yd).mean()


def test_simulated_devices_read_the_sensor_and_send_joinable_samples_and_labels(tmp_path: Path) -> None:
    import orjson

    from edgeml.sim import Faults, Simulator

    model = modelgen.build_onnx_mlp(tmp_path / "m.onnx", n_in=8, name="sensor", version="1")
    stream = SensorStream()
    sim = Simulator("mqtt://127.0.0.1:1", model, devices=1, fleet="f", workdir=tmp_path / "sim", sensor=stream,
                    sample_rate=0.5, feedback_rate=1.0, faults=Faults(drift=0.1, drift_per_s=0.05))
    assert sim.drift_now() == 0.1  # not started: the drift has not begun rising
    sim.started_at = time.monotonic() - 10
    assert sim.drift_now() == pytest.approx(0.1 + 0.5, abs=0.01)
    [device] = sim.devices
    rng = np.random.default_rng(0)
    for _ in range(200):
        device.predict(rng)  # the loop thread's work, run here (not started: nothing is sent)
    records = [orjson.loads(r) for r in device.pending]
    samples = {r["prediction_id"]: r for r in records if r["kind"] == "sample"}
    feedback = [r for r in records if r["kind"] == "feedback"]
    assert len(feedback) == 200 and 60 < len(samples) < 140
    assert len({f["prediction_id"] for f in feedback}) == 200
    joined = [(samples[f["prediction_id"]], f) for f in feedback if f["prediction_id"] in samples]
    assert len(joined) == len(samples)
    # the label is the stream's ground truth: the drifted reading lies nearest its class's drifted mean
    drift = sim.drift_now()
    means = stream.distort(stream.class_means, drift)
    nearest = [int(np.argmin(((np.asarray(s["inputs"]["input"][0]) - means) ** 2).sum(1))) for s, _ in joined]
    assert np.mean([n == f["label"] for n, (_, f) in zip(nearest, joined, strict=True)]) > 0.8


# ---------------------------------------------------------------------- measurements on a store
def _records(rows: np.ndarray, top1: list[int], model: str, version: str, t0: float) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for i, row in enumerate(rows):
        out.append({"seq": len(out) + 1, "ts": t0 + i * 0.01, "kind": "sample", "model": model, "version": version,
                    "prediction_id": f"p-{i}", "inputs": {"input": [row.tolist()]}, "outputs": {"probs": [[1, 0, 0]]}})
    for i, c in enumerate(top1):
        out.append({"seq": len(out) + 1, "ts": t0 + i * 0.01, "kind": "prediction", "model": model, "version": version,
                    "latency_us": 10.0, "batch": 1, "summary": {"output": "probs", "top1": c, "score": 0.9, "mean": 0.3}})
    return out


def test_monitor_measures_per_version_and_cohort(store: Store, tmp_path: Path) -> None:
    registry = ModelRegistry(store, ArtifactStore(tmp_path / "artifacts"))
    rng = np.random.default_rng(0)
    x_ref = rng.normal(size=(2000, 4))
    ref = build_reference(x_ref, rng.integers(0, 3, 2000), classes=3)
    path = modelgen.build_onnx_mlp(tmp_path / "m.onnx")
    registry.register(path, name="m", version="1", params={"drift_reference": ref})
    registry.register(path, name="m", version="0", params={})  # an older model: no reference
    t0 = time.time() - 60
    for device, site, shift in (("d1", "north", 0.0), ("d2", "south", 1.5)):
        store.upsert_device("f", device, tags={"site": site})
        x = rng.normal(size=(200, 4)) + shift
        store.insert_telemetry("f", device, "s1", _records(x, rng.integers(0, 3, 200).tolist(), "m", "1", t0))
    store.insert_telemetry("f", "d1", "s2", _records(rng.normal(size=(80, 4)), [0] * 150, "m", "0", t0))
    store.insert_telemetry("f", "d1", "s3", _records(rng.normal(size=(5, 4)), [0] * 5, "m", "1", t0 - 1000))  # too old

    monitor = DriftMonitor(store, registry, threshold=0.2, window_s=600, min_samples=50, min_predictions=100,
                           cohort_tag="site")
    found = {(m["version"], m["cohort"]): m for m in monitor.measure(fleet="f")}
    assert set(found) == {("1", "*"), ("1", "site=north"), ("1", "site=south"), ("0", "*"), ("0", "site=north")}
    north, south, both = found[("1", "site=north")], found[("1", "site=south")], found[("1", "*")]
    assert north["status"] == "ok" and north["samples"] == 200 and north["input_psi"] < 0.1
    assert north["prediction_psi"] < 0.1 and north["devices"] == ["d1"]
    assert south["status"] == "drift" and south["input_psi"] > 0.5 and south["psi"] == max(south["input_psi"], south["prediction_psi"])
    assert len(south["feature_psi"]) == 4 and "threshold 0.2" in south["reason"]
    assert both["samples"] == 400 and both["predictions"] == 400 and north["input_psi"] < both["input_psi"] < south["input_psi"]
    assert found[("0", "*")]["status"] == "no_reference" and found[("0", "*")]["psi"] is None

    few = DriftMonitor(store, registry, window_s=600, min_samples=1000, min_predictions=1000)
    assert {m["status"] for m in few.measure(fleet="f", models=["m"]) if m["version"] == "1"} == {"insufficient_data"}
    latest = {(m["version"], m["cohort"]): m for m in monitor.latest(fleet="f")}
    assert latest[("1", "*")]["status"] == "insufficient_data"  # the newest measurement wins
    assert latest[("1", "site=south")]["id"] == south["id"]
    assert [m["id"] for m in monitor.history("m", "1")][:1] == [latest[("1", "*")]["id"]]


# ---------------------------------------------------------------------- continuous training, end to end
torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")

from cloud._config import CloudConfig, TrainingSettings  # noqa: E402
from cloud.coordinator import Coordinator  # noqa: E402
from cloud.keys import generate_keys  # noqa: E402
from cloud.training import load_recipe, load_snapshot, train  # noqa: E402
from cloud.training._quantize import probabilities  # noqa: E402
from edgeml.sim import Faults, Simulator  # noqa: E402

from .._stores import cloud_db  # noqa: E402

FLEET = "plant"
MODEL = "sensor-mlp"


def _small_recipe(tmp: Path, rows: int = 1500, epochs: int = 12) -> Path:
    doc = yaml.safe_load((ROOT / "configs" / "recipes" / "sensor-mlp.yaml").read_text())
    doc["training"].update(epochs=epochs, lr=0.01)
    doc["quantization"]["enabled"] = False
    doc["data"]["sources"][0]["rows"] = rows
    path = tmp / "sensor-small.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def _stamped(src: Path, dst: Path, version: str) -> Path:
    """The artifact with its registry version in the metadata, as a device gets it named."""
    import onnx

    proto = onnx.load_model(str(src))
    entry = proto.metadata_props.add()
    entry.key, entry.value = "edgeml.version", version
    onnx.save_model(proto, str(dst))
    return dst


class Plant:
    """A coordinator with continuous training on, sensor-mlp@1 trained on undrifted data, and
    simulated devices serving it on a sensor stream drifted by ``drift``."""

    def __init__(self, broker: Broker, tmp: Path, drift: float, auto_canary: bool = False) -> None:
        keys = tmp / "keys"
        generate_keys(keys)
        recipe = _small_recipe(tmp)
        training = TrainingSettings(
            enabled=True, check_interval_s=0.5, drift_threshold=0.2, window_s=600, min_samples=80, min_predictions=80,
            recipes_dir=ROOT / "configs" / "recipes",
            models={MODEL: {"recipe": str(recipe), "fleet": FLEET, "include_recipe_data": False}},
            auto_canary={"enabled": auto_canary, "artifact": "float", "min_accuracy": 0.5, "policy": "canary"},
        )
        config = CloudConfig(broker_url=broker.url, db=cloud_db(tmp), http_addr="127.0.0.1:0",
                             artifact_dir=tmp / "artifacts", signing_key=keys / "fleet.key", training=training)
        self.coordinator = Coordinator(config).start()
        self.http = httpx.Client(base_url=self.coordinator.url, timeout=30)
        c = self.coordinator
        result = train(load_recipe(recipe), store=c.store, registry=c.registry, workdir=tmp / "artifacts" / "training")
        assert result["registered"] == [f"{MODEL}@1"]
        self.v1 = Path(result["artifacts"]["onnx_float"])
        self.stream = SensorStream()
        self.sim = Simulator(broker.url, _stamped(self.v1, tmp / "v1.onnx", "1"), devices=4, fleet=FLEET, rate=25,
                             workdir=tmp / "sim", sensor=self.stream, sample_rate=1.0, feedback_rate=1.0,
                             faults=Faults(drift=drift), seed=5)
        self.started = time.time()
        self.sim.start()

    def triggers(self) -> list[dict[str, Any]]:
        r = self.http.get("/v1/training/triggers")
        assert r.status_code == 200, r.text
        return r.json()

    def drift(self) -> dict[str, Any] | None:
        found = [m for m in self.http.get("/v1/drift", params={"model": MODEL}).json()
                 if m["version"] == "1" and m["cohort"] == "*"]
        return found[0] if found else None

    def close(self) -> None:
        self.sim.stop()
        self.http.close()
        self.coordinator.stop()


@pytest.fixture
def plant(broker: Broker, tmp_path: Path) -> Iterator[Any]:
    made: list[Plant] = []

    def make(drift: float, auto_canary: bool = False) -> Plant:
        made.append(Plant(broker, tmp_path, drift, auto_canary))
        return made[-1]

    yield make
    for p in made:
        p.close()


def test_a_drifted_stream_triggers_retraining_with_lineage_back_to_the_drifted_data(plant: Any, tmp_path: Path) -> None:
    p = plant(drift=1.0, auto_canary=True)
    wait_until(lambda: any(t["status"] == "registered" for t in p.triggers()), 60, interval=0.2,
               what="a drift trigger and its retrained version")
    [trigger] = p.triggers()
    assert trigger["kind"] == "drift" and trigger["parent"] == f"{MODEL}@1"
    assert trigger["reason"].startswith(f"drift on {MODEL}@1") and "threshold 0.2" in trigger["reason"]
    evidence = trigger["evidence"]
    assert evidence["psi"] > 0.2 and evidence["samples"] >= 80 and set(evidence["devices"]) <= {d.device_id for d in p.sim.devices}

    # the measurement behind it is stored and readable
    drift = p.drift()
    assert drift is not None and drift["status"] == "drift" and drift["input_psi"] > 0.2

    # the new version: parent, snapshot of the devices' labeled samples, the trigger
    new = p.coordinator.registry.get(MODEL, "2")
    assert trigger["outcome"]["registered"] == [f"{MODEL}@2"] and trigger["run_id"]
    assert new.parent == f"{MODEL}@1"
    dataset = new.params["dataset"]
    assert new.dataset_hash == dataset["hash"] and dataset["sources"] == [f"fleet:{FLEET}/{MODEL}"]
    assert set(dataset["devices"]) == {d.device_id for d in p.sim.devices}
    lo, hi = dataset["time_range"]
    assert p.started - 1 <= lo <= hi <= time.time() and lo >= evidence["window"][0]
    assert new.params["trigger"]["id"] == trigger["id"] and new.params["trigger"]["evidence"]["measurement"] == evidence["measurement"]
    snap = load_snapshot(new.dataset_hash, tmp_path / "artifacts" / "training" / "datasets")
    assert snap.rows == dataset["rows"] >= 50 and set(snap.device) == set(dataset["devices"])
    run = p.http.get(f"/v1/training/runs/{trigger['run_id']}").json()
    assert run["status"] == "succeeded" and run["dataset_hash"] == new.dataset_hash

    # the retrained model serves the drifted sensors better than the one it replaces
    x, y = p.stream.sample(2000, drift=1.0, rng=123)
    acc1 = float((probabilities(p.v1, x).argmax(1) == y).mean())
    acc2 = float((probabilities(p.coordinator.artifacts.path(new.sha256), x).argmax(1) == y).mean())
    print(f"accuracy on the drifted stream: {MODEL}@1 {acc1:.3f}, retrained {MODEL}@2 {acc2:.3f}")
    assert acc2 > acc1 + 0.15, (acc1, acc2)

    # a policy started a canary of the new version; the audit log says why
    canary = trigger["outcome"]["canary"]
    assert canary["started"] is True and canary["model"] == f"{MODEL}@2"
    rollout = p.http.get(f"/v1/rollouts/{canary['rollout']}").json()
    assert rollout["model"] == f"{MODEL}@2" and rollout["created_by"] == "continuous-training"
    with p.coordinator.store.transaction() as tx:
        audit = tx.execute("SELECT action, reason, rollout_id FROM audit_log WHERE actor = 'continuous-training' "
                           "ORDER BY id").fetchall()
    assert [a[0] for a in audit] == ["retrain:drift", "start"]
    assert audit[0][1] == trigger["reason"] and audit[1][2] == canary["rollout"]

    # a drifted version is retrained once: later checks do not start another run
    checks = p.http.post("/v1/training/check").json()
    assert checks[0]["status"] == "no_trigger" and len(p.triggers()) == 1


def test_no_drift_no_retraining(plant: Any) -> None:
    p = plant(drift=0.0)
    wait_until(lambda: (p.drift() or {}).get("status") == "ok" and p.drift()["samples"] >= 200, 60, interval=0.2,
               what="a drift measurement with enough samples")
    for _ in range(3):  # more checks, the same answer
        [outcome] = p.http.post("/v1/training/check").json()
        assert outcome["status"] == "no_trigger"
    drift = p.drift()
    assert drift["psi"] < 0.2 and drift["input_psi"] < 0.1 and drift["prediction_psi"] < 0.1
    assert p.triggers() == []
    assert [m.version for m in p.coordinator.registry.list(MODEL)] == ["1"]


# ---------------------------------------------------------------------- the other triggers, on a real store
def _labeled_records(stream: SensorStream, n: int, t0: float, version: str = "1") -> list[dict[str, Any]]:
    x, y = stream.sample(n, drift=0.0, rng=11)
    out: list[dict[str, Any]] = []
    for i in range(n):
        base = {"ts": t0 + i * 0.01, "model": MODEL, "version": version, "prediction_id": f"b-{i}"}
        out.append({**base, "kind": "sample", "inputs": {"input": [x[i].tolist()]}, "outputs": {"probs": [[1, 0, 0]]}})
        out.append({**base, "kind": "feedback", "label": int(y[i]), "predicted": 0, "correct": int(y[i]) == 0})
    return [{**r, "seq": i + 1} for i, r in enumerate(out)]


def test_new_labels_and_interval_triggers_act_only_on_the_leader(tmp_path: Path) -> None:
    from cloud import open_store
    from cloud.training._service import ContinuousTraining, TrainingService

    store = open_store(f"sqlite://{tmp_path}/c.db")
    registry = ModelRegistry(store, ArtifactStore(tmp_path / "artifacts"))
    recipe = _small_recipe(tmp_path, rows=400, epochs=3)
    train(load_recipe(recipe), store=store, registry=registry, workdir=tmp_path / "training")
    created = registry.get(MODEL, "1").created_at
    now = [created + 10]  # the clock of the checks; the labels below arrive between
    leader = [False]
    settings = TrainingSettings(new_labels=100, retrain_interval_s=3600, min_samples=10_000, min_predictions=10_000,
                                models={MODEL: {"recipe": str(recipe), "fleet": FLEET}})
    service = TrainingService(store, registry, workdir=tmp_path / "training", recipes_dir=tmp_path)
    ct = ContinuousTraining(settings, service, DriftMonitor(store, registry, min_samples=10_000), is_leader=lambda: leader[0],
                            clock=lambda: now[0])
    for device in ("dev-a", "dev-b"):
        store.upsert_device(FLEET, device)  # as ingestion registers them
    try:
        store.insert_telemetry(FLEET, "dev-a", "s", _labeled_records(SensorStream(), 60, created + 1))
        assert ct.check() == [{"model": MODEL, "status": "not_leader"}]
        leader[0] = True
        [outcome] = ct.check()
        assert outcome["status"] == "no_trigger"  # 60 labels < 100, the interval has not passed
        store.insert_telemetry(FLEET, "dev-b", "s", _labeled_records(SensorStream(), 60, created + 1))
        [outcome] = ct.check()
        assert outcome["status"] == "triggered" and outcome["kind"] == "new_labels"
        assert "120 new labeled samples" in outcome["reason"]
        assert service.wait(60)
        [trigger] = ct.triggers()
        assert trigger["status"] == "registered" and trigger["outcome"]["registered"] == [f"{MODEL}@2"]
        v2 = registry.get(MODEL, "2")
        assert v2.parent == f"{MODEL}@1" and set(v2.params["dataset"]["devices"]) == {"dev-a", "dev-b"}
        assert v2.params["dataset"]["rows"] == 400 + 120  # the recipe's rows and every joined label
        now[0] += 10
        assert ct.check()[0]["status"] == "no_trigger"  # the labels were used; none new since
        now[0] += 3600
        [outcome] = ct.check()
        assert outcome["status"] == "triggered" and outcome["kind"] == "interval"
        assert service.wait(60)
        kinds = [(t["kind"], t["status"]) for t in ct.triggers()]
        assert kinds == [("interval", "registered"), ("new_labels", "registered")]
        assert registry.get(MODEL, "3").parent == f"{MODEL}@2"
    finally:
        ct.stop()
        store.close()
