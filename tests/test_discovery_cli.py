"""LAN discovery (real zeroconf on this host) and `edgeml agent status`."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgeml import Agent, BrokerNotFound, load_config
from edgeml.discovery import AGENT_SERVICE, MQTT_SERVICE, find_broker

from .conftest import REPO, Broker, agent_env, free_port, wait_until


def _announce_broker(port: int):
    from zeroconf import ServiceInfo, Zeroconf

    zc = Zeroconf()
    info = ServiceInfo(MQTT_SERVICE, f"test-{port}.{MQTT_SERVICE}", addresses=[socket.inet_aton("127.0.0.1")], port=port)
    zc.register_service(info)
    return zc, info


def test_agent_finds_an_announced_broker_and_syncs(broker: Broker, models: dict[str, Path], tmp_path: Path) -> None:
    zc, info = _announce_broker(broker.port)
    try:
        assert find_broker(5).port == broker.port
        env = agent_env(EDGEML_DATA_DIR=tmp_path / "d", EDGEML_API_ADDR=f"127.0.0.1:{free_port()}",
                        EDGEML_MODEL_PATH=models["onnx_float"], EDGEML_DISCOVERY__BROWSE="true")
        with Agent(load_config(env=env)) as agent:
            assert agent.status()["sync"]["broker"] == broker.url
            wait_until(lambda: agent.status()["sync"]["connected"], what="connection to the discovered broker")
    finally:
        zc.unregister_service(info)
        zc.close()


def test_no_broker_anywhere_runs_offline(models: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(BrokerNotFound):
        find_broker(0.5)
    env = agent_env(EDGEML_DATA_DIR=tmp_path / "d", EDGEML_API_ADDR=f"127.0.0.1:{free_port()}",
                    EDGEML_MODEL_PATH=models["onnx_float"], EDGEML_DISCOVERY__BROWSE="true",
                    EDGEML_DISCOVERY__TIMEOUT_S="0.5")
    with Agent(load_config(env=env)) as agent:
        agent.predict({"input": np.zeros((1, 4), np.float32)})
        assert agent.status()["sync"]["connected"] is False


def test_agent_announces_its_api(models: dict[str, Path], tmp_path: Path) -> None:
    from zeroconf import Zeroconf

    port = free_port()
    env = agent_env(EDGEML_DATA_DIR=tmp_path / "d", EDGEML_API_ADDR=f"127.0.0.1:{port}", EDGEML_DEVICE_ID="rig-7",
                    EDGEML_MODEL_PATH=models["onnx_float"], EDGEML_DISCOVERY__ANNOUNCE="true")
    with Agent(load_config(env=env)):
        zc = Zeroconf()
        try:
            info = wait_until(lambda: zc.get_service_info(AGENT_SERVICE, f"rig-7.{AGENT_SERVICE}", timeout=1000),
                              20, what="announcement")
            assert info.port == port and info.properties[b"device"] == b"rig-7"
        finally:
            zc.close()


def test_agent_status_cli_running_and_stopped(broker: Broker, models: dict[str, Path], tmp_path: Path, agent_process) -> None:
    cfg = tmp_path / "agent.yaml"
    api = f"127.0.0.1:{free_port()}"
    cfg.write_text(f"device_id: st-1\ndata_dir: {tmp_path / 'data'}\napi_addr: {api}\nbroker_url: {broker.url}\n"
                   f"model_path: {models['onnx_float']}\ndiscovery:\n  browse: false\n  announce: false\n")
    agent = agent_process(EDGEML_API_ADDR=api, EDGEML_DATA_DIR=tmp_path / "data", EDGEML_DEVICE_ID="st-1",
                          EDGEML_BROKER_URL=broker.url, EDGEML_MODEL_PATH=models["onnx_float"]).start()
    wait_until(lambda: agent.status()["sync"]["connected"], what="connected")

    def status(*extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "edgeml.cli", "agent", "status", "-c", str(cfg), *extra],
                              capture_output=True, text=True, cwd=REPO, timeout=60)

    doc = json.loads(status("--json").stdout)
    assert doc["running"] is True and doc["model"]["name"] == "mlp" and doc["sync"]["connected"] is True
    assert {"records", "dropped_total", "last_ack_ts"} <= set(doc["buffer"])
    text = status().stdout
    assert "mlp 1.0.0 (onnx)" in text and "connected" in text
    agent.stop()
    doc = json.loads(status("--json").stdout)  # read from the data dir
    assert doc["running"] is False and doc["model"]["version"] == "1.0.0"
    assert doc["buffer"]["next_seq"] > 1 and doc["buffer"]["last_ack_ts"] is not None
    assert "not running" in status().stdout
