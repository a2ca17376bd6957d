"""`edgeml cloud serve` killed with SIGKILL mid-stream: after a restart every record is stored exactly once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import httpx

from .._stores import cloud_db
from ..conftest import REPO, Broker, free_port, wait_until
from .test_coordinator import X, device_doc, drained, make_agent


def serve(config: Path, env: dict[str, str], url: str, log: Path) -> subprocess.Popen[bytes]:
    """Start the coordinator as a user does and wait until it serves with the broker connected."""
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "edgeml.cli", "cloud", "serve", "-c", str(config)], env=env,
                                stdout=out, stderr=out, cwd=REPO)
    wait_until(lambda: f"listening on {url}" in log.read_text() or proc.poll() is not None, 30,
               what="coordinator to listen")
    assert proc.poll() is None, log.read_text()
    assert httpx.get(f"{url}/v1/health", timeout=10).json()["broker_connected"] is True
    return proc


def stored(url: str) -> int:
    try:
        return int(device_doc(url).get("records", 0))
    except httpx.TransportError:  # the coordinator is down
        return 0


def test_sigkill_mid_stream_then_restart_stores_every_record_once(
    broker: Broker, models: dict[str, Path], tmp_path: Path
) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    config = tmp_path / "cloud.yaml"
    # a slow flush keeps messages received but not yet committed, so not acknowledged, at the kill
    config.write_text(f"db: {cloud_db(tmp_path)}\nartifact_dir: {tmp_path / 'art'}\nbroker_wait_s: 10\n"
                      "ingest:\n  flush_interval_s: 0.25\n")
    env = {**os.environ, "EDGEML_HTTP_ADDR": f"127.0.0.1:{port}", "EDGEML_BROKER_URL": broker.url}
    procs: list[subprocess.Popen[bytes]] = []
    agent = make_agent(tmp_path, broker, models["onnx_float"])
    stop = threading.Event()
    predictions = 0

    def produce() -> None:  # the device's application: predictions at a steady pace, whatever the cloud does
        nonlocal predictions
        while not stop.wait(0.005):
            agent.predict({"input": X})
            predictions += 1

    def next_seq() -> int:
        return int(agent.status()["buffer"]["next_seq"])

    producer = threading.Thread(target=produce, name="test-producer")
    try:
        procs.append(serve(config, env, url, tmp_path / "serve-1.log"))
        with agent:
            producer.start()
            try:
                wait_until(lambda: stored(url) >= 100, 30, what="first records stored")
                procs[0].send_signal(signal.SIGKILL)  # mid-stream: no drain, no acknowledgement of what it held
                assert procs[0].wait(10) == -signal.SIGKILL
                at_kill = next_seq()
                wait_until(lambda: next_seq() >= at_kill + 200, 30, what="the agent to publish while the coordinator is dead")
                procs.append(serve(config, env, url, tmp_path / "serve-2.log"))  # same config: same client id, same session
                at_restart = next_seq()
                wait_until(lambda: stored(url) >= at_restart - 1, 30, what="the records sent meanwhile to be stored")
                wait_until(lambda: next_seq() >= at_restart + 200, 30, what="more records after the restart")
            finally:
                stop.set()
                producer.join()
            wait_until(lambda: drained(agent), 30, what="agent buffer to drain")
            last = next_seq() - 1
            wait_until(lambda: stored(url) >= last, 30, what="every record stored")
            doc = device_doc(url)
            assert (doc["records"], doc["max_contiguous_seq"], doc["gaps"]) == (last, last, 0), doc
            rows = httpx.get(f"{url}/v1/devices/default/dev-1/telemetry", params={"limit": 100_000}, timeout=30).json()
            assert len(rows) == last == len({(r["stream"], r["seq"]) for r in rows})
            assert sum(1 for r in rows if r["kind"] == "prediction") == predictions
        procs[1].send_signal(signal.SIGTERM)
        assert procs[1].wait(20) == 0, (tmp_path / "serve-2.log").read_text()
    finally:
        stop.set()
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
