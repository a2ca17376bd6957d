"""The coordinator end to end: a real agent -> a private Mosquitto -> Coordinator -> API, CLI, /metrics."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydantic import BaseModel

from cloud import CloudError
from cloud._config import CloudConfig, InvalidSetting, load_cloud_config
from cloud.coordinator import Coordinator
from cloud.keys import generate_keys
from edgeml import Agent, load_config

from ..conftest import REPO, Broker, agent_env, free_port, wait_until

X = np.random.default_rng(1).standard_normal((1, 4)).astype(np.float32)


def cloud_config(tmp_path: Path, store_url: str, broker: Broker, **over: Any) -> CloudConfig:
    key = tmp_path / "keys" / "fleet.key"
    if not key.exists():
        generate_keys(key.parent)
    settings: dict[str, Any] = dict(
        broker_url=broker.url, db=store_url, http_addr="127.0.0.1:0", artifact_dir=tmp_path / "artifacts",
        signing_key=key,
    )
    settings.update(over)
    return CloudConfig(**settings)


def make_agent(tmp_path: Path, broker: Broker, model: Path, device: str = "dev-1") -> Agent:
    env = agent_env(
        EDGEML_DATA_DIR=tmp_path / f"data-{device}", EDGEML_API_ADDR=f"127.0.0.1:{free_port()}",
        EDGEML_BROKER_URL=broker.url, EDGEML_MODEL_PATH=model, EDGEML_DEVICE_ID=device,
        EDGEML_TELEMETRY__METRICS_INTERVAL_S=3600,  # no metrics record sneaks in while we compare
    )
    return Agent(load_config(env=env))


def drained(agent: Agent) -> bool:
    buf = agent.status()["buffer"]
    return buf["records"] == 0 and buf["pending"] == 0


def device_doc(url: str, device: str = "dev-1") -> dict[str, Any]:
    r = httpx.get(f"{url}/v1/devices/default/{device}", timeout=10)
    return r.json() if r.status_code == 200 else {}


def scrape(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples if not s.labels}


def cli(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "EDGEML_CLOUD_URL": url}
    return subprocess.run([sys.executable, "-m", "edgeml.cli", *args], env=env, capture_output=True, text=True,
                          timeout=60, cwd=REPO)


def test_agent_to_coordinator_to_cli(broker: Broker, store_url: str, models: dict[str, Path], tmp_path: Path) -> None:
    n = 300
    with Coordinator(cloud_config(tmp_path, store_url, broker)) as coordinator:
        url = coordinator.url
        assert httpx.get(f"{url}/v1/health").json()["broker_connected"] is True
        before = scrape(url)
        assert before["edgeml_ingest_records_total"] == 0 and before["edgeml_devices_online"] == 0
        agent = make_agent(tmp_path, broker, models["onnx_float"])
        with agent:
            for _ in range(n):
                agent.predict({"input": X})
            wait_until(lambda: drained(agent), what="agent buffer to drain")
            last = agent.status()["buffer"]["next_seq"] - 1
            wait_until(lambda: device_doc(url).get("records", 0) >= last, what="records in the coordinator")
            result = cli(url, "fleet", "show", "dev-1", "--json")
            assert result.returncode == 0, result.stderr
            doc = json.loads(result.stdout)
            assert agent.status()["buffer"]["next_seq"] - 1 == last  # nothing new meanwhile
            assert (doc["records"], doc["max_contiguous_seq"], doc["gaps"]) == (last, last, 0)
            assert doc["online"] is True and len(doc["streams"]) == 1
            predictions = httpx.get(f"{url}/v1/devices/default/dev-1/telemetry",
                                    params={"kind": "prediction", "limit": 10_000}).json()
            assert len(predictions) == n
            after = scrape(url)
            assert after["edgeml_ingest_records_total"] == last and after["edgeml_devices_online"] == 1
            events = httpx.get(f"{url}/v1/events").json()
            assert {"agent_started", "model_loaded"} <= {e["body"]["name"] for e in events}
            table = cli(url, "fleet", "list")
            assert table.returncode == 0 and "dev-1" in table.stdout and "online" in table.stdout


def test_restart_mid_stream_loses_nothing_and_stores_nothing_twice(
    broker: Broker, store_url: str, models: dict[str, Path], tmp_path: Path
) -> None:
    config = cloud_config(tmp_path, store_url, broker)
    first = Coordinator(config).start()
    agent = make_agent(tmp_path, broker, models["onnx_float"])
    with agent:
        for _ in range(200):
            agent.predict({"input": X})
        wait_until(lambda: device_doc(first.url).get("records", 0) > 0, what="first records stored")
        first.stop()  # mid-stream: the agent keeps publishing; the broker keeps the session's messages
        for _ in range(200):
            agent.predict({"input": X})
        wait_until(lambda: drained(agent), what="agent to publish while the coordinator is down")
        with Coordinator(config) as second:
            for _ in range(200):
                agent.predict({"input": X})
            wait_until(lambda: drained(agent), what="agent buffer to drain")
            last = agent.status()["buffer"]["next_seq"] - 1
            wait_until(lambda: device_doc(second.url).get("records", 0) >= last, what="every record stored")
            doc = device_doc(second.url)
            assert (doc["records"], doc["max_contiguous_seq"], doc["gaps"]) == (last, last, 0)
            rows = httpx.get(f"{second.url}/v1/devices/default/dev-1/telemetry", params={"limit": 10_000}).json()
    assert len(rows) == last == len({(r["stream"], r["seq"]) for r in rows})
    assert sum(1 for r in rows if r["kind"] == "prediction") == 600


def test_config_from_file_and_environment_names_bad_keys(tmp_path: Path) -> None:
    f = tmp_path / "cloud.yaml"
    f.write_text("db: /var/lib/x.db\nhttp_addr: 0.0.0.0:9000\ningest:\n  policy: preregistered\n")
    cfg = load_cloud_config(f, env={"EDGEML_CLOUD_DB": "postgresql://db/edgeml", "EDGEML_INGEST__FLEET": "plant",
                                    "EDGEML_DEVICE_ID": "for-the-agent"})
    assert (cfg.db, cfg.http_host_port, cfg.ingest.policy, cfg.ingest.fleet) == (
        "postgresql://db/edgeml", ("0.0.0.0", 9000), "preregistered", "plant")
    assert cfg.ingest_config().broker_url == cfg.broker_url
    cases = [
        ({"EDGEML_BROKER_URL": "http://x"}, "broker_url"),
        ({"EDGEML_CLOUD_DB": "mysql://x/y"}, "db"),
        ({"EDGEML_HTTP_ADDR": "nowhere"}, "http_addr"),
        ({"EDGEML_SIGNING_KEY": str(tmp_path / "missing.key")}, "signing_key"),
        ({"EDGEML_INGEST__POLICY": "maybe"}, "ingest.policy"),
    ]
    for env, key in cases:
        with pytest.raises(InvalidSetting) as info:
            load_cloud_config(env=env)
        assert info.value.key == key and next(iter(env)) in str(info.value), str(info.value)
    not_a_key = tmp_path / "not.key"
    not_a_key.write_text("hello")
    with pytest.raises(InvalidSetting, match="signing_key.*not an ed25519 private key"):
        load_cloud_config(env={"EDGEML_SIGNING_KEY": str(not_a_key)})
    f.write_text("ingest:\n  polcy: accept\n")
    with pytest.raises(InvalidSetting, match="ingest.polcy.*unknown setting"):
        load_cloud_config(f, env={})


def test_example_config_documents_every_key() -> None:
    path = REPO / "configs" / "cloud.yaml"
    cfg = load_cloud_config(path, env={})
    assert cfg == CloudConfig()  # the example shows the defaults
    text = path.read_text()
    for key, value in cfg:
        assert f"\n{key}:" in text, f"configs/cloud.yaml does not document {key}"
        if isinstance(value, BaseModel):
            for sub in type(value).model_fields:
                assert f"\n  {sub}:" in text, f"configs/cloud.yaml does not document {key}.{sub}"


def test_busy_port_fails_start_clearly(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        config = CloudConfig(db=str(tmp_path / "c.db"), http_addr=f"127.0.0.1:{port}", artifact_dir=tmp_path / "a",
                             broker_wait_s=0)
        with pytest.raises(CloudError, match=f"cannot listen on 127.0.0.1:{port}"):
            Coordinator(config).start()


def test_cloud_serve_runs_until_sigterm(broker: Broker, tmp_path: Path) -> None:
    port = free_port()
    f = tmp_path / "cloud.yaml"
    f.write_text(f"db: {tmp_path / 'cloud.db'}\nartifact_dir: {tmp_path / 'art'}\nbroker_wait_s: 5\n")
    env = {**os.environ, "EDGEML_HTTP_ADDR": f"127.0.0.1:{port}", "EDGEML_BROKER_URL": broker.url}
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "edgeml.cli", "cloud", "serve", "-c", str(f)], env=env,
                                stdout=out, stderr=out, cwd=REPO)
        try:
            wait_until(lambda: f"listening on http://127.0.0.1:{port}" in log.read_text() or proc.poll() is not None,
                       30, what="coordinator to listen")
            assert proc.poll() is None, log.read_text()
            assert httpx.get(f"http://127.0.0.1:{port}/v1/health").json()["broker_connected"] is True
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(20) == 0, log.read_text()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    bad = subprocess.run([sys.executable, "-m", "edgeml.cli", "cloud", "serve"], env={**env, "EDGEML_HTTP_ADDR": "x"},
                         capture_output=True, text=True, timeout=60, cwd=REPO)
    assert bad.returncode == 2 and "http_addr" in bad.stderr and "EDGEML_HTTP_ADDR" in bad.stderr
