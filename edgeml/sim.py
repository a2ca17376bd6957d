"""Fleet simulator: many lightweight agents in one process, on a real broker.

``edgeml sim --devices 1000`` runs N simulated devices. Each has its own identity,
MQTT session (client id, persistent session, last will, retained status and reported
state) and telemetry stream (``seq`` from 1, records acknowledged by PUBACK before they
are dropped from its in-memory buffer). All devices share one model session per model
version and one thread: every socket is driven through paho's external-loop API from a
single ``selectors`` loop, which is what lets 1,000 devices fit in one process.

A simulated device follows its desired state like the real agent, but lightly: it
checks the document's signature when a fleet key is given, fetches the model (shared
by sha256, downloaded once), and switches; there is no on-disk state machine. Knobs:
prediction rate, injected extra latency (absolute or as a factor), error rate and
accuracy (per model version or for all), input drift (fixed, or rising per second),
and connection drops.

Data source: standard normal inputs (plus ``Faults.drift``), or, with ``sensor=`` (an
:class:`edgeml._testing.sensor.SensorStream`), readings of the synthetic sensor at the
current drift, whose true state is the label fed back. A fraction ``sample_rate`` of
the predictions is also sent as a ``sample`` record (inputs and outputs); samples and
feedback carry the prediction's ``prediction_id`` (the device's boot prefix and its
counter, like the agent), so the cloud joins labels to inputs.

Labels: each prediction gets a true label that equals the model's top1 with the
version's probability (``Faults.accuracy``, default 0.9), otherwise another class; a
``feedback`` record (what the agent's ``POST /v1/feedback`` produces) is sent for a
fraction ``feedback_rate`` of the predictions. A desired state naming a ``shadow``
model makes the device fetch it (shared), report it as ``shadow`` in its state (a
blue/green preload is observable) and run it beside the model on a fraction
``shadow_rate`` (default 0.1, the agent's default) of the predictions, like the agent's shadow mode: each metrics tick
sends a ``shadow`` record (top-1 agreement, primary and shadow latency; knob
``Faults.shadow_disagreement``). ``start(offline=[...])``
leaves devices unconnected until :meth:`Simulator.connect`.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import logging
import random
import selectors
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from . import __version__
from ._json import dumps, loads
from ._models import LoadedModel, ModelStore, model_suffix
from .buffer import summarize
from .protocol import Topics

log = logging.getLogger(__name__)


#: P(true label == the model's top1) when ``Faults.accuracy`` names neither the version nor "*".
DEFAULT_ACCURACY = 0.9


@dataclass
class Faults:
    """What the simulation injects. Per-version entries apply to devices serving that version."""

    extra_latency_us: dict[str, float] = field(default_factory=dict)  # version ("*" = all) -> µs
    error_rate: dict[str, float] = field(default_factory=dict)  # version ("*" = all) -> probability
    latency_factor: dict[str, float] = field(default_factory=dict)  # version ("*" = all) -> x latency
    # a device's own inference time (median of a lognormal, sigma 0.25). When set, it replaces the time measured
    # on this host: simulated devices share the host's cores with the coordinator and the tests, so the host's
    # time carries its load (a busy host is not a slower model), which made latency gates flaky.
    service_time_us: float = 0.0
    accuracy: dict[str, float] = field(default_factory=dict)  # version ("*" = all) -> P(label == top1)
    drift: float = 0.0  # added to every input value (with a sensor stream: the stream's drift)
    drift_per_s: float = 0.0  # the drift rises by this much per second after start()
    shadow_disagreement: dict[str, float] = field(default_factory=dict)  # shadow version -> P(top1 differs)
    disconnect_rate: float = 0.0  # per device and second

    def latency(self, version: str) -> float:
        return self.extra_latency_us.get(version, self.extra_latency_us.get("*", 0.0))

    def factor(self, version: str) -> float:
        return self.latency_factor.get(version, self.latency_factor.get("*", 1.0))

    def latency_of(self, version: str, measured_us: float, rng: np.random.Generator) -> float:
        """A device's reported latency: its service time (else the time measured here), scaled and delayed."""
        base = self.service_time_us * float(np.exp(0.25 * rng.standard_normal())) if self.service_time_us \
            else measured_us
        return base * self.factor(version) + self.latency(version)

    def accuracy_of(self, version: str) -> float:
        return self.accuracy.get(version, self.accuracy.get("*", DEFAULT_ACCURACY))

    def errors(self, version: str) -> float:
        return self.error_rate.get(version, self.error_rate.get("*", 0.0))


