"""Safe model updates, driven for real: coordinator (registry, signed artifacts, signed
retained desired states) -> Mosquitto -> agent (download, verify, health, switch, probation)."""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnx
import paho.mqtt.client as mqtt
import pytest
from onnx import numpy_helper
from paho.mqtt.enums import CallbackAPIVersion

from cloud import Coordinator, open_store
from cloud._config import CloudConfig
from cloud.keys import generate_keys
from edgeml import Agent, load_config
from edgeml._testing import models as modelgen
from edgeml.protocol import ReportedState, Topics
from edgeml.protocol.signing import sign_document
from edgeml.updates import TRANSITIONS, Event, State

from ._protocol import undocumented
from ._stores import cloud_db
from .conftest import Broker, Collector, agent_env, free_port, wait_until

X = np.random.default_rng(3).standard_normal((1, 4)).astype(np.float32)
TOPICS = Topics("plant", "dev-1")


class Fleet:
    """A coordinator (SQLite, or PostgreSQL with EDGEML_TEST_STORE) with a fleet key, and helpers
    to register and deploy. It validates every record of a known kind against the protocol's
    models (``validation: full``), and the fixture fails a test whose agent sent anything the
    coordinator refused."""

    def __init__(self, tmp: Path, broker: Broker) -> None:
        self.tmp = tmp
        self.broker = broker
        self.keys = tmp / "keys"
        generate_keys(self.keys)
        self.config = config = CloudConfig(broker_url=broker.url, db=cloud_db(tmp), http_addr="127.0.0.1:0",
                             artifact_dir=tmp / "artifacts", signing_key=self.keys / "fleet.key",
                             ingest={"validation": "full"})
        self.coordinator = Coordinator(config).start()
        wait_until(lambda: self.coordinator.desired.is_leader, 10, what="leadership")
        self.http = httpx.Client(base_url=self.coordinator.url, timeout=30)

    def register(self, path: Path, version: str) -> dict[str, Any]:
        with path.open("rb") as fh:
            r = self.http.post("/v1/models", data={"name": "mlp", "version": version}, files={"file": (path.name, fh)})
        assert r.status_code == 201, r.text
        return r.json()

    def deploy(self, ref: str) -> dict[str, Any]:
        r = self.http.put("/v1/devices/plant/dev-1/desired", json={"model": ref})
        assert r.status_code == 200, r.text
        return r.json()

    def publish_raw(self, doc: dict[str, Any]) -> None:
        """Publish a desired document ourselves (an attacker with broker access, or a replay)."""
        client = mqtt.Client(CallbackAPIVersion.VERSION2)
        client.connect("127.0.0.1", self.broker.port)
        client.loop_start()
        client.publish(TOPICS.desired, json.dumps(doc), qos=1, retain=True).wait_for_publish(5)
        client.disconnect()
        client.loop_stop()

    def signed(self, doc: dict[str, Any]) -> dict[str, Any]:
        return sign_document(doc, self.keys / "fleet.key")

    def close(self) -> None:
        self.http.close()
        self.coordinator.stop()


@pytest.fixture
def fleet(broker: Broker, tmp_path: Path) -> Iterator[Fleet]:
    f = Fleet(tmp_path / "cloud", broker)
    yield f
    f.close()  # stopping drains what the ingestor had received
    with open_store(f.config.store_url) as store:
        refused = store.error_counts() and store.recent_errors()
    assert not refused, f"the coordinator refused messages of the agent: {refused}"


def agent_settings(tmp_path: Path, broker: Broker, fleet: Fleet, model: Path, **extra: Any) -> dict[str, str]:
    settings: dict[str, Any] = dict(
        EDGEML_DATA_DIR=tmp_path / "agent", EDGEML_API_ADDR=f"127.0.0.1:{free_port()}", EDGEML_BROKER_URL=broker.url,
        EDGEML_MODEL_PATH=model, EDGEML_DEVICE_ID="dev-1", EDGEML_FLEET="plant",
        EDGEML_FLEET_PUBKEY=fleet.keys / "fleet.pub", EDGEML_UPDATES__PROBATION_S=0.3,
        EDGEML_UPDATES__PROBATION_MIN_PREDICTIONS=0, EDGEML_UPDATES__RETRY_BACKOFF_S=0.05,
        EDGEML_MQTT__RECONNECT_MAX_S=1,
    )
    return agent_env(**{**settings, **extra})


