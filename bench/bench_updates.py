"""Safe-update benchmarks (issue: safe model updates). Prints one JSON document.

    python bench/bench_updates.py

1. Time from a desired-state change (REST PUT at the coordinator) to the new model
   serving on the device, for a ~5 MB model over loopback (download, sha256, ed25519,
   load, health check, atomic switch).
2. Longest predict latency during the swap, against the p99 of the same loop without
   a swap (a baseline window measured just before, in the same process).
"""

from __future__ import annotations

import json
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np

from cloud import Coordinator
from cloud._config import CloudConfig
from cloud.keys import generate_keys
from edgeml import Agent, AgentConfig
from edgeml._testing.broker import MosquittoBroker, free_port
from edgeml._testing.models import build_onnx_mlp

SHAPE = dict(n_in=256, n_hidden=4096, n_out=64)  # ~5.2 MB of float32 weights


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="edgeml-bench-upd-") as d:
        tmp = Path(d)
        v1 = build_onnx_mlp(tmp / "v1.onnx", **SHAPE, seed=1, version="1.0.0")
        v2 = build_onnx_mlp(tmp / "v2.onnx", **SHAPE, seed=2, version="2.0.0")
        broker = MosquittoBroker(tmp / "broker").start()
        generate_keys(tmp / "keys")
        cloud = Coordinator(CloudConfig(broker_url=broker.url, db=f"sqlite://{tmp}/cloud.db", http_addr="127.0.0.1:0",
                                        artifact_dir=tmp / "artifacts", signing_key=tmp / "keys" / "fleet.key")).start()
        try:
            deadline = time.monotonic() + 10
            while not cloud.desired.is_leader and time.monotonic() < deadline:
                time.sleep(0.05)
            http = httpx.Client(base_url=cloud.url, timeout=60)
            for path, version in ((v1, "1.0.0"), (v2, "2.0.0")):
                with path.open("rb") as fh:
                    http.post("/v1/models", data={"name": "big", "version": version},
                              files={"file": (path.name, fh)}).raise_for_status()
            agent = Agent(AgentConfig(
                device_id="dev-1", fleet="plant", data_dir=tmp / "agent", broker_url=broker.url, model_path=v1,
                api_addr=f"127.0.0.1:{free_port()}", fleet_pubkey=tmp / "keys" / "fleet.pub",
                discovery={"browse": False, "announce": False}, updates={"probation_s": 1.0},
            )).start()
            try:
                while not agent.status()["sync"]["connected"]:
                    time.sleep(0.01)
                result = _measure(agent, http)
            finally:
                agent.stop()
        finally:
            cloud.stop()
            broker.stop()
    print(json.dumps(result, indent=2))


def _measure(agent: Agent, http: httpx.Client) -> dict:
    x = {"input": np.random.default_rng(0).standard_normal((1, 256)).astype(np.float32)}
    samples: list[tuple[float, float, str]] = []  # (start, latency s, version)
    failures: list[tuple[float, str]] = []  # (start, error): the loop goes on, like an application
    stop = threading.Event()

    def app() -> None:
        while not stop.is_set():
            t0 = time.perf_counter()
            try:
                out = agent.predict(x)
            except Exception as exc:  # noqa: BLE001 - every failure is counted and reported
                failures.append((t0, f"{type(exc).__name__}: {exc}"))
                continue
            samples.append((t0, time.perf_counter() - t0, out.version))

    thread = threading.Thread(target=app)
    thread.start()
    time.sleep(2.0)  # baseline window: predictions only
    baseline_end = time.perf_counter()
    t_put = time.perf_counter()
    http.put("/v1/devices/plant/dev-1/desired", json={"model": "big@2.0.0"}).raise_for_status()
    while agent.model is None or agent.model.version != "2.0.0":
        time.sleep(0.001)
    t_serving = time.perf_counter()
    time.sleep(1.0)
    stop.set()
    thread.join()
    base = np.array([lat for t0, lat, _ in samples if t0 < baseline_end])
    during = [lat for t0, lat, _ in samples if t_put <= t0 <= t_serving + 0.5]
    first_v2 = next(t0 for t0, _, v in samples if v == "2.0.0")
    status = agent.status()
    return {
        "model_bytes": status["model"]["size"],
        "desired_to_serving_s": round(t_serving - t_put, 3),
        "first_prediction_by_new_model_after_put_s": round(first_v2 - t_put, 3),
        "baseline_predictions": len(base),
        "baseline_p50_ms": round(float(np.percentile(base, 50)) * 1e3, 3),
        "baseline_p99_ms": round(float(np.percentile(base, 99)) * 1e3, 3),
        "max_latency_during_swap_ms": round(max(during) * 1e3, 3),
        "stall_ratio_max_during_swap_vs_p99": round(max(during) / float(np.percentile(base, 99)), 2),
        "predictions": len(samples) + len(failures),
        "failed_predictions": len(failures),
        "failed_predictions_during_swap": sum(1 for t0, _ in failures if t_put <= t0 <= t_serving + 0.5),
        "failure_messages": sorted({error for _, error in failures})[:3],
    }


if __name__ == "__main__":
    main()
