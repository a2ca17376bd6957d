"""Probation in service: a candidate that passed its health check but fails once it serves
is rolled back by the agent itself, with the reason reported (latency is covered in
tests/test_updates.py; here: the error rate, and a crash loop of the agent process)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import numpy as np

from edgeml._exceptions import ModelError
from edgeml._testing import models as modelgen

from .conftest import Broker, Collector, wait_until
from .test_update_crashes import update_state
from .test_updates import Fleet, X, agent_settings, finished, make_agent, reported
from .test_updates import fleet as fleet  # noqa: F401 - the coordinator fixture

BATCH_8 = np.random.default_rng(5).standard_normal((8, 4)).astype(np.float32)



def test_errors_in_service_roll_back_with_reason_error_rate(
    broker: Broker, collector: Collector, fleet: Fleet, models: dict[str, Path], tmp_path: Path
) -> None:
    fleet.register(models["onnx_float"], "1.0.0")
    # batch 1 works (warm-up, health check), any other batch fails inside ONNX Runtime
    v2 = fleet.register(modelgen.build_onnx_mlp(tmp_path / "batch1.onnx", seed=7, version="2.0.0", inner_batch=1),
                        "2.0.0")
    agent = make_agent(tmp_path, broker, fleet, models["onnx_float"], EDGEML_UPDATES__PROBATION_S=60,
                       EDGEML_UPDATES__PROBATION_MIN_PREDICTIONS=10, EDGEML_UPDATES__MAX_ERROR_RATE=0.2)
    with agent:
        assert agent.predict({"input": BATCH_8}).outputs["probs"].shape == (8, 3)  # the active model takes it
        doc = fleet.deploy("mlp@2.0.0")
        wait_until(lambda: agent.status()["update"]["state"] == "probation", 30, what="probation")
        assert agent.model is not None and agent.model.info.sha256 == v2["sha256"]
        assert agent.predict({"input": X}).version == "2.0.0"  # it passed its health check and serves batch 1
        failed = 0
        for _ in range(20):  # well before the 60 s probation ends
            try:
                if agent.predict({"input": BATCH_8}).version != "2.0.0":
                    break  # the probation already rolled back (it checks every 0.1 s)
            except ModelError:
                failed += 1
        assert failed >= 10  # enough for probation_min_predictions
        status = wait_until(lambda: finished(agent, doc["revision"]), 30, what="rollback")
        assert (status["update"]["result"], status["update"]["reason"]) == ("rolled_back", "error_rate")
        assert agent.model.version == "1.0.0"
        assert agent.predict({"input": BATCH_8}).version == "1.0.0"
        assert status["applied_revision"] == doc["revision"]  # acted on: not retried
        wait_until(lambda: reported(collector).update.result == "rolled_back", 10, what="reported rollback")
    state = reported(collector)
    assert state.update.reason == "error_rate"
    assert state.active is not None and state.active.version == "1.0.0"
    # acknowledged by the broker before the agent stopped; the collector gets them a moment later
    wait_until(lambda: {"update_failed", "update_rolled_back"} <= {r.get("name") for r in collector.records()}, 10,
               what="the events upstream")
    failures = [r["data"] for r in collector.records() if r.get("name") == "update_failed"]
    assert {(f["reason"], f["revision"]) for f in failures} == {("error_rate", doc["revision"])}


def test_probation_counts_from_the_first_prediction_the_new_model_serves(
    broker: Broker, collector: Collector, fleet: Fleet, models: dict[str, Path], tmp_path: Path,
) -> None:
    """Predictions the new model serves between the switch and the saved probation state are
    the probation's too: here every prediction of the probation falls in that window."""
    fleet.register(models["onnx_float"], "1.0.0")
    fleet.register(models["onnx_v2"], "2.0.0")
    served: list[str] = []
    with make_agent(tmp_path, broker, fleet, models["onnx_float"], EDGEML_UPDATES__PROBATION_S=0.3) as agent:
        save = agent._updates.log.save

        def serve_then_save(record: Any, *args: Any) -> Any:  # requests while the probation state is saved
            if record.state.value == "probation" and not served:
                served.extend(agent.predict({"input": X}).version for _ in range(7))
            return save(record, *args)

        agent._updates.log.save = serve_then_save
        doc = fleet.deploy("mlp@2.0.0")
        status = wait_until(lambda: finished(agent, doc["revision"]), 30, what="the update")
        assert status["update"]["result"] == "success" and served == ["2.0.0"] * 7
        wait_until(lambda: [r for r in collector.records() if r.get("name") == "update_succeeded"], 10,
                   what="the success event")
    success = next(r["data"] for r in collector.records() if r.get("name") == "update_succeeded")
    assert (success["predictions"], success["errors"]) == (7, 0)