def make_agent(tmp_path: Path, broker: Broker, fleet: Fleet, model: Path, **extra: Any) -> Agent:
    return Agent(load_config(env=agent_settings(tmp_path, broker, fleet, model, **extra)))


def finished(agent: Agent, revision: int) -> dict[str, Any] | None:
    status = agent.status()
    update = status["update"]
    return status if update["revision"] == revision and update["state"] == "idle" and update["result"] else None


def reported(collector: Collector) -> ReportedState:
    """The last reported state, validated, with no field the protocol does not name."""
    state = ReportedState.model_validate(collector.payloads("state")[-1])
    assert undocumented(state) == [], "fields missing from docs/protocol.md"
    return state


def nan_model(src: Path, dst: Path) -> Path:
    """The same network with one weight set to NaN: loads fine, answers NaN."""
    model = onnx.load(src)
    init = model.graph.initializer[0]
    arr = numpy_helper.to_array(init).copy()
    arr.flat[0] = np.nan
    init.CopyFrom(numpy_helper.from_array(arr, init.name))
    onnx.save(model, dst)
    return dst


def test_transition_table_is_complete_and_closed() -> None:
    for state in State:
        assert TRANSITIONS[(state, Event.RESUME)] is state
    reachable = {State.IDLE}
    frontier = [State.IDLE]
    while frontier:
        s = frontier.pop()
        for (src, _), dst in TRANSITIONS.items():
            if src is s and dst not in reachable:
                reachable.add(dst)
                frontier.append(dst)
    assert reachable == set(State)
    # every non-idle state can get back to idle
    for state in State:
        seen, frontier = {state}, [state]
        while frontier:
            s = frontier.pop()
            for (src, _), dst in TRANSITIONS.items():
                if src is s and dst not in seen:
                    seen.add(dst)
                    frontier.append(dst)
        assert State.IDLE in seen, state


def test_update_end_to_end_predictions_never_stop(
    broker: Broker, collector: Collector, fleet: Fleet, models: dict[str, Path], tmp_path: Path
) -> None:
    v1 = fleet.register(models["onnx_float"], "1.0.0")
    v2 = fleet.register(models["onnx_v2"], "2.0.0")
    agent = make_agent(tmp_path, broker, fleet, models["onnx_float"])
    failures: list[Exception] = []
    served: set[str] = set()
    stop = threading.Event()

    def app() -> None:
        while not stop.is_set():
            try:
                served.add(agent.predict({"input": X}).version)
            except Exception as exc:  # noqa: BLE001 - the test collects every failure
                failures.append(exc)

    with agent:
        thread = threading.Thread(target=app)
        thread.start()
        try:
            doc = fleet.deploy("mlp@2.0.0")
            status = wait_until(lambda: finished(agent, doc["revision"]), 30, what="update")
        finally:
            stop.set()
            thread.join()
        assert status["update"]["result"] == "success", status["update"]
        assert agent.model is not None and agent.model.version == "2.0.0"
        assert agent.model.info.sha256 == v2["sha256"]
        np.testing.assert_allclose(agent.predict({"input": X}).outputs["probs"],
                                   modelgen.reference_forward(X, modelgen.mlp_weights(seed=7)), atol=1e-5)
        wait_until(lambda: reported(collector).update.result == "success", what="reported state")
    assert not failures and served == {"1.0.0", "2.0.0"}
    state = reported(collector)
    assert state.active is not None and state.active.sha256 == v2["sha256"]
    assert state.previous is not None and state.previous.sha256 == v1["sha256"]
    assert state.applied_revision == doc["revision"]
    steps = [r["data"]["state"] for r in collector.records() if r.get("name") == "update_state"]
    assert steps == ["downloading", "verifying", "installing", "switching", "probation", "idle"]
    # the agent restarts on the new model, from its own store
    with make_agent(tmp_path, broker, fleet, models["onnx_float"]) as again:
        assert again.model is not None and again.model.version == "2.0.0"


def _rejected(agent: Agent, reason: str) -> bool:
    status = agent.status()
    last = status["last_rejection"] or {}
    return last.get("reason") == reason or (status["update"]["result"] in ("rejected", "failed")
                                            and status["update"]["reason"] == reason)


