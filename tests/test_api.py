"""The local HTTP API: answers and clear 4xx errors."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from edgeml import Agent, load_config

from .conftest import agent_env, free_port


@pytest.fixture
def base(models: dict[str, Path], tmp_path: Path):
    env = agent_env(EDGEML_DATA_DIR=tmp_path / "d", EDGEML_API_ADDR=f"127.0.0.1:{free_port()}",
                    EDGEML_MODEL_PATH=models["onnx_float"])
    with Agent(load_config(env=env)) as agent:
        yield f"http://{agent.config.api_addr}"


def test_predict_health_status(base: str) -> None:
    r = httpx.post(f"{base}/v1/predict", json={"inputs": {"input": [[0.1, 0.2, 0.3, 0.4]]}})
    assert r.status_code == 200
    body = r.json()
    assert set(body) == {"id", "outputs", "model", "version", "latency_us"}
    assert len(body["outputs"]["probs"][0]) == 3 and abs(sum(body["outputs"]["probs"][0]) - 1) < 1e-5
    assert (body["model"], body["version"]) == ("mlp", "1.0.0")
    assert httpx.get(f"{base}/v1/health").json() == {"status": "ok", "model": "mlp", "version": "1.0.0"}
    status = httpx.get(f"{base}/v1/status").json()
    assert status["model"]["inputs"][0] == {"name": "input", "shape": [None, 4], "dtype": "float32", "quantized": False}
    assert status["counters"]["predictions"] == 1


@pytest.mark.parametrize(
    ("body", "code", "message"),
    [
        (b"{not json", "bad_json", "not valid JSON"),
        (b'{"input": [[1,2,3,4]]}', "bad_request", '"inputs"'),
        (b"[1,2]", "bad_request", '"inputs"'),
        (b'{"inputs": {"input": [[1,2,3]]}}', "bad_input", "expected shape [N, 4], got [1, 3]"),
        (b'{"inputs": {"input": [["x",2,3,4]]}}', "bad_input", "expected numbers"),
        (b'{"inputs": {"wrong": [[1,2,3,4]]}}', "bad_input", "missing input 'input'"),
        (b'{"inputs": [[1,2,3,4]]}', "bad_input", "must be an object"),
    ],
)
def test_bad_requests_get_400_saying_what_is_wrong(base: str, body: bytes, code: str, message: str) -> None:
    r = httpx.post(f"{base}/v1/predict", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 400
    assert r.json()["error"]["code"] == code
    assert message in r.json()["error"]["message"]


def test_unknown_routes_and_methods(base: str) -> None:
    assert httpx.get(f"{base}/v2/predict").status_code == 404
    assert httpx.get(f"{base}/v1/predict").status_code == 405
    assert httpx.put(f"{base}/v1/predict", content=b"x").status_code == 405


def test_keep_alive_connection_serves_many(base: str) -> None:
    with httpx.Client(base_url=base) as client:
        for _ in range(50):
            assert client.post("/v1/predict", json={"inputs": {"input": [[1, 2, 3, 4]]}}).status_code == 200


def test_feedback_records_labels(base: str) -> None:
    r = httpx.post(f"{base}/v1/feedback", json={"label": 1, "predicted": 1})
    assert r.status_code == 202 and r.json()["correct"] is True and r.json()["model"] == "mlp"
    r = httpx.post(f"{base}/v1/feedback", json={"label": 2, "predicted": 0, "inputs": {"input": [[1, 2, 3, 4]]}})
    assert r.status_code == 202 and r.json()["correct"] is False
    bad = httpx.post(f"{base}/v1/feedback", json={"label": 2, "inputs": {"input": [[1, 2]]}})
    assert bad.status_code == 400 and "expected shape" in bad.json()["error"]["message"]
    assert httpx.post(f"{base}/v1/feedback", json={"predicted": 1}).status_code == 400
    assert httpx.post(f"{base}/v1/feedback", json={"label": [1]}).status_code == 400