def test_a_crash_loop_during_probation_rolls_back_on_restart(
    broker: Broker, collector: Collector, fleet: Fleet, models: dict[str, Path], tmp_path: Path, agent_process,
) -> None:
    fleet.register(models["onnx_float"], "1.0.0")
    v2 = fleet.register(models["onnx_v2"], "2.0.0")
    # a probation far longer than the test: only the crashes can end it
    env = agent_settings(tmp_path, broker, fleet, models["onnx_float"], EDGEML_UPDATES__PROBATION_S=600,
                         EDGEML_UPDATES__CRASH_LOOP_LIMIT=2, EDGEML_TELEMETRY__METRICS_INTERVAL_S=3600)
    data = Path(env["EDGEML_DATA_DIR"])
    agent = agent_process(**env).start()
    doc = fleet.deploy("mlp@2.0.0")

    def on_probation(crashes: int) -> bool:
        record = update_state(data)
        return (record["state"] == "probation" and record["crashes"] == crashes
                and bool(record["extra"].get("entered")))

    wait_until(lambda: on_probation(0), 30, what="probation")
    assert agent.status()["model"]["sha256"] == v2["sha256"]
    agent.kill()  # SIGKILL: the agent dies while the new model is on probation
    agent.start()
    # counted at start, before the candidate serves (it may kill the agent again at once)
    assert update_state(data)["crashes"] == 1
    wait_until(lambda: on_probation(1), 30, what="probation after the first crash")
    assert agent.status()["update"]["state"] == "probation"
    agent.kill()
    agent.start()  # the second crash reaches the limit: roll back, do not try again
    assert agent.status()["model"]["version"] == "1.0.0"  # it boots into the previous model: v2 never serves again
    status = wait_until(lambda: finished_process(agent, doc["revision"]), 30, what="rollback")
    assert (status["update"]["result"], status["update"]["reason"]) == ("rolled_back", "crash_loop")
    assert status["model"]["version"] == "1.0.0"
    answer = httpx.post(f"http://{agent.api_addr}/v1/predict", json={"inputs": {"input": X.tolist()}}, timeout=5)
    assert answer.status_code == 200 and answer.json()["version"] == "1.0.0"
    record = update_state(data)
    assert (record["state"], record["result"], record["reason"], record["crashes"]) == (
        "idle", "rolled_back", "crash_loop", 2)
    wait_until(lambda: reported(collector).update.reason == "crash_loop", 10, what="reported rollback")
    assert agent.stop() == 0
    state = reported(collector)
    assert state.update.result == "rolled_back" and state.active is not None and state.active.version == "1.0.0"
    names = [(r.get("name"), r.get("data", {})) for r in collector.records()]
    assert {d["crashes"] for n, d in names if n == "probation_crash"} == {1, 2}  # QoS 1: duplicates possible
    assert any(n == "update_failed" and d["reason"] == "crash_loop" for n, d in names)


def finished_process(agent: Any, revision: int) -> dict[str, Any] | None:
    status = agent.status()
    update = status["update"]
    return status if update["revision"] == revision and update["state"] == "idle" and update["result"] else None


def test_a_previous_model_that_no_longer_loads_leaves_the_candidate_active_not_nothing(
    broker: Broker, fleet: Fleet, models: dict[str, Path], tmp_path: Path,
) -> None:
    """The rollback loads the previous model before it moves the pointer: a previous model
    that fails to load leaves the device serving, and booting into, what runs."""
    v1 = fleet.register(models["onnx_float"], "1.0.0")
    fleet.register(models["onnx_v2"], "2.0.0")
    settings = {"EDGEML_UPDATES__PROBATION_S": 60, "EDGEML_UPDATES__PROBATION_MIN_PREDICTIONS": 10,
                "EDGEML_UPDATES__MAX_ERROR_RATE": 0.2}
    with make_agent(tmp_path, broker, fleet, models["onnx_float"], **settings) as agent:
        doc = fleet.deploy("mlp@2.0.0")
        wait_until(lambda: agent.status()["update"]["state"] == "probation", 30, what="probation")
        stored = tmp_path / "agent" / "models" / f"{v1['sha256']}.onnx"
        stored.write_bytes(b"\x00" * 64)  # the previous model's file is damaged
        probe = agent._updates.probation
        for _ in range(20):  # failures the probation counts
            probe.observe(None)
        status = wait_until(lambda: finished(agent, doc["revision"]), 30, what="the failed rollback")
        assert (status["update"]["result"], status["update"]["reason"]) == ("failed", "rollback_failed")
        assert agent.predict({"input": X}).version == "2.0.0"  # still serving
    assert update_state(tmp_path / "agent")["state"] == "idle"
    pointer = (tmp_path / "agent" / "models" / "active.json").read_text()
    assert '"2.0.0"' in pointer.split('"previous"')[0]  # the device boots into the model that runs
    with make_agent(tmp_path, broker, fleet, models["onnx_float"], **settings) as again:
        assert again.health()["status"] == "ok" and again.predict({"input": X}).version == "2.0.0"