def test_rejections_leave_the_active_model_untouched(
    broker: Broker, collector: Collector, fleet: Fleet, models: dict[str, Path], tmp_path: Path
) -> None:
    fleet.register(models["onnx_float"], "1.0.0")
    v2 = fleet.register(models["onnx_v2"], "2.0.0")
    other = modelgen.build_onnx_mlp(tmp_path / "five.onnx", n_in=5, version="5.0.0")
    fleet.http.post("/v1/models", data={"name": "five", "version": "5.0.0"},
                    files={"file": ("five.onnx", other.read_bytes())}).raise_for_status()
    agent = make_agent(tmp_path, broker, fleet, models["onnx_float"])
    with agent:
        active = agent.model.info.sha256  # type: ignore[union-attr]

        def untouched() -> None:
            assert agent.model is not None and agent.model.info.sha256 == active
            assert agent.predict({"input": X}).version == "1.0.0"

        # 1. a tampered artifact served by the coordinator (same size, different bytes)
        path = next(fleet.coordinator.artifacts.root.rglob(v2["sha256"]))
        original = path.read_bytes()
        path.write_bytes(original[:-1] + bytes([original[-1] ^ 0xFF]))
        doc = fleet.deploy("mlp@2.0.0")
        wait_until(lambda: finished(agent, doc["revision"]), 30, what="tampered update")
        assert agent.status()["update"]["reason"] == "hash_mismatch"
        untouched()
        path.write_bytes(original)

        # 2. a model that breaks the application's contract (5 inputs instead of 4)
        r = fleet.http.put("/v1/devices/plant/dev-1/desired", json={"model": "five@5.0.0"})
        rev = r.json()["revision"]
        wait_until(lambda: finished(agent, rev), 30, what="contract update")
        assert agent.status()["update"]["reason"] == "contract"
        untouched()

        # 3. a truncated download: the server sends fewer bytes than the document says
        doc = fleet.signed({**doc, "revision": 100, "signature": None, "key_id": None,
                            "model": {**doc["model"], "size": doc["model"]["size"] + 10}})
        fleet.publish_raw({k: v for k, v in doc.items()})
        wait_until(lambda: finished(agent, 100), 30, what="truncated update")
        assert agent.status()["update"]["reason"] == "truncated"
        untouched()

        # 4. a replayed desired document (an old revision, validly signed)
        old = {**doc, "revision": 1}
        old = fleet.signed({k: v for k, v in old.items() if k not in ("signature", "key_id")})
        fleet.publish_raw(old)
        wait_until(lambda: _rejected(agent, "replayed"), 10, what="replay rejection")
        untouched()

        # 5. an expired document (freeze attack)
        expired = fleet.signed({k: v for k, v in {**doc, "revision": 110, "expires_at": int(time.time()) - 60}.items()
                                if k not in ("signature", "key_id")})
        fleet.publish_raw(expired)
        wait_until(lambda: _rejected(agent, "expired"), 10, what="expiry rejection")

        # 6. a document signed by a key the device does not trust
        rogue = tmp_path / "rogue"
        generate_keys(rogue)
        forged = sign_document({k: v for k, v in {**doc, "revision": 120}.items() if k not in ("signature", "key_id")},
                               rogue / "fleet.key")
        fleet.publish_raw(forged)
        wait_until(lambda: _rejected(agent, "unknown_key"), 10, what="wrong-key rejection")

        # 7. no signature at all
        unsigned = {k: v for k, v in {**doc, "revision": 125}.items() if k not in ("signature", "key_id")}
        fleet.publish_raw(unsigned)
        wait_until(lambda: _rejected(agent, "missing_signature"), 10, what="unsigned rejection")

        # 8. a bad signature (the document changed after signing)
        tampered = {**fleet.signed({k: v for k, v in {**doc, "revision": 130}.items()
                                    if k not in ("signature", "key_id")}), "revision": 131}
        fleet.publish_raw(tampered)
        wait_until(lambda: _rejected(agent, "bad_signature"), 10, what="bad-signature rejection")
        untouched()
    expected = {"hash_mismatch", "truncated", "contract", "replayed", "expired", "unknown_key", "missing_signature",
                "bad_signature"}

    def reasons() -> set[str]:
        return {r["data"]["reason"] for r in collector.records() if r.get("name") in ("update_rejected", "update_failed")}

    # the broker acknowledged every record before the agent stopped; the collector gets them a moment later
    wait_until(lambda: expected <= reasons(), 10, what="every rejection upstream")
    wait_until(lambda: reported(collector).last_rejection is not None
               and reported(collector).last_rejection.reason == "bad_signature", 10, what="the last rejection reported")
    rejection = reported(collector).last_rejection
    assert rejection is not None and (rejection.reason, rejection.shadow) == ("bad_signature", False)


