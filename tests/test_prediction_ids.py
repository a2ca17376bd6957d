"""Prediction ids: the predict answer carries one, feedback names it, and the sample and
feedback records carry it so the cloud joins labels to inputs. A real agent, a real
Mosquitto, the records read by a subscriber."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from edgeml import Agent, load_config

from .conftest import Broker, Collector, agent_env, free_port, wait_until

X = [[0.1, 0.2, 0.3, 0.4]]


def _agent(tmp_path: Path, model: Path, **env: object) -> Agent:
    return Agent(load_config(env=agent_env(
        EDGEML_DATA_DIR=tmp_path / "d", EDGEML_API_ADDR=f"127.0.0.1:{free_port()}", EDGEML_MODEL_PATH=model,
        EDGEML_DEVICE_ID="dev-ids", EDGEML_FLEET="ids", **env)))


def test_ids_are_unique_per_boot_prefix_plus_counter(models: dict[str, Path], tmp_path: Path) -> None:
    with _agent(tmp_path / "a", models["onnx_float"]) as agent:
        ids = [agent.predict({"input": X}).id for _ in range(50)]
    with _agent(tmp_path / "b", models["onnx_float"]) as again:
        later = again.predict({"input": X}).id
    assert len(set(ids)) == 50
    prefix = {i.rsplit("-", 1)[0] for i in ids}
    assert len(prefix) == 1 and [int(i.rsplit("-", 1)[1]) for i in ids] == list(range(1, 51))
    assert later.rsplit("-", 1)[0] not in prefix  # a new boot, a new prefix: ids never collide after a restart


def test_http_feedback_by_id_lands_in_sample_and_feedback_records(
    broker: Broker, collector: Collector, models: dict[str, Path], tmp_path: Path,
) -> None:
    agent = _agent(tmp_path, models["onnx_float"], EDGEML_BROKER_URL=broker.url, EDGEML_TELEMETRY__SAMPLE_RATE=1.0)
    with agent:
        base = f"http://{agent.config.api_addr}"
        answers = [httpx.post(f"{base}/v1/predict", json={"inputs": {"input": [[i, 1.0, 2.0, 3.0]]}}).json()
                   for i in range(3)]
        assert all(isinstance(a["id"], str) and a["id"] for a in answers)
        assert len({a["id"] for a in answers}) == 3
        r = httpx.post(f"{base}/v1/feedback", json={"label": 2, "id": answers[1]["id"], "predicted": 0})
        assert r.status_code == 202 and r.json()["prediction_id"] == answers[1]["id"]
        bad = httpx.post(f"{base}/v1/feedback", json={"label": 2, "id": 17})
        assert bad.status_code == 400 and '"id"' in bad.json()["error"]["message"]
        wait_until(lambda: any(r["kind"] == "feedback" for r in collector.records()), what="feedback record")
    records = collector.records()
    samples = {r["prediction_id"]: r for r in records if r["kind"] == "sample"}
    assert set(samples) == {a["id"] for a in answers}
    [feedback] = [r for r in records if r["kind"] == "feedback"]
    assert feedback["prediction_id"] == answers[1]["id"] and feedback["label"] == 2
    joined = samples[feedback["prediction_id"]]
    assert joined["inputs"]["input"] == [[1.0, 1.0, 2.0, 3.0]]  # the inputs of that very prediction


def test_feedback_without_id_still_works(models: dict[str, Path], tmp_path: Path) -> None:
    with _agent(tmp_path, models["onnx_float"]) as agent:
        doc = agent.feedback(1, 1)
        assert "prediction_id" not in doc and doc["correct"] is True
        with pytest.raises(Exception, match='"id"'):
            agent.feedback(1, prediction_id="x" * 65)


def test_a_sample_keeps_the_inputs_even_when_the_application_reuses_its_buffer(models: dict[str, Path],
                                                                               tmp_path: Path) -> None:
    import numpy as np

    from edgeml.buffer import iter_records

    frame = np.array(X, dtype=np.float32)  # one buffer, refilled for every prediction (a camera loop)
    with _agent(tmp_path, models["onnx_float"], EDGEML_TELEMETRY__SAMPLE_RATE=1.0) as agent:
        answers = []
        for i in range(5):
            frame[0, 0] = i
            answers.append(agent.predict({"input": frame}))
            answers[-1].outputs["probs"] *= 0  # the application changes the outputs too
        buffer = agent._buffer
        assert buffer is not None
        buffer.flush()
        batch = buffer.read_batch(0, 1_000_000, 1 << 40)
        assert batch is not None
        samples = [r for r in iter_records(batch.bodies) if r["kind"] == "sample"]
    assert [s["inputs"]["input"][0][0] for s in samples] == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert all(any(v != 0 for v in s["outputs"]["probs"][0]) for s in samples)
