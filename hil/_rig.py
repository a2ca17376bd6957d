"""The bench: a private broker, a fault proxy, a real coordinator and the device under test.

    rig = Rig(scenario, workdir, LocalTarget()).start()   # broker, proxy, coordinator, agent
    rig.deploy(spec)            # register (signed) and PUT the desired state
    rig.proxy.set_fault("blackhole"); ...; rig.proxy.clear()
    rig.close()

The agent dials the broker through :class:`~hil._proxy.FaultProxy`; the coordinator
dials it directly, so network faults sit between the device and the broker only. The
coordinator is ``cloud.coordinator.Coordinator`` on SQLite with a fleet signing key made
for the run; models go through its REST API (``POST /v1/models``) and reach the device as
signed desired states (``PUT /v1/devices/hil/dut-1/desired``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import httpx

from edgeml._testing.broker import MosquittoBroker, free_port

from ._data import RecordedSet, build_model, load_set
from ._exceptions import RigError
from ._proxy import FaultProxy
from ._scenario import ModelSpec, Scenario
from ._targets import Target

log = logging.getLogger(__name__)
FLEET, DEVICE = "hil", "dut-1"
T = TypeVar("T")

#: Agent settings of every run (environment form); a scenario's ``agent:`` adds to them.
BASE_AGENT_ENV = {
    "EDGEML_DISCOVERY__BROWSE": "false",
    "EDGEML_DISCOVERY__ANNOUNCE": "false",
    "EDGEML_RUNTIME__WARMUP_RUNS": "1",
    "EDGEML_MQTT__KEEPALIVE_S": "5",
    "EDGEML_MQTT__RECONNECT_MIN_S": "0.2",
    "EDGEML_MQTT__RECONNECT_MAX_S": "1",
    "EDGEML_UPDATES__PROBATION_S": "0.5",
    # a 0.5 s probation judges the p95 of a handful of calls, which one scheduling hiccup on a
    # shared machine decides: latency budgets are the replay steps' business in the rig
    "EDGEML_UPDATES__PROBATION_LATENCY_BUDGET_MS": "500",
    "EDGEML_UPDATES__PROBATION_MIN_PREDICTIONS": "0",
    "EDGEML_UPDATES__RETRY_BACKOFF_S": "0.05",
    "EDGEML_UPDATES__DOWNLOAD_RETRIES": "2",
    "EDGEML_UPDATES__MIN_FREE_BYTES": "1048576",
    "EDGEML_TELEMETRY__METRICS_INTERVAL_S": "2",
}
DISK_BYTES = 24 * 1024 * 1024  # the data directory's filesystem, when the scenario fills it


def crash_env(at: str) -> dict[str, str]:
    """Settings that cut the agent's power (SIGKILL) when its update enters state ``at``."""
    env = {"EDGEML_UPDATE_CRASH_AT": at}
    if at == "rolling_back":  # reach rolling_back: a probation latency budget no model meets
        env.update(EDGEML_UPDATES__PROBATION_LATENCY_BUDGET_MS="0.000001", EDGEML_UPDATES__PROBATION_MIN_PREDICTIONS="5")
    return env