class _Models:
    """Model sessions shared by every simulated device, keyed by sha256."""

    def __init__(self, root: Path) -> None:
        self.store = ModelStore(root)
        self.by_sha: dict[str, LoadedModel] = {}
        self._lock = threading.Lock()

    def add_file(self, path: Path) -> LoadedModel:
        model = self.store.load(path)
        self.by_sha[model.info.sha256] = model
        return model

    def fetch(self, ref: dict[str, Any]) -> LoadedModel:
        sha = ref["sha256"]
        with self._lock:
            if sha not in self.by_sha:
                import httpx

                data = httpx.get(ref["url"], timeout=30).content
                if hashlib.sha256(data).hexdigest() != sha:
                    raise ValueError(f"artifact {ref['url']} does not match its sha256")
                path = self.store.root / f"{sha}{model_suffix(data[:8])}"
                path.write_bytes(data)
                self.by_sha[sha] = self.store.load(path, name=ref.get("name"), version=ref.get("version"))
            return self.by_sha[sha]


class SimDevice:
    """One simulated device. All methods run on the simulator's single loop thread."""

    def __init__(self, sim: Simulator, device_id: str, model: LoadedModel) -> None:
        self.sim = sim
        self.topics = Topics(sim.fleet, device_id)
        self.device_id = device_id
        self.model = model
        self.shadow: LoadedModel | None = None  # shadow mode or blue/green preload: run beside the model
        self.shadow_stats: list[tuple[float, float, bool]] = []  # (primary µs, shadow µs, top1 agreed)
        self.wanted = True  # should be connected (False: offline until Simulator.connect)
        self.stream = hashlib.sha256(f"{sim.run_id}:{device_id}".encode()).hexdigest()[:32]
        self.next_seq = 1
        self.pending: collections.deque[bytes] = collections.deque()  # encoded records not yet sent
        self.inflight: dict[int, int] = {}  # mid -> records in the message
        self.predictions = 0
        self.errors = 0
        self.acked = 0
        self.applied_revision = 0
        self.connected = False
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"edgeml-{sim.fleet}-{device_id}",
                                  clean_session=False)
        self.client.max_inflight_messages_set(64)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_publish = self._on_publish
        self.client.on_message = self._on_message
        self.client.will_set(self.topics.status, self._status("offline", "connection_lost"), qos=1, retain=True)

    def _status(self, state: str, reason: str) -> bytes:
        return dumps({"v": 1, "device": self.device_id, "state": state, "ts": time.time(), "reason": reason,
                      "agent_version": f"{__version__}-sim", "stream": self.stream})

    # paho callbacks (the loop thread)
    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if reason.is_failure:
            return
        self.connected = True
        client.publish(self.topics.status, self._status("online", "connected"), qos=1, retain=True)
        client.subscribe(self.topics.desired, qos=1)
        self._report_state()

    def _on_disconnect(self, *args: Any) -> None:
        self.connected = False

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason: Any, properties: Any) -> None:
        self.acked += self.inflight.pop(mid, 0)

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        try:
            doc = loads(message.payload)
            if self.sim.public_keys is not None:
                from .protocol.signing import verify_document

                verify_document(doc, self.sim.public_keys)
            if doc["revision"] <= self.applied_revision:
                return
            self.applied_revision = doc["revision"]
            model_ref, shadow_ref = doc.get("model"), doc.get("shadow")
            shadow = self.sim.models.fetch(shadow_ref) if shadow_ref else None
            if shadow is not self.shadow:
                self.shadow_stats.clear()
            self.shadow = shadow
            if model_ref and model_ref.get("sha256") != self.model.info.sha256:
                self.model = self.sim.models.fetch(model_ref)
                self.event("update_state", {"state": "idle", "result": "success", "revision": doc["revision"]})
            self._report_state()
        except Exception as exc:  # a bad document is reported, the device carries on
            self.event("update_rejected", {"reason": type(exc).__name__, "message": str(exc)[:200]})

    def _report_state(self) -> None:
        state = {"v": 1, "fleet": self.sim.fleet, "device": self.device_id, "ts": time.time(),
                 "applied_revision": self.applied_revision or None, "active": _slot(self.model), "previous": None,
                 "shadow": _slot(self.shadow) if self.shadow else None,
                 "update": {"state": "idle", "revision": self.applied_revision or None, "result": "success"},
                 "hardware_profile": "sim"}
        if self.connected:
            self.client.publish(self.topics.state, dumps(state), qos=1, retain=True)

    # workload
    def _record(self, fields: dict[str, Any]) -> None:
        self.pending.append(dumps({"seq": self.next_seq, "ts": time.time(), **fields}))
        self.next_seq += 1

    def event(self, name: str, data: dict[str, Any]) -> None:
        self._record({"kind": "event", "name": name, "level": "info", "message": "", "data": data})

    def predict(self, rng: np.random.Generator) -> None:
        model, faults, sensor = self.model, self.sim.faults, self.sim.sensor
        spec = model.runtime.inputs[0]
        shape = [d or 1 for d in spec.shape]
        truth: int | None = None
        if sensor is not None:  # a reading of the synthetic sensor and the machine's true state
            xs, ys = sensor.sample(1, drift=self.sim.drift_now(), rng=rng)
            x, truth = xs.reshape(shape).astype(spec.dtype), int(ys[0])
        else:
            x = rng.standard_normal(shape).astype(spec.dtype) + faults.drift
        t0 = time.perf_counter()
        outputs = model.runtime.run({spec.name: x})
        latency = faults.latency_of(model.version, (time.perf_counter() - t0) * 1e6, rng)
        self.predictions += 1
        if rng.random() < faults.errors(model.version):
            self.errors += 1
            return
        out = outputs[model.first_output]
        summary = summarize(model.first_output, out)
        self._record({"kind": "prediction", "model": model.name, "version": model.version,
                      "latency_us": round(latency, 2), "batch": 1, "summary": summary})
        prediction_id = None  # like the agent's: boot prefix + counter, made when a record needs it
        if self.sim.sample_rate and rng.random() < self.sim.sample_rate:
            prediction_id = f"{self.stream[:8]}-{self.predictions}"
            self._record({"kind": "sample", "model": model.name, "version": model.version,
                          "prediction_id": prediction_id, "inputs": {spec.name: x}, "outputs": outputs})
        top1 = summary.get("top1")
        if self.shadow is not None and self.sim.shadow_rate and rng.random() < self.sim.shadow_rate:
            self._shadow(rng, {spec.name: x}, latency, top1)
        if top1 is not None and rng.random() < self.sim.feedback_rate:
            self._feedback(rng, int(top1), int(np.asarray(out).shape[-1]), truth,
                           prediction_id or f"{self.stream[:8]}-{self.predictions}")

    def _shadow(self, rng: np.random.Generator, feeds: dict[str, np.ndarray], primary_us: float,
                top1: int | None) -> None:
        """Run the shadow on the same input, like the agent's shadow worker (outputs never served)."""
        shadow, faults = self.shadow, self.sim.faults
        assert shadow is not None
        t0 = time.perf_counter()
        out = shadow.runtime.run(feeds)[shadow.first_output]
        latency = faults.latency_of(shadow.version, (time.perf_counter() - t0) * 1e6, rng)
        agreed = top1 is not None and int(np.asarray(out).reshape(-1).argmax()) == top1
        if agreed and rng.random() < faults.shadow_disagreement.get(shadow.version, 0.0):
            agreed = False
        self.shadow_stats.append((primary_us, latency, agreed))

    def _feedback(self, rng: np.random.Generator, top1: int, classes: int, truth: int | None = None,
                  prediction_id: str | None = None) -> None:
        """The application's label: the sensor's ground truth, or else right with the version's
        accuracy and another class otherwise."""
        model = self.model
        label = top1 if truth is None else truth
        if truth is None and classes > 1 and rng.random() >= self.sim.faults.accuracy_of(model.version):
            label = (top1 + 1 + int(rng.integers(classes - 1))) % classes
        self._record({"kind": "feedback", "model": model.name, "version": model.version, "label": label,
                      "predicted": top1, "correct": label == top1, "prediction_id": prediction_id})

    def metrics(self) -> None:
        if self.shadow is not None and self.shadow_stats:
            primary, shadow, agreed = (np.asarray(v, dtype=float) for v in zip(*self.shadow_stats, strict=True))
            self.shadow_stats.clear()

            def lat(values: np.ndarray) -> dict[str, float]:
                return {"mean": round(float(values.mean()), 3), "p95": round(float(np.percentile(values, 95)), 3)}

            self._record({"kind": "shadow", "model": self.model.name, "version": self.model.version,
                          "shadow_model": self.shadow.name, "shadow_version": self.shadow.version,
                          "compared": int(agreed.size), "top1_agreement": round(float(agreed.mean()), 6),
                          "mean_abs_diff": None, "latency_us_primary": lat(primary),
                          "latency_us_shadow": lat(shadow), "errors": 0, "skipped": 0})
        self._record({"kind": "metrics", "cpu_percent": 0.0, "rss_bytes": 0, "uptime_s": 0.0,
                      "predictions_total": self.predictions, "prediction_errors_total": self.errors,
                      "buffer_records": len(self.pending), "buffer_bytes": 0, "dropped_total": 0, "dropped": {}})

    def flush(self) -> None:
        """Publish what is pending in one batch (QoS 1); it leaves memory on PUBACK."""
        if not self.pending or not self.connected or len(self.inflight) >= 32:
            return
        bodies = [self.pending.popleft() for _ in range(min(len(self.pending), 500))]
        payload = b"".join((b'{"v":1,"fleet":', dumps(self.sim.fleet), b',"device":', dumps(self.device_id),
                            b',"stream":', dumps(self.stream), b',"sent_at":', repr(time.time()).encode(),
                            b',"records":[', b",".join(bodies), b"]}"))
        info = self.client.publish(self.topics.telemetry, payload, qos=1)
        self.inflight[info.mid] = len(bodies)


