"""Power cuts during updates: kill -9 at every state of the machine, and at random moments.

The device must always end on a verified model (old or new), never on none, and the
update must resume or roll back on the next start.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from edgeml._models import sha256_file
from edgeml.updates import CRASH_AT_ENV

from .conftest import Broker, wait_until
from .test_updates import Fleet, agent_settings


@pytest.fixture
def fleet(broker: Broker, tmp_path: Path):
    f = Fleet(tmp_path / "cloud", broker)
    yield f
    f.close()


def on_disk(data: Path) -> dict[str, Any]:
    """What the device would boot into: the A/B pointer, checked against the files."""
    pointer = json.loads((data / "models" / "active.json").read_text())
    active = pointer.get("active") or pointer
    path = data / "models" / active["file"]
    assert path.exists(), f"active model file {path} is missing"
    assert sha256_file(path) == active["sha256"], "active model does not match its recorded sha256"
    return active


def update_state(data: Path) -> dict[str, Any]:
    import sqlite3

    conn = sqlite3.connect(data / "updates.db")
    try:
        row = conn.execute("SELECT doc FROM current").fetchone()
    finally:
        conn.close()
    return json.loads(row[0]) if row else {"state": "idle"}


# state killed in -> (result after restart, version served at the end)
SCENARIOS = [
    ("downloading", "success", "2.0.0"),
    ("verifying", "success", "2.0.0"),
    ("installing", "success", "2.0.0"),
    ("switching", "success", "2.0.0"),
    ("probation", "success", "2.0.0"),
    ("rolling_back", "rolled_back", "1.0.0"),
]


@pytest.mark.parametrize(("crash_at", "result", "version"), SCENARIOS, ids=[s[0] for s in SCENARIOS])
def test_kill_at_every_state(
    crash_at: str, result: str, version: str, broker: Broker, fleet: Fleet, models: dict[str, Path],
    tmp_path: Path, agent_process,
) -> None:
    fleet.register(models["onnx_float"], "1.0.0")
    v2 = fleet.register(models["onnx_v2"], "2.0.0")
    extra: dict[str, Any] = {}
    if crash_at == "rolling_back":  # reach rolling_back: a latency budget no model meets
        extra = {"EDGEML_UPDATES__PROBATION_LATENCY_BUDGET_MS": 0.000001, "EDGEML_UPDATES__PROBATION_MIN_PREDICTIONS": 5}
    env = agent_settings(tmp_path, broker, fleet, models["onnx_float"], **extra)
    agent = agent_process(**env, **{CRASH_AT_ENV: crash_at}).start()
    fleet.deploy("mlp@2.0.0")
    base = f"http://{agent.api_addr}"

    def predict_until_dead() -> bool:
        with contextlib.suppress(httpx.HTTPError):
            httpx.post(f"{base}/v1/predict", json={"inputs": {"input": [[0.1, 0.2, 0.3, 0.4]]}}, timeout=2)
        return agent.proc.poll() is not None  # type: ignore[union-attr]

    wait_until(predict_until_dead, 30, what=f"the agent to die in {crash_at}")
    agent.proc = None
    data = Path(env["EDGEML_DATA_DIR"])
    assert update_state(data)["state"] == crash_at  # persisted before the action
    before = on_disk(data)  # a verified model is always there
    assert before["version"] in ("1.0.0", "2.0.0")

    agent.env.pop(CRASH_AT_ENV)
    agent.start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        status = agent.status()
        if status["update"]["state"] == "idle" and status["update"]["result"]:
            break
        if status["update"]["state"] == "probation":  # traffic for the probation to judge
            predict_until_dead()
        time.sleep(0.05)
    status = agent.status()
    assert (status["update"]["state"], status["update"]["result"]) == ("idle", result), status["update"]
    assert status["model"]["version"] == version
    assert on_disk(data)["version"] == version
    if version == "2.0.0":
        assert status["model"]["sha256"] == v2["sha256"]
    agent.stop()


def test_100_random_kills_always_end_on_a_verified_model(
    broker: Broker, fleet: Fleet, models: dict[str, Path], tmp_path: Path, agent_process,
) -> None:
    rounds = int(os.environ.get("EDGEML_RANDOM_KILLS", "100"))
    rng = random.Random(1234)
    v1 = fleet.register(models["onnx_float"], "1.0.0")
    v2 = fleet.register(models["onnx_v2"], "2.0.0")
    known = {v1["sha256"]: "1.0.0", v2["sha256"]: "2.0.0"}
    env = agent_settings(tmp_path, broker, fleet, models["onnx_float"], EDGEML_UPDATES__PROBATION_S=0.2,
                         EDGEML_TELEMETRY__METRICS_INTERVAL_S=3600, EDGEML_RUNTIME__WARMUP_RUNS=0)
    data = Path(env["EDGEML_DATA_DIR"])
    agent = agent_process(**env)
    states: dict[str, int] = {}
    for i in range(rounds):
        agent.start(wait_model=False)
        fleet.deploy("mlp@2.0.0" if i % 2 == 0 else "mlp@1.0.0")
        time.sleep(rng.uniform(0.0, 0.35))
        agent.kill()
        state = update_state(data)["state"]
        states[state] = states.get(state, 0) + 1
        active = on_disk(data)
        assert active["sha256"] in known, f"round {i}: the device would boot into an unknown model"
    agent.start()
    wanted = "2.0.0" if (rounds - 1) % 2 == 0 else "1.0.0"
    wait_until(lambda: (s := agent.status())["update"]["state"] == "idle" and s["model"]["version"] == wanted, 30,
               what="the last update to finish")
    agent.stop()
    assert on_disk(data)["version"] == wanted
    assert len(states) >= 3, f"kills landed in too few states: {states}"  # the kills really hit updates
    print(f"kills by state: {states}")


def test_candidate_lost_during_switch_rolls_back(
    broker: Broker, fleet: Fleet, models: dict[str, Path], tmp_path: Path, agent_process,
) -> None:
    fleet.register(models["onnx_float"], "1.0.0")
    v2 = fleet.register(models["onnx_v2"], "2.0.0")
    env = agent_settings(tmp_path, broker, fleet, models["onnx_float"])
    agent = agent_process(**env, **{CRASH_AT_ENV: "switching"}).start()
    fleet.deploy("mlp@2.0.0")
    wait_until(lambda: agent.proc.poll() is not None, 30, what="the agent to die in switching")  # type: ignore[union-attr]
    agent.proc = None
    data = Path(env["EDGEML_DATA_DIR"])
    (data / "models" / f"{v2['sha256']}.onnx").unlink()  # the verified candidate is gone (disk fault)
    agent.env.pop(CRASH_AT_ENV)
    agent.start()
    status = wait_until(lambda: (s := agent.status())["update"]["state"] == "idle" and s["update"]["result"] and s,
                        30, what="recovery")
    assert status["update"]["result"] == "rolled_back" and status["model"]["version"] == "1.0.0"
    assert on_disk(data)["version"] == "1.0.0"
    agent.stop()