def wait_for(predicate: Callable[[], T], timeout: float, interval: float = 0.05) -> T | None:
    """Poll until ``predicate`` returns something truthy; None after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(httpx.HTTPError):
            value = predicate()
            if value:
                return value
        if time.monotonic() >= deadline:
            return None
        time.sleep(interval)


class Rig:
    def __init__(self, scenario: Scenario, workdir: Path, target: Target) -> None:
        self.scenario = scenario
        self.workdir = workdir
        self.target = target
        self.recorded: RecordedSet = load_set(scenario.dataset_path())
        self.broker: MosquittoBroker | None = None
        self.proxy: FaultProxy | None = None
        self.coordinator: Any = None
        self.http: httpx.Client | None = None
        self.api_port = free_port()
        self.data_dir = workdir / "agent-data"
        self.mounted = False
        self.mount_note: str | None = None
        self.registered: dict[str, dict[str, Any]] = {}  # ref -> model JSON
        self.expected: ModelSpec = scenario.model
        self.wrapper: list[str] = []
        self.extra_env: dict[str, str] = {}
        self.model_files: dict[str, Path] = {}
        self.armed: str | None = None  # the update crash point the running agent was started with

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> Rig:
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def _start(self) -> None:
        from cloud._config import CloudConfig
        from cloud.coordinator import Coordinator
        from cloud.keys import generate_keys

        self.workdir.mkdir(parents=True, exist_ok=True)
        self.broker = MosquittoBroker(self.workdir / "broker").start()
        self.proxy = FaultProxy(("127.0.0.1", self.broker.port)).start()
        self.keys = self.workdir / "keys"
        generate_keys(self.keys, force=True)
        config = CloudConfig(broker_url=self.broker.url, db=f"sqlite://{self.workdir}/cloud.db", http_addr="127.0.0.1:0",
                             artifact_dir=self.workdir / "artifacts", signing_key=self.keys / "fleet.key")
        self.coordinator = Coordinator(config).start()
        if wait_for(lambda: self.coordinator.desired.is_leader, 15) is None:
            raise RigError("the coordinator did not become the desired-state leader")
        self.http = httpx.Client(base_url=self.coordinator.url, timeout=30)
        local = getattr(self.target, "supports_local_faults", True)
        if local and any(s.fault and s.fault.kind == "full_disk" for s in self.scenario.steps):
            self._mount_data_dir()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        set_tunnels = getattr(self.target, "set_tunnels", None)
        if set_tunnels is not None:  # a remote device reaches the broker and coordinator through ssh
            set_tunnels([self.proxy.port, self.coordinator.address[1]], [self.api_port])
        self.target.prepare(self.workdir)
        self.start_agent(**self._boot_env())
        self.deploy(self.scenario.model)
        if not self.wait_model(self.scenario.model, self.scenario.budgets.recover_s + 10):
            raise RigError(f"the agent did not come up on {self.scenario.model.ref}: {self.agent_status_brief()}")

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.target.close()
        if self.http is not None:
            self.http.close()
        if self.coordinator is not None:
            with contextlib.suppress(Exception):
                self.coordinator.stop()
        if self.proxy is not None:
            self.proxy.stop()
        if self.broker is not None:
            self.broker.stop()
        if self.mounted:
            subprocess.run(["umount", "-l", str(self.data_dir)], check=False, capture_output=True)
            self.mounted = False

    # ------------------------------------------------------------------ the agent
    def agent_env(self) -> dict[str, str]:
        assert self.proxy is not None
        env = {
            **BASE_AGENT_ENV,
            "EDGEML_DEVICE_ID": DEVICE, "EDGEML_FLEET": FLEET, "EDGEML_DATA_DIR": str(self.data_dir),
            "EDGEML_BROKER_URL": f"mqtt://127.0.0.1:{self.proxy.port}", "EDGEML_API_ADDR": f"127.0.0.1:{self.api_port}",
            "EDGEML_FLEET_PUBKEY": str(self.keys / "fleet.pub"),
            "EDGEML_HARDWARE_PROFILE": self.scenario.hardware_profile,
        }
        env.update({k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in self.scenario.agent.items()})
        env.update(self.extra_env)
        return env

    def _boot_env(self) -> dict[str, str]:
        """Settings of the first start. A scenario with a power cut during an update boots the
        agent on the primary model file (the registered bytes: its deployment is then
        ``already_active``) with the crash point armed, which saves a restart."""
        cut = next((s.fault for s in self.scenario.steps if s.fault and s.fault.kind == "power_cut_update"), None)
        if cut is None or getattr(self.target, "supports_local_faults", True) is False:
            return {}
        self.register(self.scenario.model)
        self.armed = cut.at
        return {"EDGEML_MODEL_PATH": str(self.model_files[self.scenario.model.ref]), **crash_env(cut.at)}

    def start_agent(self, **extra: str) -> None:
        self.target.start({**self.agent_env(), **extra}, self.wrapper)

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.target.local_port(self.api_port)}"

    def health(self) -> int | None:
        try:
            return httpx.get(f"{self.api}/v1/health", timeout=1).status_code
        except httpx.HTTPError:
            return None

    def status(self) -> dict[str, Any]:
        return httpx.get(f"{self.api}/v1/status", timeout=5).json()

    def agent_status_brief(self) -> str:
        try:
            s = self.status()
        except httpx.HTTPError as exc:
            return f"agent API unreachable ({exc.__class__.__name__})"
        return f"model={s.get('model') and s['model'].get('version')} update={s.get('update')}"

    def wait_healthy(self, timeout: float) -> float | None:
        """Seconds until ``/v1/health`` answers 200, None if not within ``timeout``."""
        t0 = time.monotonic()
        ok = wait_for(lambda: self.health() == 200, timeout)
        return round(time.monotonic() - t0, 3) if ok else None

    def wait_model(self, spec: ModelSpec, timeout: float) -> dict[str, Any] | None:
        sha = self.registered[spec.ref]["sha256"]

        def on_it() -> dict[str, Any] | None:
            s = self.status()
            update = s.get("update") or {}
            model = s.get("model") or {}
            return s if model.get("sha256") == sha and update.get("state") == "idle" else None

        return wait_for(on_it, timeout, 0.1)

    def wait_update_done(self, revision: int, timeout: float) -> dict[str, Any] | None:
        def done() -> dict[str, Any] | None:
            s = self.status()
            u = s.get("update") or {}
            return s if u.get("revision") == revision and u.get("state") == "idle" and u.get("result") else None

        return wait_for(done, timeout, 0.1)

    # ------------------------------------------------------------------ the cloud
    def register(self, spec: ModelSpec) -> dict[str, Any]:
        if spec.ref in self.registered:
            return self.registered[spec.ref]
        assert self.http is not None
        path = build_model(self.recorded, spec, self.workdir / "models")
        self.model_files[spec.ref] = path
        with path.open("rb") as fh:
            r = self.http.post("/v1/models", data={"name": spec.name, "version": spec.version},
                               files={"file": (path.name, fh)})
        if r.status_code != 201:
            raise RigError(f"registering {spec.ref} failed: {r.status_code} {r.text[:300]}")
        self.registered[spec.ref] = r.json()
        return self.registered[spec.ref]

    def deploy(self, spec: ModelSpec) -> int:
        """Register (if needed) and deploy; the desired state's revision."""
        self.register(spec)
        assert self.http is not None
        r = self.http.put(f"/v1/devices/{FLEET}/{DEVICE}/desired", json={"model": spec.ref})
        if r.status_code != 200:
            raise RigError(f"deploying {spec.ref} failed: {r.status_code} {r.text[:300]}")
        return int(r.json()["revision"])

    def signed_models(self) -> dict[str, str]:
        """sha256 -> ref of every registered model with a fleet signature."""
        assert self.http is not None
        return {m["sha256"]: m["ref"] for m in self.http.get("/v1/models").json() if m.get("signed")}

    def device(self) -> dict[str, Any]:
        assert self.http is not None
        r = self.http.get(f"/v1/devices/{FLEET}/{DEVICE}")
        return r.json() if r.status_code == 200 else {}

    def telemetry(self, kind: str) -> list[dict[str, Any]]:
        assert self.http is not None
        http = self.http

        def fetch() -> httpx.Response:
            return http.get(f"/v1/devices/{FLEET}/{DEVICE}/telemetry", params={"kind": kind, "limit": 100_000})

        r = wait_for(fetch, 10, 0.2)  # a connection reset while the rig's faults settle: ask again
        return r.json() if r is not None and r.status_code == 200 else []

    def tamper_artifact(self, sha256: str) -> None:
        """Flip bytes in the stored artifact (same size): what a bad disk or a middlebox does."""
        path = self.coordinator.artifacts.path(sha256)
        data = bytearray(path.read_bytes())
        for i in range(len(data) // 3, len(data) // 3 + 16):
            data[i] ^= 0xFF
        os.chmod(path, 0o644)
        path.write_bytes(bytes(data))

    # ------------------------------------------------------------------ the clock
    def skew_clock(self, offset_s: float) -> None:
        """Offset the agent's wall clock from its next start: a ``sitecustomize`` on its
        PYTHONPATH shifts ``time.time``/``time_ns`` (the clock it stamps records and checks
        expiries with). The monotonic clock is left alone, as on a device whose RTC is wrong."""
        d = self.workdir / "clock-skew"
        d.mkdir(exist_ok=True)
        (d / "sitecustomize.py").write_text(_SKEW_SOURCE)
        self.extra_env.update(EDGEML_HIL_CLOCK_OFFSET_S=str(offset_s),
                              PYTHONPATH=os.pathsep.join(filter(None, [str(d), os.environ.get("PYTHONPATH")])))

    # ------------------------------------------------------------------ the disk
    def _mount_data_dir(self) -> None:
        """A small tmpfs for the agent's data directory, so filling it is safe."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={DISK_BYTES}", "tmpfs", str(self.data_dir)],
                           capture_output=True, text=True, check=False)
        if r.returncode == 0:
            self.mounted = True
        else:
            self.mount_note = f"cannot mount a tmpfs for the data directory: {r.stderr.strip() or r.returncode}"

    def fill_disk(self) -> Path:
        filler = self.data_dir / "hil-filler"
        with filler.open("wb", buffering=0) as fh:
            block = b"\0" * (1 << 20)
            with contextlib.suppress(OSError):
                while True:
                    fh.write(block)
            block = b"\0" * 4096
            with contextlib.suppress(OSError):
                while True:
                    fh.write(block)
            with contextlib.suppress(OSError):
                os.fsync(fh.fileno())
        return filler

    def free_bytes(self) -> int:
        st = os.statvfs(self.data_dir)
        return st.f_bavail * st.f_frsize


_SKEW_SOURCE = """\
# Written by the edgeml HIL rig: the agent's wall clock runs EDGEML_HIL_CLOCK_OFFSET_S seconds off.
import os as _os
import time as _time

_offset = float(_os.environ.get("EDGEML_HIL_CLOCK_OFFSET_S", "0") or 0)
if _offset:
    _real_time, _real_time_ns = _time.time, _time.time_ns
    _time.time = lambda: _real_time() + _offset
    _time.time_ns = lambda: _real_time_ns() + int(_offset * 1e9)
"""