class Simulator:
    """N simulated devices on one loop thread. ``start()``, then ``stop()``."""

    def __init__(self, broker_url: str, model_path: Path, *, devices: int, fleet: str = "sim",
                 rate: float = 1.0, workdir: Path, faults: Faults | None = None,
                 public_keys: Any = None, tags: Callable[[int], dict[str, str]] | None = None,
                 seed: int = 0, feedback_rate: float = 0.1,
                 sensor: Any = None, sample_rate: float = 0.0, shadow_rate: float = 0.1) -> None:
        from ._config import parse_broker_url

        self.broker = parse_broker_url(broker_url)
        self.fleet = fleet
        self.rate = rate
        self.faults = faults or Faults()
        self.feedback_rate = feedback_rate  # fraction of predictions whose label is fed back
        self.sensor = sensor  # an edgeml._testing.sensor.SensorStream: inputs and true labels from it
        self.sample_rate = sample_rate  # fraction of predictions also sent as sample records (inputs + outputs)
        self.shadow_rate = shadow_rate  # fraction of predictions also run through a shadow model
        self.public_keys = public_keys
        self.run_id = f"{seed}"
        self.models = _Models(workdir / "models")
        base = self.models.add_file(Path(model_path))
        self.devices = [SimDevice(self, f"sim-{i:05d}", base) for i in range(devices)]
        self._sel = selectors.DefaultSelector()
        self._rng = np.random.default_rng(seed)
        self._random = random.Random(seed)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._to_connect: collections.deque[SimDevice] = collections.deque()  # handed to the loop thread
        self.started_at = 0.0
        for device in self.devices:
            self._wire(device.client, device)

    def _wire(self, client: mqtt.Client, device: SimDevice) -> None:
        sel = self._sel

        def opened(c: mqtt.Client, userdata: Any, sock: Any) -> None:
            sel.register(sock, selectors.EVENT_READ, device)

        def closed(c: mqtt.Client, userdata: Any, sock: Any) -> None:
            with contextlib.suppress(KeyError, ValueError):
                sel.unregister(sock)

        def want_write(c: mqtt.Client, userdata: Any, sock: Any) -> None:
            with contextlib.suppress(KeyError, ValueError):
                sel.modify(sock, selectors.EVENT_READ | selectors.EVENT_WRITE, device)

        def no_write(c: mqtt.Client, userdata: Any, sock: Any) -> None:
            with contextlib.suppress(KeyError, ValueError):
                sel.modify(sock, selectors.EVENT_READ, device)

        client.on_socket_open = opened
        client.on_socket_close = closed
        client.on_socket_register_write = want_write
        client.on_socket_unregister_write = no_write

    def start(self, offline: Iterable[str] = ()) -> Simulator:
        """Connect every device but those in ``offline`` (they wait for :meth:`connect`)."""
        later = set(offline)
        for device in self.devices:
            device.event("agent_started", {"simulated": True})
            if device.device_id in later:
                device.wanted = False
            else:
                device.client.connect(self.broker.host, self.broker.port, keepalive=60)
        self.started_at = time.monotonic()
        self._thread = threading.Thread(target=self._loop, name="edgeml-sim", daemon=True)
        self._thread.start()
        return self

    def connect(self, device_ids: Iterable[str]) -> None:
        """Bring devices left offline by ``start(offline=...)`` online (on the loop thread)."""
        wanted = set(device_ids)
        self._to_connect.extend(d for d in self.devices if d.device_id in wanted and not d.wanted)

    def _connect_waiting(self) -> None:  # the loop thread
        while self._to_connect:
            device = self._to_connect.popleft()
            device.wanted = True
            with contextlib.suppress(OSError):
                device.client.connect(self.broker.host, self.broker.port, keepalive=60)

    def _loop(self) -> None:
        tick, last_tick, last_misc, last_metrics = 0.1, 0.0, 0.0, time.monotonic()
        owed = 0.0
        while not self._stop.is_set():
            self._connect_waiting()
            for key, mask in self._sel.select(timeout=0.02):
                client = key.data.client
                if mask & selectors.EVENT_READ:
                    client.loop_read()
                if mask & selectors.EVENT_WRITE:
                    client.loop_write()
            now = time.monotonic()
            if now - last_misc >= 1.0:
                last_misc = now
                for device in self.devices:
                    if not device.wanted:
                        continue
                    device.client.loop_misc()  # keepalive, and reconnection after a drop
                    if not device.connected and device.client.socket() is None:
                        with contextlib.suppress(OSError):
                            device.client.reconnect()
                    elif self.faults.disconnect_rate and self._random.random() < self.faults.disconnect_rate:
                        device.client.disconnect()
            if now - last_tick >= tick:
                owed += self.rate * (now - last_tick if last_tick else tick)
                last_tick = now
                whole = int(owed)
                owed -= whole
                for device in self.devices:
                    if device.wanted:  # an offline device is switched off: it neither serves nor sends
                        for _ in range(whole):
                            device.predict(self._rng)
                    device.flush()
            if now - last_metrics >= 10.0:
                last_metrics = now
                for device in self.devices:
                    device.metrics()

    def drift_now(self) -> float:
        """The input drift at this moment: ``Faults.drift``, rising by ``drift_per_s`` after start."""
        faults = self.faults
        if not faults.drift_per_s or not self.started_at:
            return faults.drift
        return faults.drift + faults.drift_per_s * (time.monotonic() - self.started_at)

    def stats(self) -> dict[str, Any]:
        devices = self.devices
        return {
            "devices": len(devices),
            "connected": sum(d.connected for d in devices),
            "predictions": sum(d.predictions for d in devices),
            "records": sum(d.next_seq - 1 for d in devices),
            "acked": sum(d.acked for d in devices),
            "pending": sum(len(d.pending) for d in devices),
            "versions": dict(collections.Counter(d.model.version for d in devices)),
            "shadows": dict(collections.Counter(d.shadow.version for d in devices if d.shadow is not None)),
        }

    def drain(self, timeout: float = 30.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            s = self.stats()
            if s["pending"] == 0 and s["acked"] == s["records"]:
                return True
            time.sleep(0.05)
        return False

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        for device in self.devices:
            if device.connected:
                device.client.publish(device.topics.status, device._status("offline", "shutdown"), qos=1, retain=True)
                device.client.loop_write()
            device.client.disconnect()
            device.client.loop_write()


def _slot(model: LoadedModel) -> dict[str, Any]:
    info = model.info
    return {"name": info.name, "version": info.version, "sha256": info.sha256, "size": info.size,
            "engine": info.engine}


def run_sim(devices: int, broker: str | None, model: str | None, rate: float, duration: float, fleet: str) -> int:
    """The ``edgeml sim`` command."""
    import os
    import resource
    import tempfile

    from ._process import CpuMeter, rss_bytes
    from ._testing.broker import MosquittoBroker

    with tempfile.TemporaryDirectory(prefix="edgeml-sim-") as tmp:
        root = Path(tmp)
        own = None
        if broker is None:
            own = MosquittoBroker(root / "broker").start()
            broker = own.url
        if model is None:
            from ._testing.models import build_onnx_mlp

            model = str(build_onnx_mlp(root / "model.onnx", name="sim-model"))
        cpu_meter = CpuMeter()
        sim = Simulator(broker, Path(model), devices=devices, fleet=fleet, rate=rate, workdir=root)
        t0 = time.monotonic()
        sim.start()
        print(f"simulating {devices} devices on {broker} (fleet {fleet}, {rate:g} predictions/s each)", flush=True)
        try:
            while time.monotonic() - t0 < duration:
                time.sleep(min(10.0, max(0.1, duration - (time.monotonic() - t0))))
                s = sim.stats()
                print(f"{time.monotonic() - t0:6.0f}s  connected {s['connected']}/{s['devices']}  "
                      f"records {s['records']}  acked {s['acked']}  pending {s['pending']}", flush=True)
        except KeyboardInterrupt:
            pass
        drained = sim.drain()
        s = sim.stats()
        elapsed = time.monotonic() - t0
        cpu = cpu_meter.percent()
        rss = rss_bytes()
        sim.stop()
        if own is not None:
            own.stop()
        report = {
            **s, "seconds": round(elapsed, 1), "drained": drained,
            "records_per_s": round(s["acked"] / elapsed),
            "cpu_percent_of_one_core": round(cpu, 1),
            "rss_mb": round(rss / 2**20, 1),
            "rss_kb_per_device": round(rss / 1024 / max(1, devices), 1),
            "max_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "pid": os.getpid(),
        }
        print(dumps(report).decode())
        return 0 if drained and s["connected"] == devices else 1
