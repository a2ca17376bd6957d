"""Shared fixtures: a real Mosquitto on a free port, real models, a real agent process."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edgeml._testing import models as modelgen
from edgeml._testing.broker import MosquittoBroker, free_port

REPO = Path(__file__).resolve().parent.parent


def wait_until(predicate: Callable[[], Any], timeout: float = 20.0, interval: float = 0.05, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class Broker(MosquittoBroker):
    def __init__(self, workdir: Path) -> None:
        if shutil.which("mosquitto") is None:
            pytest.skip("mosquitto is not installed")
        super().__init__(workdir)
        self.start()


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    b = Broker(tmp_path / "broker")
    yield b
    b.stop()


class Collector:
    """A subscriber we control: persistent session, QoS 1, keeps every message."""

    def __init__(self, port: int, topic: str = "edgeml/v1/#", client_id: str | None = None) -> None:
        self.messages: list[tuple[str, bytes]] = []
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self.client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id or f"collector-{os.getpid()}-{id(self)}",
            clean_session=False,
        )
        self.client.max_inflight_messages_set(1000)
        self.topic = topic
        self.client.on_connect = lambda c, *a: c.subscribe(topic, qos=1)
        self.client.on_subscribe = lambda *a: self._subscribed.set()
        self.client.on_message = self._on_message
        self.client.reconnect_delay_set(0.1, 0.5)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        assert self._subscribed.wait(10), "collector could not subscribe"

    def _on_message(self, client: Any, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.messages.append((msg.topic, msg.payload))

    def payloads(self, leaf: str) -> list[dict[str, Any]]:
        with self._lock:
            return [orjson.loads(p) for t, p in self.messages if t.endswith("/" + leaf)]

    def records(self) -> list[dict[str, Any]]:
        """Every telemetry record received, in arrival order (duplicates kept)."""
        return [r for batch in self.payloads("telemetry") for r in batch["records"]]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def collector(broker: Broker) -> Iterator[Collector]:
    c = Collector(broker.port)
    yield c
    c.close()


@pytest.fixture(scope="session")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Real models built for the tests: ONNX and TFLite, float and int8."""
    d = tmp_path_factory.mktemp("models")
    return {
        "onnx_float": modelgen.build_onnx_mlp(d / "mlp.onnx"),
        "onnx_int8": modelgen.build_onnx_mlp_int8(d / "mlp-int8.onnx", version="1.0.0-int8"),
        "tflite_float": modelgen.build_tflite_mlp(d / "mlp.tflite"),
        "tflite_int8": modelgen.build_tflite_mlp(d / "mlp-int8.tflite", quantized=True),
        "onnx_v2": modelgen.build_onnx_mlp(d / "mlp-v2.onnx", seed=7, version="2.0.0"),
    }


def agent_env(**overrides: Any) -> dict[str, str]:
    """Settings for an agent in tests: no LAN discovery, fast metrics."""
    env = {
        "EDGEML_DISCOVERY__BROWSE": "false",
        "EDGEML_DISCOVERY__ANNOUNCE": "false",
        "EDGEML_RUNTIME__WARMUP_RUNS": "1",
    }
    env.update({k: str(v) for k, v in overrides.items()})
    return env


class AgentProcess:
    """``edgeml agent run`` in a child process, as a user runs it."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.env = {**os.environ, **env}
        self.api_addr = env["EDGEML_API_ADDR"]
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, wait_model: bool = True) -> AgentProcess:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "edgeml.cli", "agent", "run"], env=self.env, stdout=log, stderr=log, cwd=REPO
        )
        wait_until(self._healthy if wait_model else self._up, 30, what=f"agent API ({self.log_path})")
        return self

    def _up(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"agent exited with {self.proc.returncode}: {self.log_path.read_text()[-2000:]}")
        try:
            return httpx.get(f"http://{self.api_addr}/v1/health", timeout=1).status_code in (200, 503)
        except httpx.HTTPError:
            return False

    def _healthy(self) -> bool:
        return self._up() and httpx.get(f"http://{self.api_addr}/v1/health", timeout=1).status_code == 200

    def status(self) -> dict[str, Any]:
        return httpx.get(f"http://{self.api_addr}/v1/status", timeout=5).json()

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)
        self.proc = None

    def stop(self) -> int:
        if self.proc is None:
            return 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(20)
        finally:
            self.proc = None


@pytest.fixture
def agent_process(tmp_path: Path) -> Iterator[Callable[..., AgentProcess]]:
    started: list[AgentProcess] = []

    def make(**env: Any) -> AgentProcess:
        env.setdefault("EDGEML_API_ADDR", f"127.0.0.1:{free_port()}")
        env.setdefault("EDGEML_DATA_DIR", str(tmp_path / "agent-data"))
        p = AgentProcess(agent_env(**env), tmp_path / f"agent-{len(started)}.log")
        started.append(p)
        return p

    yield make
    for p in started:
        if p.proc is not None:
            p.kill()


@pytest.fixture(scope="session", autouse=True)
def _drop_test_databases() -> Iterator[None]:
    """PostgreSQL databases made by ``tests._stores.cloud_db`` go at the end of the session."""
    yield
    from ._stores import drop_created

    drop_created()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """With ``EDGEML_TEST_STORE=postgresql`` only the test modules that start coordinators on
    ``tests._stores.cloud_db`` run (again, now on PostgreSQL): directly, or through a helper
    of a module that does (``tests.test_updates.Fleet``, say). The others do not depend on
    the backend, and the store's own tests run on both backends in every run."""
    from . import _stores

    if _stores.backend() != "postgresql":
        return
    keep, dropped = [], []
    for item in items:
        (keep if _uses_cloud_db(getattr(item, "module", None), _stores.cloud_db) else dropped).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep


def _uses_cloud_db(module: Any, cloud_db: Any) -> bool:
    names = getattr(module, "__dict__", {})
    if names.get("cloud_db") is cloud_db:
        return True
    for value in names.values():
        home = sys.modules.get(getattr(value, "__module__", None) or "")
        if home is not None and home is not module and getattr(home, "cloud_db", None) is cloud_db:
            return True
    return False