def test_not_enough_disk_is_refused(broker: Broker, fleet: Fleet, models: dict[str, Path], tmp_path: Path) -> None:
    fleet.register(models["onnx_float"], "1.0.0")
    fleet.register(models["onnx_v2"], "2.0.0")
    with make_agent(tmp_path, broker, fleet, models["onnx_float"], EDGEML_UPDATES__MIN_FREE_BYTES=1 << 60) as agent:
        doc = fleet.deploy("mlp@2.0.0")
        wait_until(lambda: finished(agent, doc["revision"]), 30, what="update")
        status = agent.status()
        assert (status["update"]["result"], status["update"]["reason"]) == ("failed", "no_disk")
        assert status["applied_revision"] is None  # transient: retried once there is space
        assert agent.model is not None and agent.model.version == "1.0.0"


def test_unhealthy_candidate_is_never_activated(
    broker: Broker, fleet: Fleet, models: dict[str, Path], tmp_path: Path
) -> None:
    fleet.register(models["onnx_float"], "1.0.0")
    fleet.register(nan_model(models["onnx_v2"], tmp_path / "nan.onnx"), "2.0.0")
    with make_agent(tmp_path, broker, fleet, models["onnx_float"]) as agent:
        doc = fleet.deploy("mlp@2.0.0")
        status = wait_until(lambda: finished(agent, doc["revision"]), 30, what="update")
        assert (status["update"]["result"], status["update"]["reason"]) == ("rejected", "unhealthy")
        assert agent.model is not None and agent.model.version == "1.0.0"
        files = sorted(p.name for p in (tmp_path / "agent" / "models").iterdir() if p.suffix == ".onnx")
        assert files == [f"{agent.model.info.sha256}.onnx"]  # the rejected candidate is not kept


def test_failing_in_service_rolls_back_by_itself(
    broker: Broker, collector: Collector, fleet: Fleet, models: dict[str, Path], tmp_path: Path
) -> None:
    fleet.register(models["onnx_float"], "1.0.0")
    fleet.register(models["onnx_v2"], "2.0.0")
    # a latency budget no model can meet: the new one fails its probation in service
    agent = make_agent(tmp_path, broker, fleet, models["onnx_float"], EDGEML_UPDATES__PROBATION_S=30,
                       EDGEML_UPDATES__PROBATION_MIN_PREDICTIONS=20,
                       EDGEML_UPDATES__PROBATION_LATENCY_BUDGET_MS=0.000001)
    with agent:
        doc = fleet.deploy("mlp@2.0.0")
        wait_until(lambda: agent.status()["update"]["state"] == "probation", 30, what="probation")
        assert agent.model is not None and agent.model.version == "2.0.0"
        for _ in range(50):
            agent.predict({"input": X})
        status = wait_until(lambda: finished(agent, doc["revision"]), 30, what="rollback")
        assert (status["update"]["result"], status["update"]["reason"]) == ("rolled_back", "latency")
        assert agent.model.version == "1.0.0"
        wait_until(lambda: reported(collector).update.result == "rolled_back", what="reported rollback")
    assert any(r.get("name") == "update_rolled_back" for r in collector.records())


