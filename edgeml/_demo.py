"""``edgeml demo``: one device agent, a model, a broker and an outage, end to end.

It starts Mosquitto on a free port (or uses ``--broker``), builds a small real ONNX
model, runs an agent with its local API, plays an application that calls the API,
stops the broker mid-way, restarts it, and checks that every telemetry record reached
the subscriber exactly as docs/protocol.md says.
"""

from __future__ import annotations

import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from ._config import AgentConfig, parse_broker_url
from ._testing.broker import MosquittoBroker, free_port


class _Subscriber:
    """The consumer side of the protocol: dedup on (device, stream, seq)."""

    def __init__(self, host: str, port: int) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        self.records: dict[int, dict[str, Any]] = {}
        self.duplicates = 0
        self.ready = threading.Event()
        self.client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id="edgeml-demo-consumer",
                                  clean_session=False)
        self.client.on_connect = lambda c, *a: c.subscribe("edgeml/v1/+/+/telemetry", qos=1)
        self.client.on_subscribe = lambda *a: self.ready.set()
        self.client.on_message = self._on_message
        self.client.reconnect_delay_set(0.1, 1)
        self.client.connect(host, port)
        self.client.loop_start()
        self.ready.wait(10)

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        for record in orjson.loads(msg.payload)["records"]:
            if record["seq"] in self.records:
                self.duplicates += 1
            else:
                self.records[record["seq"]] = record

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def run_demo(predictions: int = 2000, broker: str | None = None, headless: bool = False) -> int:
    from ._testing.models import build_onnx_mlp
    from .agent import Agent
    from .client import AgentClient

    ui = _UI(headless)
    with tempfile.TemporaryDirectory(prefix="edgeml-demo-") as tmp:
        root = Path(tmp)
        own_broker = None
        if broker is None:
            own_broker = MosquittoBroker(root / "broker")
            own_broker.start()
            url = parse_broker_url(f"mqtt://127.0.0.1:{own_broker.port}")
            ui.say(f"broker     Mosquitto on {url}")
        else:
            url = parse_broker_url(broker)
            ui.say(f"broker     {url}")
        model = build_onnx_mlp(root / "classifier.onnx", n_in=8, n_hidden=32, n_out=4, name="classifier", version="1.0.0")
        subscriber = _Subscriber(url.host, url.port)
        api_port = free_port()
        config = AgentConfig(
            device_id="demo-device", fleet="demo", data_dir=root / "agent", broker_url=url, model_path=model,
            api_addr=f"127.0.0.1:{api_port}", discovery={"browse": False, "announce": False},
            telemetry={"metrics_interval_s": 1.0, "sample_rate": 0.01},
            mqtt={"reconnect_max_s": 2.0},
        )
        agent = Agent(config).start()
        ui.say(f"agent      demo/demo-device, local API http://127.0.0.1:{api_port}, model classifier 1.0.0 (ONNX)")
        rng = np.random.default_rng(0)
        latencies: list[float] = []
        try:
            with AgentClient(f"http://127.0.0.1:{api_port}") as app:
                third = predictions // 3
                ui.run("predicting (broker up)", third, lambda: latencies.append(_call(app, rng)))
                if own_broker is not None:
                    own_broker.stop()
                    ui.say("outage     broker stopped: the agent keeps serving and buffers telemetry")
                ui.run("predicting (broker down)", third, lambda: latencies.append(_call(app, rng)))
                ui.say(f"buffer     {agent.status()['buffer']['records']} records waiting on disk")
                if own_broker is not None:
                    own_broker.start()
                    ui.say("recovery   broker back: the backlog drains, oldest first")
                ui.run("predicting (broker up)", predictions - 2 * third, lambda: latencies.append(_call(app, rng)))
            agent.flush_metrics()
            _wait(lambda: agent.status()["buffer"]["records"] == 0 and agent.status()["buffer"]["pending"] == 0, 30)
            last = agent.status()["buffer"]["next_seq"] - 1
            _wait(lambda: len(subscriber.records) >= last, 30)
        finally:
            agent.stop()
            time.sleep(0.3)
            subscriber.close()
            if own_broker is not None:
                own_broker.stop()
        seqs = sorted(subscriber.records)
        kinds = [r["kind"] for r in subscriber.records.values()]
        checks = {
            "every prediction answered": len(latencies) == predictions,
            "every prediction record arrived": kinds.count("prediction") == predictions,
            "no gap in seq": seqs == list(range(1, len(seqs) + 1)),
            "metrics and events arrived": "metrics" in kinds and "event" in kinds,
        }
        lat = np.array(latencies)
        ui.table(
            {
                "predictions": predictions,
                "records received (unique)": len(seqs),
                "duplicates dropped by consumer": subscriber.duplicates,
                "API latency p50 / p99 (ms)": f"{np.percentile(lat, 50):.2f} / {np.percentile(lat, 99):.2f}",
                **{k: "yes" if v else "NO" for k, v in checks.items()},
            }
        )
        ok = all(checks.values())
        ui.say("demo passed" if ok else "demo FAILED")
        return 0 if ok else 1


def _call(app: Any, rng: np.random.Generator) -> float:
    t0 = time.perf_counter()
    app.predict({"input": rng.standard_normal((1, 8)).astype(np.float32).tolist()})
    return (time.perf_counter() - t0) * 1000


def _wait(predicate: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.05)


class _UI:
    """rich progress and tables when available and wanted; plain lines otherwise."""

    def __init__(self, headless: bool) -> None:
        self.console: Any = None
        if not headless:
            try:
                from rich.console import Console

                self.console = Console()
            except ImportError:
                pass

    def say(self, text: str) -> None:
        if self.console:
            self.console.print(text)
        else:
            print(text, flush=True)

    def run(self, label: str, n: int, step: Any) -> None:
        if self.console:
            from rich.progress import Progress

            with Progress(console=self.console) as progress:
                task = progress.add_task(label, total=n)
                for _ in range(n):
                    step()
                    progress.advance(task)
        else:
            for _ in range(n):
                step()
            print(f"{label}: {n} done", flush=True)

    def table(self, rows: dict[str, Any]) -> None:
        if self.console:
            from rich.table import Table

            table = Table(title="edgeml demo")
            table.add_column("check")
            table.add_column("result")
            for k, v in rows.items():
                table.add_row(k, str(v))
            self.console.print(table)
        else:
            for k, v in rows.items():
                print(f"{k:34} {v}")
