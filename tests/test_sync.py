"""Store-and-forward over a real Mosquitto started by the tests."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import numpy as np
import orjson
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from edgeml import Agent, load_config
from edgeml.protocol import Status, TelemetryBatch, Topics

from .conftest import Broker, Collector, agent_env, free_port, wait_until

X = np.random.default_rng(1).standard_normal((1, 4)).astype(np.float32)


def _agent(tmp_path: Path, broker: Broker, model: Path, **extra: object) -> Agent:
    env = agent_env(
        EDGEML_DATA_DIR=tmp_path / "data", EDGEML_API_ADDR=f"127.0.0.1:{free_port()}", EDGEML_BROKER_URL=broker.url,
        EDGEML_MODEL_PATH=model, EDGEML_DEVICE_ID="dev-1", EDGEML_FLEET="plant",
        # the tests stop the broker: keep the reconnection backoff short so a slow
        # machine does not push the next attempt past the test's patience
        EDGEML_MQTT__RECONNECT_MAX_S=1, **extra,
    )
    return Agent(load_config(env=env))


def _unique_seqs(records: list[dict]) -> list[int]:
    seen: set[int] = set()
    out = []
    for r in records:
        if r["seq"] not in seen:
            seen.add(r["seq"])
            out.append(r["seq"])
    return out


def test_mosquitto_sub_receives_telemetry_as_documented(broker: Broker, models: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "sub.txt"
    with out.open("wb") as fh:
        sub = subprocess.Popen(
            ["mosquitto_sub", "-h", "127.0.0.1", "-p", str(broker.port), "-q", "1", "-v",
             "-t", "edgeml/v1/+/+/telemetry", "-t", "edgeml/v1/+/+/status"],
            stdout=fh,
        )
        # subscribed once a probe on a matching topic comes through (a fixed pause lost the first records
        # whenever mosquitto_sub started slowly)
        probe = "edgeml/v1/probe/probe/status"

        def probe_seen() -> bool:
            subprocess.run(["mosquitto_pub", "-h", "127.0.0.1", "-p", str(broker.port), "-t", probe, "-m", "{}"],
                           check=True, timeout=10)
            return probe.encode() in out.read_bytes()

        wait_until(probe_seen, 30, interval=0.2, what="mosquitto_sub subscribed")
        agent = _agent(tmp_path, broker, models["onnx_float"])
        with agent:
            for _ in range(100):
                agent.predict({"input": X})
            agent.flush_metrics()
            wait_until(lambda: agent.status()["buffer"]["records"] == 0 and agent.status()["buffer"]["pending"] == 0,
                       what="buffer to drain")
        wait_until(lambda: b'"reason":"shutdown"' in out.read_bytes().replace(b" ", b""), 30,
                   what="the offline status printed")
        sub.terminate()
        sub.wait(5)
    topics = Topics("plant", "dev-1")
    batches, statuses = [], []
    for line in out.read_bytes().splitlines():
        topic, _, payload = line.partition(b" ")
        if topic.decode() == probe:
            continue
        if topic.decode() == topics.telemetry:
            batches.append(TelemetryBatch.model_validate_json(payload))
        else:
            assert topic.decode() == topics.status
            statuses.append(Status.model_validate_json(payload))
    records = [r for b in batches for r in b.records]
    assert [r.seq for r in records] == list(range(1, len(records) + 1))  # in order, no gap, no duplicate
    kinds = [r.kind for r in records]
    assert kinds.count("prediction") == 100 and kinds.count("metrics") == 1
    events = [r.name for r in records if r.kind == "event"]  # type: ignore[union-attr]
    assert events[:2] == ["agent_started", "model_loaded"] and events[-1] == "agent_stopped"
    pred = next(r for r in records if r.kind == "prediction")
    assert (pred.model, pred.version, pred.summary.output) == ("mlp", "1.0.0", "probs")  # type: ignore[union-attr]
    assert all(b.fleet == "plant" and b.device == "dev-1" and b.stream == batches[0].stream for b in batches)
    assert [s.state for s in statuses][0] == "online" and statuses[-1].state == "offline"
    assert statuses[-1].reason == "shutdown"


def test_broker_outage_backlog_drains_in_order(broker: Broker, collector: Collector, models: dict[str, Path], tmp_path: Path) -> None:
    agent = _agent(tmp_path, broker, models["onnx_float"])
    with agent:
        for _ in range(200):
            agent.predict({"input": X})
        wait_until(lambda: agent.status()["buffer"]["records"] == 0, what="first drain")
        broker.stop()
        wait_until(lambda: not agent.status()["sync"]["connected"], what="agent to notice")
        for _ in range(5000):
            agent.predict({"input": X})
        wait_until(lambda: agent.status()["buffer"]["records"] >= 5000, what="records to be buffered")
        last = agent.status()["buffer"]["next_seq"] - 1
        broker.start()
        wait_until(lambda: agent.status()["buffer"]["records"] == 0, 30, what="backlog to drain")
        wait_until(lambda: max((r["seq"] for r in collector.records()), default=0) >= last, 30, what="collector")
    records = collector.records()
    seqs = _unique_seqs(records)
    assert seqs == list(range(1, len(seqs) + 1))  # nothing lost, first arrivals in order
    assert sum(1 for r in records if r["kind"] == "prediction") >= 5200
    assert len({r["seq"] for r in records if r["kind"] == "prediction"}) == 5200
    assert len(records) - len(seqs) <= 16 * 500  # duplicates only from the unacknowledged window


def test_garbage_on_agent_topics_is_counted_and_reported(broker: Broker, collector: Collector, models: dict[str, Path], tmp_path: Path) -> None:
    # unsigned documents allowed here: this is about malformed input, signatures are tested with updates
    agent = _agent(tmp_path, broker, models["onnx_float"], EDGEML_UPDATES__REQUIRE_SIGNATURE="false")
    with agent:
        wait_until(lambda: agent.status()["sync"]["connected"], what="connection")
        desired = Topics("plant", "dev-1").desired
        pub = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2)
        pub.connect("127.0.0.1", broker.port)
        pub.loop_start()
        garbage = [b"\xff\xfe not json", b'{"v": 1, "revision": "soon"}', b"[]", b"{" + b" " * 300_000 + b"}"]
        for payload in garbage:
            pub.publish(desired, payload, qos=1).wait_for_publish(5)
        ok = orjson.dumps({"v": 1, "revision": 3, "issued_at": time.time()})
        pub.publish(desired, ok, qos=1).wait_for_publish(5)
        pub.disconnect()
        pub.loop_stop()
        wait_until(lambda: agent.status()["applied_revision"] == 3, what="valid desired state")
        assert agent.status()["counters"]["bad_messages"] == len(garbage)
        assert agent.predict({"input": X}).model == "mlp"  # still serving
        wait_until(lambda: len([r for r in collector.records() if r.get("name") == "bad_message"]) == len(garbage),
                   what="bad_message events upstream")
    events = [r for r in collector.records() if r.get("name") == "bad_message"]
    assert all(e["data"]["topic"] == desired for e in events)
    assert any("exceeds" in e["message"] for e in events)


def test_full_buffer_drops_are_counted_and_reported_upstream(broker: Broker, collector: Collector, models: dict[str, Path], tmp_path: Path) -> None:
    agent = _agent(tmp_path, broker, models["onnx_float"], EDGEML_TELEMETRY__BUFFER_MAX_BYTES=128 * 1024)
    with agent:
        wait_until(lambda: agent.status()["sync"]["connected"], what="connection")
        broker.stop()
        wait_until(lambda: not agent.status()["sync"]["connected"], what="disconnect")
        for _ in range(5000):
            agent.predict({"input": X})
        wait_until(lambda: agent.status()["buffer"]["pending"] == 0, what="flush")
        status = agent.status()["buffer"]
        assert status["dropped"].get("prediction", 0) > 0 and status["bytes"] <= 128 * 1024
        agent.flush_metrics()
        broker.start()
        wait_until(lambda: any(r["kind"] == "metrics" for r in collector.records()), 30, what="metrics upstream")
        wait_until(lambda: any(r.get("name") == "telemetry_dropped" for r in collector.records()), 30, what="drop event")
    metrics = [r for r in collector.records() if r["kind"] == "metrics"][0]
    assert metrics["dropped_total"] == status["dropped_total"] > 0
    # every record that was not dropped arrived: the gap is exactly the dropped predictions
    seqs = set(_unique_seqs(collector.records()))
    missing = set(range(1, max(seqs) + 1)) - seqs
    assert len(missing) == status["dropped"]["prediction"]


def test_bandwidth_cap_limits_the_publish_rate(broker: Broker, collector: Collector, models: dict[str, Path], tmp_path: Path) -> None:
    rate = 32 * 1024
    agent = _agent(tmp_path, broker, models["onnx_float"], EDGEML_MQTT__BANDWIDTH_LIMIT_BPS=rate,
                   EDGEML_MQTT__BATCH_MAX_BYTES=8 * 1024)
    with agent:
        wait_until(lambda: agent.status()["sync"]["connected"], what="connection")
        t0 = time.monotonic()  # before the predictions: the publisher starts sending while they are made
        for _ in range(400):
            agent.predict({"input": X})
        wait_until(lambda: agent.status()["buffer"]["records"] == 0 and agent.status()["buffer"]["pending"] == 0,
                   60, what="drain under the cap")
        elapsed = time.monotonic() - t0
    sent = sum(len(p) for t, p in collector.messages if t.endswith("/telemetry"))
    assert sent > 2 * rate  # enough data for the cap to matter
    # the bucket starts full (one second's worth): the rest cannot go faster than the cap
    assert elapsed >= (sent - rate) / rate * 0.9
    assert len({r["seq"] for r in collector.records()}) >= 400


def test_feedback_reaches_the_broker_as_documented(broker: Broker, collector: Collector, models: dict[str, Path], tmp_path: Path) -> None:
    from edgeml.protocol import FeedbackRecord

    with _agent(tmp_path, broker, models["onnx_float"]) as agent:
        agent.feedback(2, predicted=1, inputs={"input": X})
        wait_until(lambda: any(r["kind"] == "feedback" for r in collector.records()), what="feedback upstream")
    record = FeedbackRecord.model_validate(next(r for r in collector.records() if r["kind"] == "feedback"))
    assert (record.label, record.predicted, record.correct, record.model) == (2, 1, False, "mlp")
    assert record.inputs is not None and np.allclose(record.inputs["input"], X)


def test_the_scheduler_sends_metrics_and_runs_housekeeping_unasked(broker: Broker, collector: Collector, models: dict[str, Path], tmp_path: Path) -> None:
    """The periodic jobs run on their own (apscheduler): nothing here calls flush_metrics()
    or _housekeeping(). The metrics record is the device's heartbeat."""
    agent = _agent(tmp_path, broker, models["onnx_float"], EDGEML_TELEMETRY__METRICS_INTERVAL_S=0.2,
                   EDGEML_TELEMETRY__HOUSEKEEPING_INTERVAL_S=0.2)
    runs: list[float] = []
    with agent:
        assert agent._buffer is not None
        housekeeping = agent._buffer.housekeeping
        agent._buffer.housekeeping = lambda: (runs.append(time.time()), housekeeping())  # type: ignore[method-assign]
        wait_until(lambda: len({r["seq"] for r in collector.records() if r["kind"] == "metrics"}) >= 2, 30,
                   what="two metrics records at the subscriber")
        wait_until(lambda: len(runs) >= 2, 30, what="two housekeeping runs")
    metrics = [r for r in collector.records() if r["kind"] == "metrics"]
    assert metrics[1]["uptime_s"] > metrics[0]["uptime_s"]  # two samples, not one delivered twice