def test_shadow_statistics_match_a_direct_computation(
    broker: Broker, fleet: Fleet, models: dict[str, Path], tmp_path: Path
) -> None:
    import onnxruntime as ort

    fleet.register(models["onnx_float"], "1.0.0")
    fleet.register(models["onnx_int8"], "2.0.0-int8")
    agent = make_agent(tmp_path, broker, fleet, models["onnx_float"], EDGEML_UPDATES__SHADOW_SAMPLE_RATE=1.0,
                       EDGEML_UPDATES__SHADOW_CPU_SHARE=1.0, EDGEML_TELEMETRY__METRICS_INTERVAL_S=3600)
    inputs = np.random.default_rng(11).standard_normal((300, 1, 4)).astype(np.float32)
    with agent:
        r = fleet.http.put("/v1/devices/plant/dev-1/desired", json={"model": "mlp@1.0.0", "shadow": "mlp@2.0.0-int8"})
        assert r.status_code == 200, r.text
        wait_until(lambda: agent._updates.shadow is not None, 30, what="shadow model")
        shadow = agent._updates.shadow
        for i, x in enumerate(inputs):
            out = agent.predict({"input": x})
            assert out.version == "1.0.0"  # callers never see the shadow's outputs
            if i % 100 == 99:  # its queue holds 256: on a busy machine a tight loop would overrun it
                shadow.drain(30)
        agent.flush_metrics()
        wait_until(lambda: fleet.http.get("/v1/devices/plant/dev-1/telemetry", params={"kind": "shadow"}).json(),
                   30, what="shadow record at the coordinator")
    rows = fleet.http.get("/v1/devices/plant/dev-1/telemetry", params={"kind": "shadow"}).json()
    assert len(rows) == 1
    record = rows[0]["body"]
    # the same inputs through both models, directly
    a = ort.InferenceSession(str(models["onnx_float"]), providers=["CPUExecutionProvider"])
    b = ort.InferenceSession(str(models["onnx_int8"]), providers=["CPUExecutionProvider"])
    pa = np.concatenate([a.run(None, {"input": x})[0] for x in inputs])
    pb = np.concatenate([b.run(None, {"input": x})[0] for x in inputs])
    assert record["compared"] == len(inputs) and record["errors"] == 0
    assert record["shadow_version"] == "2.0.0-int8" and record["version"] == "1.0.0"
    assert record["top1_agreement"] == pytest.approx(float((pa.argmax(1) == pb.argmax(1)).mean()), abs=1e-6)
    assert record["mean_abs_diff"] == pytest.approx(float(np.abs(pa.astype(np.float64) - pb).mean()), rel=1e-6)
    assert record["latency_us_shadow"]["mean"] > 0 and record["latency_us_primary"]["p95"] > 0


def test_a_transient_failure_is_retried_but_never_over_a_newer_revision(
    broker: Broker, fleet: Fleet, models: dict[str, Path], tmp_path: Path
) -> None:
    fleet.register(models["onnx_float"], "1.0.0")
    v2 = fleet.register(models["onnx_v2"], "2.0.0")
    agent = make_agent(tmp_path, broker, fleet, models["onnx_float"], EDGEML_UPDATES__DOWNLOAD_RETRIES=1,
                       EDGEML_UPDATES__DOWNLOAD_TIMEOUT_S=2)
    with agent:
        # revision 50 points at a server that is down: a transient failure
        dead = {"v": 1, "fleet": "plant", "device": "dev-1", "revision": 50, "issued_at": int(time.time()),
                "model": {"name": "mlp", "version": "9.9.9", "url": f"http://127.0.0.1:{free_port()}/x",
                          "sha256": "0" * 64, "size": 10}, "shadow": None}
        fleet.publish_raw(fleet.signed(dead))
        status = wait_until(lambda: finished(agent, 50), 30, what="transient failure")
        assert (status["update"]["result"], status["update"]["reason"]) == ("failed", "download_failed")
        assert status["applied_revision"] is None  # not acted on: it will be retried
        # housekeeping that runs while the worker is still on its way back to idle keeps the retry
        updates = agent._updates
        kept, idle = updates._retry_doc, updates.record
        assert kept is not None and kept["revision"] == 50
        updates.record = dataclasses.replace(idle, state=State.DOWNLOADING)
        updates.retry()
        updates.record = idle
        assert updates._retry_doc is kept
        # a newer revision arrives and succeeds
        newer = fleet.signed({**dead, "revision": 60, "model": {"name": "mlp", "version": "2.0.0",
                              "url": f"{fleet.coordinator.url}/v1/artifacts/{v2['sha256']}",
                              "sha256": v2["sha256"], "size": v2["size"]}})
        fleet.publish_raw(newer)
        wait_until(lambda: finished(agent, 60), 30, what="newer update")
        assert agent.model is not None and agent.model.version == "2.0.0"
        agent._housekeeping()  # the scheduled retry must not bring revision 50 back
        time.sleep(0.5)
        assert agent.status()["applied_revision"] == 60 and agent.model.version == "2.0.0"


