"""kill -9 during a burst: every persisted seq reaches the subscriber, no gap."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx

from edgeml.buffer import inspect

from .conftest import Broker, Collector, wait_until


def test_kill_9_during_burst_loses_no_persisted_record(
    broker: Broker, collector: Collector, models: dict[str, Path], tmp_path: Path, agent_process
) -> None:
    data = tmp_path / "agent-data"
    agent = agent_process(EDGEML_BROKER_URL=broker.url, EDGEML_MODEL_PATH=models["onnx_float"],
                          EDGEML_DATA_DIR=data, EDGEML_DEVICE_ID="crashy").start()
    answered = []
    stop = threading.Event()

    def burst() -> None:
        with httpx.Client(base_url=f"http://{agent.api_addr}", timeout=5) as client:
            while not stop.is_set():
                try:
                    r = client.post("/v1/predict", json={"inputs": {"input": [[0.5, 0.1, -0.3, 1.0]]}})
                except httpx.HTTPError:
                    return
                if r.status_code == 200:
                    answered.append(time.time())

    threads = [threading.Thread(target=burst) for _ in range(4)]
    for t in threads:
        t.start()
    # a burst of over 1,500 answers and over 1.5 s: most were answered well before the kill
    wait_until(lambda: len(answered) > 1500 and answered[-1] - answered[0] > 1.5, 30, what="burst")
    agent.kill()  # SIGKILL, in the middle of the burst
    killed_at = time.time()
    stop.set()
    for t in threads:
        t.join()
    persisted = inspect(data / "telemetry.db")
    assert persisted is not None
    last_persisted = persisted.next_seq - 1
    assert last_persisted > 1000

    agent.start()
    status = wait_until(lambda: (s := agent.status())["buffer"]["records"] == 0 and s, 30, what="drain after restart")
    final = status["buffer"]["next_seq"] - 1
    wait_until(lambda: max((r["seq"] for r in collector.records()), default=0) >= final, 30, what="collector")
    agent.stop()

    records = collector.records()
    seqs = [r["seq"] for r in records]
    unique = sorted(set(seqs))
    assert unique == list(range(1, unique[-1] + 1)), "a persisted record never arrived"
    assert set(range(1, last_persisted + 1)) <= set(unique)
    # the records of the first run are the predictions answered up to the kill, minus at most
    # the durability window (100 ms documented, measured by bench/bench_agent.py; 0.5 s here leaves room
    # for a loaded test machine, where four client threads starve the flusher, and still catches a buffer
    # that commits late: over 1,500 predictions were answered before the kill)
    first_run = [r for r in records if r["seq"] <= last_persisted and r["kind"] == "prediction"]
    made_before_window = sum(1 for ts in answered if ts < killed_at - 0.5)
    assert made_before_window >= 500  # enough to tell
    assert len({r["seq"] for r in first_run}) >= made_before_window
    # duplicates are re-sends of the unacknowledged window only (max_inflight x batch size)
    dupes = len(seqs) - len(unique)
    assert dupes <= 16 * 500
    restarted = [r for r in records if r.get("name") == "agent_started"]
    assert len({r["seq"] for r in restarted}) == 2
