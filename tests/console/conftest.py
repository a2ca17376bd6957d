"""A fleet to look at: real Mosquitto, a real coordinator on SQLite with a fleet key, three
registered ONNX releases, simulated devices sending telemetry, a rollout rolled back by its
gates and one in progress; and headless Debian Chromium driven by playwright.

One site per module (building it takes ~20 s); each test opens its own page.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from cloud._config import CloudConfig
from cloud.coordinator import Coordinator
from cloud.keys import generate_keys
from edgeml._testing import models as modelgen
from edgeml.protocol.signing import load_public_keys
from edgeml.sim import Faults, Simulator

from .._stores import cloud_db
from ..conftest import REPO, Broker, wait_until

CHROMIUM = Path("/usr/bin/chromium")
FLEET = "sim"
N = 12
OFFLINE = ["sim-00011"]
#: name, version, parent, registry metrics; 2.0.0 is the bad retrain (other weights, worse labels).
RELEASES = [("1.0.0", None, {"accuracy": 0.91, "f1": 0.89}, 0),
            ("1.1.0", "mlp@1.0.0", {"accuracy": 0.93, "f1": 0.92}, 0),
            ("2.0.0", "mlp@1.1.0", {"accuracy": 0.78, "f1": 0.74}, 7)]
GATES = [{"metric": "accuracy", "threshold": 0.02, "min_samples": 30}, {"metric": "latency_p95", "threshold": 0.25},
         {"metric": "psi", "threshold": 0.2}, {"metric": "health", "threshold": 0}]


def _training_reference(path: Path) -> dict[str, Any]:
    """The drift reference a training run keeps with its model (when the coordinator measures drift):
    input bins and predicted classes on standard-normal rows, like the simulator's inputs."""
    try:
        from cloud.drift import build_reference
    except ImportError:
        return {}
    import numpy as np
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    spec = session.get_inputs()[0]
    x = np.random.default_rng(1).standard_normal((2000, int(spec.shape[-1]))).astype(np.float32)
    top1 = np.argmax(session.run(None, {spec.name: x})[0], axis=-1)
    return {"drift_reference": build_reference(x, top1, input_name=spec.name)}