def test_download_resumes_with_range_and_restarts_a_torn_partial(
    broker: Broker, fleet: Fleet, models: dict[str, Path], tmp_path: Path
) -> None:
    import hashlib

    from edgeml.updates._download import download

    big = modelgen.build_onnx_mlp(tmp_path / "big.onnx", n_in=64, n_hidden=512, n_out=10, version="3.0.0")
    meta = fleet.register(big, "3.0.0")
    url = f"{fleet.coordinator.url}/v1/artifacts/{meta['sha256']}"
    data = big.read_bytes()
    kw = dict(size=len(data), sha256=meta["sha256"], max_bytes=1 << 30, timeout_s=10, retries=0, backoff_s=0)
    requests: list[httpx.Request] = []
    original = httpx.stream

    def spy(method: str, url: str, **options: Any):  # the outermost edge: see which Range goes out
        requests.append(httpx.Request(method, url, headers=options.get("headers")))
        return original(method, url, **options)

    httpx.stream = spy  # type: ignore[assignment]
    try:
        part = tmp_path / "a.part"
        part.write_bytes(data[: len(data) // 2])  # a download cut in the middle
        assert download(url, part, **kw) == meta["sha256"]
        assert requests[-1].headers["Range"] == f"bytes={len(data) // 2}-"
        assert part.read_bytes() == data

        torn = tmp_path / "b.part"
        torn.write_bytes(b"\0" * (len(data) // 3))  # a partial file with a torn (wrong) content
        assert download(url, torn, **kw) == meta["sha256"]
        assert "Range" not in requests[-1].headers  # started again from zero, once
        assert hashlib.sha256(torn.read_bytes()).hexdigest() == meta["sha256"]
    finally:
        httpx.stream = original  # type: ignore[assignment]


def _offline_agent(tmp_path: Path, broker: Broker, model: Path) -> Agent:
    """An agent that needs no coordinator (models installed locally), its telemetry to ``broker``."""
    return Agent(load_config(env=agent_env(
        EDGEML_DATA_DIR=tmp_path / "agent", EDGEML_API_ADDR=f"127.0.0.1:{free_port()}", EDGEML_BROKER_URL=broker.url,
        EDGEML_MODEL_PATH=model, EDGEML_DEVICE_ID="dev-1", EDGEML_FLEET="plant",
        EDGEML_UPDATES__REQUIRE_SIGNATURE="false", EDGEML_TELEMETRY__METRICS_INTERVAL_S=3600)))


def _altered(path: Path) -> None:
    """Change the file so that it still loads but no longer has its recorded sha256."""
    model = onnx.load(path)
    model.producer_name = "someone else"
    onnx.save(model, path)


@pytest.mark.parametrize("damage", ["truncated", "altered", "both_slots"])
def test_an_active_model_that_fails_at_start_falls_back_to_the_previous_one(
    damage: str, broker: Broker, collector: Collector, models: dict[str, Path], tmp_path: Path
) -> None:
    with _offline_agent(tmp_path, broker, models["onnx_float"]) as agent:
        v1 = agent.model.info  # type: ignore[union-attr]
        v2 = agent.load_model(models["onnx_v2"]).info  # active 2.0.0, previous 1.0.0
    store = tmp_path / "agent" / "models"
    if damage == "altered":
        _altered(store / v2.file)
    else:
        modelgen.corrupt_copy(store / v2.file, store / v2.file)  # half the file: does not load
    if damage == "both_slots":
        _altered(store / v1.file)
    with _offline_agent(tmp_path, broker, models["onnx_float"]) as agent:
        pointer = json.loads((store / "active.json").read_text())
        if damage == "both_slots":  # nothing verified to serve: no model, and the slots stay as they were
            assert agent.model is None and agent.health()["status"] == "no_model"
            assert (pointer["active"]["sha256"], pointer["previous"]["sha256"]) == (v2.sha256, v1.sha256)
            wait_until(lambda: sum(r.get("name") == "model_load_failed" for r in collector.records()) >= 2, 10,
                       what="both load failures reported")
            return
        assert agent.model is not None and agent.model.info.sha256 == v1.sha256
        assert agent.predict({"input": X}).version == "1.0.0"
        assert pointer["active"]["sha256"] == v1.sha256 and pointer["previous"] is None  # it boots into 1.0.0 now
        wait_until(lambda: [r for r in collector.records() if r.get("name") == "model_fallback"], 10,
                   what="the fallback event")
        wait_until(lambda: collector.payloads("state") and reported(collector).active is not None
                   and reported(collector).active.sha256 == v1.sha256, 10, what="reported state")
    event = next(r for r in collector.records() if r.get("name") == "model_fallback")
    assert event["level"] == "error"
    assert event["data"]["failed"]["sha256"] == v2.sha256 and event["data"]["restored"]["sha256"] == v1.sha256
    assert ("does not match its recorded sha256" in event["data"]["reason"]) is (damage == "altered")
    # the next start serves 1.0.0 from the store directly: nothing to fall back from
    with _offline_agent(tmp_path, broker, models["onnx_float"]) as agent:
        assert agent.model is not None and agent.model.info.sha256 == v1.sha256


def test_a_candidate_on_probation_that_fails_at_start_is_rolled_back(
    broker: Broker, collector: Collector, fleet: Fleet, models: dict[str, Path], tmp_path: Path
) -> None:
    fleet.register(models["onnx_float"], "1.0.0")
    v2 = fleet.register(models["onnx_v2"], "2.0.0")
    agent = make_agent(tmp_path, broker, fleet, models["onnx_float"], EDGEML_UPDATES__PROBATION_S=600)
    with agent:
        doc = fleet.deploy("mlp@2.0.0")
        wait_until(lambda: agent.status()["update"]["state"] == "probation", 30, what="probation")
    store = tmp_path / "agent" / "models"
    modelgen.corrupt_copy(store / f"{v2['sha256']}.onnx", store / f"{v2['sha256']}.onnx")
    with make_agent(tmp_path, broker, fleet, models["onnx_float"], EDGEML_UPDATES__PROBATION_S=600) as agent:
        assert agent.model is not None and agent.model.version == "1.0.0"  # the fallback, at once
        status = wait_until(lambda: finished(agent, doc["revision"]), 30, what="the update to end")
        assert (status["update"]["result"], status["update"]["reason"]) == ("rolled_back", "candidate_lost")
        assert agent.model.version == "1.0.0" and status["applied_revision"] == doc["revision"]
        wait_until(lambda: reported(collector).update.reason == "candidate_lost", 10, what="reported state")
    assert reported(collector).active.version == "1.0.0"  # type: ignore[union-attr]


class _Mirror:
    """An artifact server with fixed bytes per path; any other path (a ``.sig``) is 404."""

    def __init__(self, routes: dict[str, bytes]) -> None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.requests: list[str] = []
        mirror = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - the http.server API
                mirror.requests.append(self.path)
                body = routes.get(self.path)
                self.send_response(404 if body is None else 200)
                self.send_header("Content-Length", str(len(body or b"")))
                self.end_headers()
                self.wfile.write(body or b"")

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_an_artifact_without_its_signature_is_rejected(
    broker: Broker, collector: Collector, fleet: Fleet, models: dict[str, Path], tmp_path: Path
) -> None:
    import hashlib

    fleet.register(models["onnx_float"], "1.0.0")
    data = models["onnx_v2"].read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    mirror = _Mirror({"/mlp-2.onnx": data})  # the artifact, and no mlp-2.onnx.sig
    doc = fleet.signed({"v": 1, "fleet": "plant", "device": "dev-1", "revision": 40, "issued_at": int(time.time()),
                        "model": {"name": "mlp", "version": "2.0.0", "url": f"{mirror.base}/mlp-2.onnx",
                                  "sha256": sha, "size": len(data)}, "shadow": None})
    try:
        with make_agent(tmp_path, broker, fleet, models["onnx_float"]) as agent:
            active = agent.model.info.sha256  # type: ignore[union-attr]
            fleet.publish_raw(doc)
            status = wait_until(lambda: finished(agent, 40), 30, what="the update to end")
            assert (status["update"]["result"], status["update"]["reason"]) == ("rejected", "missing_signature")
            assert status["applied_revision"] == 40  # a verdict, not retried
            assert agent.model is not None and agent.model.info.sha256 == active
            assert agent.predict({"input": X}).version == "1.0.0"
            wait_until(lambda: reported(collector).update.reason == "missing_signature", 10, what="reported state")
    finally:
        mirror.close()
    assert mirror.requests == ["/mlp-2.onnx", "/mlp-2.onnx.sig"]  # it downloaded, then asked for the signature
    store = tmp_path / "agent" / "models"
    assert not list(store.glob(f"{sha}.*")) and not list(store.glob("*.part"))  # nothing unsigned stays
    assert json.loads((store / "active.json").read_text())["active"]["sha256"] == active
    failed = [r["data"] for r in collector.records() if r.get("name") == "update_failed"]
    assert {f["reason"] for f in failed} == {"missing_signature"}
