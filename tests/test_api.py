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


def _raw(base: str, request: bytes, timeout: float = 5.0) -> bytes:
    """Send ``request`` as is on a new connection; everything the server answers until it closes."""
    import socket

    host, port = base.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout) as s:
        s.sendall(request)
        s.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return data


def test_routes_ignore_the_query_and_wrong_methods_get_json_405_with_allow(base: str) -> None:
    assert httpx.get(f"{base}/v1/health?verbose=1").json()["status"] == "ok"
    r = httpx.post(f"{base}/v1/health", json={})
    assert r.status_code == 405 and r.headers["Allow"] == "GET" and r.json()["error"]["code"] == "method_not_allowed"
    for method in ("OPTIONS", "HEAD", "DELETE"):
        r = httpx.request(method, f"{base}/v1/predict")
        assert r.status_code == 405 and r.headers["Allow"] == "POST", method
        assert method == "HEAD" or r.json()["error"]["code"] == "method_not_allowed"


def test_a_get_with_a_body_is_not_read_as_the_next_request(base: str) -> None:
    answer = _raw(base, b"GET /v1/health HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"
                        b"GET /v1/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert answer.count(b"HTTP/1.1 200") == 2, answer


@pytest.mark.parametrize("length", ["\u00b2", "-1", "1e3", "chunked"])
def test_a_content_length_that_is_not_a_plain_number_gets_411(base: str, length: str) -> None:
    header = length.encode("latin-1")  # how the server decodes header bytes
    answer = _raw(base, b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Length: " + header + b"\r\n\r\n{}")
    assert answer.startswith(b"HTTP/1.1 411"), answer


def test_a_client_that_stalls_mid_body_is_dropped(models: dict[str, Path], tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import socket
    import time

    from edgeml import api

    assert 0 < api._Handler.timeout <= 120  # the default: a stalled client is dropped within minutes
    monkeypatch.setattr(api._Handler, "timeout", 0.5)
    env = agent_env(EDGEML_DATA_DIR=tmp_path / "d", EDGEML_API_ADDR=f"127.0.0.1:{free_port()}",
                    EDGEML_MODEL_PATH=models["onnx_float"])
    with Agent(load_config(env=env)) as agent:
        host, port = agent.config.api_host_port  # type: ignore[misc]
        with socket.create_connection((host, port), timeout=10) as s:
            s.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"inp")
            t0 = time.monotonic()
            assert s.recv(1024) == b""  # closed by the server, not held forever
            assert time.monotonic() - t0 < 5


def test_the_api_listens_on_an_ipv6_address(models: dict[str, Path], tmp_path: Path) -> None:
    import socket

    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback on this machine")
    env = agent_env(EDGEML_DATA_DIR=tmp_path / "d", EDGEML_API_ADDR=f"[::1]:{free_port()}",
                    EDGEML_MODEL_PATH=models["onnx_float"])
    with Agent(load_config(env=env)) as agent:
        port = agent.config.api_host_port[1]  # type: ignore[index]
        assert httpx.get(f"http://[::1]:{port}/v1/health").json()["status"] == "ok"


def test_the_client_says_when_something_else_answers_on_the_api_address() -> None:
    import http.server
    import threading

    from edgeml import AgentClient, AgentUnavailable

    class Other(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            self.send_response(200)
            self.send_header("Content-Length", "5")
            self.end_headers()
            self.wfile.write(b"hello")

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Other)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with AgentClient(f"http://127.0.0.1:{server.server_address[1]}") as client, \
                pytest.raises(AgentUnavailable, match="without JSON"):
            client.status()
    finally:
        server.shutdown()
        server.server_close()