class Site:
    """Everything the console shows, built for real."""

    def __init__(self, tmp: Path, broker: Broker) -> None:
        keys = tmp / "keys"
        generate_keys(keys)
        config = CloudConfig(broker_url=broker.url, db=cloud_db(tmp), http_addr="127.0.0.1:0",
                             artifact_dir=tmp / "artifacts", signing_key=keys / "fleet.key")
        self.coordinator = Coordinator(config).start()
        self.url = self.coordinator.url
        self.http = httpx.Client(base_url=self.url, timeout=30)
        self.sim: Simulator | None = None
        wait_until(lambda: self.coordinator.desired.is_leader, 10, what="leadership")
        paths = {}
        for version, parent, metrics, seed in RELEASES:
            paths[version] = modelgen.build_onnx_mlp(tmp / f"mlp-{version}.onnx", seed=seed, version=version)
            data = {"name": "mlp", "version": version, "metrics": json.dumps(metrics), "parent": parent or "",
                    "params": json.dumps(_training_reference(paths[version]))}
            with paths[version].open("rb") as fh:
                r = self.http.post("/v1/models", data=data, files={"file": (paths[version].name, fh)})
            assert r.status_code == 201, r.text
        int8 = modelgen.build_onnx_mlp_int8(tmp / "mlp-1.1.0-int8.onnx", version="1.1.0-int8")
        with int8.open("rb") as fh:  # a branch of the lineage: the quantized sibling of 1.1.0
            r = self.http.post("/v1/models", data={"name": "mlp", "version": "1.1.0-int8", "parent": "mlp@1.1.0",
                                                   "metrics": json.dumps({"accuracy": 0.925})},
                               files={"file": (int8.name, fh)})
        assert r.status_code == 201, r.text
        assert self.http.put("/v1/models/mlp/aliases/champion", json={"version": "1.0.0"}).status_code == 200
        for i in range(N):
            r = self.http.put(f"/v1/devices/{FLEET}/sim-{i:05d}", json={"tags": {"env": "sim"}, "hardware_profile": "sim"})
            assert r.status_code == 201, r.text
        faults = Faults(accuracy={"*": 0.92, "2.0.0": 0.55}, latency_factor={"2.0.0": 1.6}, service_time_us=2000.0)
        self.sim = Simulator(broker.url, paths["1.0.0"], devices=N, fleet=FLEET, rate=8.0, workdir=tmp / "sim",
                             faults=faults, public_keys=load_public_keys(keys / "fleet.pub"), feedback_rate=0.5)
        self.sim.start(offline=OFFLINE)
        wait_until(lambda: self.sim.stats()["connected"] == N - len(OFFLINE), 30, what="connections")
        wait_until(lambda: len(self.reported()) == N - len(OFFLINE), 30, what="reported states")

        # the bad release: rolled back by its gates, with evidence
        self.failed = self.rollout("mlp@2.0.0", [50, 100], {"min_dwell_s": 2, "min_samples": 60, "gates": GATES})
        done = self.wait_state(self.failed, "rolled_back", "completed", "paused", timeout=60)
        assert done["state"] == "rolled_back", done["reason"]
        wait_until(lambda: self.sim.stats()["versions"] == {"1.0.0": N}, 30, what="the canary back on 1.0.0")
        # the good one, in progress: its first step is deployed and dwells for an hour
        self.running = self.rollout("mlp@1.1.0", [50, 100], {"min_dwell_s": 3600, "gates": GATES})
        self.wait_state(self.running, "running", timeout=30)
        wait_until(lambda: self.sim.stats()["versions"].get("1.1.0", 0) > 0, 30, what="the canary on 1.1.0")
        wait_until(lambda: any(s["active"]["version"] == "1.1.0" for s in self.reported().values()), 30,
                   what="a canary's reported state")

    def reported(self) -> dict[str, dict[str, Any]]:
        return {d["device_id"]: d["reported_state"] for d in self.http.get("/v1/devices", params={"fleet": FLEET}).json()
                if d["reported_state"]}

    def rollout(self, model: str, steps: list[float], policy: dict[str, Any]) -> str:
        r = self.http.post("/v1/rollouts", json={"model": model, "strategy": "canary", "target": "env=sim",
                                                 "steps": steps, "policy": policy, "fleet": FLEET, "actor": "ana",
                                                 "reason": f"release {model}"})
        assert r.status_code == 201, r.text
        return str(r.json()["id"])

    def wait_state(self, rid: str, *states: str, timeout: float = 30) -> dict[str, Any]:
        def done() -> dict[str, Any] | None:
            doc = self.http.get(f"/v1/rollouts/{rid}").json()
            return doc if doc["state"] in states else None
        return wait_until(done, timeout, interval=0.2, what=f"rollout {rid} {states}")  # type: ignore[no-any-return]

    def close(self) -> None:
        if self.sim is not None:
            self.sim.stop()
        self.http.close()
        self.coordinator.stop()


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    tmp = tmp_path_factory.mktemp("console")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EDGEML_ROLLOUTS_TICK_S", "0.3")
        broker = Broker(tmp / "broker")
        try:
            s = Site(tmp / "cloud", broker)
        except BaseException:
            broker.stop()
            raise
    try:
        yield s
    finally:
        s.close()
        broker.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not CHROMIUM.exists():
        pytest.skip("Debian chromium is not installed (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=["--no-sandbox"])
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1440, "height": 900})
    p = context.new_page()
    p.set_default_timeout(15_000)
    errors: list[str] = []
    p.on("pageerror", lambda exc: errors.append(str(exc)))
    yield p
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


@pytest.fixture
def shots(tmp_path: Path) -> Path:
    """Where screenshots go: pytest's tmp dir, or ``EDGEML_SCREENSHOTS`` (e.g. docs/img)."""
    target = os.environ.get("EDGEML_SCREENSHOTS")
    out = (REPO / target) if target else tmp_path / "screenshots"
    out.mkdir(parents=True, exist_ok=True)
    return out