def test_the_publisher_outlives_an_unexpected_error(broker: Broker, collector: Collector, models: dict[str, Path],
                                                    tmp_path: Path) -> None:
    agent = _agent(tmp_path, broker, models["onnx_float"])
    with agent:
        wait_until(lambda: agent.status()["sync"]["connected"], what="connected")
        buf = agent._buffer
        assert buf is not None
        real, failures = buf.read_batch, []

        def flaky(*args: object, **kw: object) -> object:
            if not failures:  # a bug surfacing once on the publisher thread
                failures.append(1)
                raise RuntimeError("boom")
            return real(*args, **kw)

        buf.read_batch = flaky  # type: ignore[method-assign]
        for _ in range(50):
            agent.predict({"input": X})
        wait_until(lambda: sum(r["kind"] == "prediction" for r in collector.records()) == 50, 30,
                   what="predictions published after the error")
    assert failures == [1]


def test_a_state_reported_while_the_connection_comes_up_reaches_the_broker(broker: Broker, collector: Collector,
                                                                           tmp_path: Path) -> None:
    """The update thread reports its state at start while paho's thread sets the connection
    up: it must not read 'not connected' after the connection read 'no state yet'."""
    import threading

    from edgeml.buffer import TelemetryBuffer
    from edgeml.sync import MqttSync

    config = load_config(env=agent_env(EDGEML_DATA_DIR=tmp_path / "data", EDGEML_BROKER_URL=broker.url,
                                       EDGEML_DEVICE_ID="dev-1", EDGEML_FLEET="plant"))
    with TelemetryBuffer(tmp_path / "t.db") as buf:
        sync = MqttSync(config, buf, agent_version="test")
        subscribe = sync._client.subscribe

        def subscribe_while_the_state_is_reported(*args: object, **kw: object) -> object:
            reporter = threading.Thread(target=sync.publish_state, args=(b'{"state":"idle"}',))
            reporter.start()  # in the window between the connection's steps
            reporter.join(0.5)
            return subscribe(*args, **kw)

        sync._client.subscribe = subscribe_while_the_state_is_reported  # type: ignore[method-assign]
        assert config.broker_url is not None
        sync.start(config.broker_url)
        try:
            wait_until(lambda: collector.payloads("state"), 10, what="the reported state")
        finally:
            sync.stop()
    assert collector.payloads("state")[-1] == {"state": "idle"}
