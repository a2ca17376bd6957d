"""Power cuts during updates: kill -9 at every state of the machine, and at random moments.

The device must always end on a verified model (old or new), never on none, and the
update must resume or roll back on the next start. The scenario table also checks what
the restarted device reports, read from the broker: its retained state and its events.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from edgeml._models import sha256_file
from edgeml.protocol import ReportedState
from edgeml.updates import CRASH_AT_ENV

from ._protocol import undocumented
from ._reports import boot_seq, chain, clear_retained, retained, settle, update_events
from .conftest import Broker, Collector, wait_until
from .test_updates import TOPICS, Fleet, agent_settings
from .test_updates import fleet as fleet  # noqa: F401 - the coordinator fixture


@pytest.fixture
def subscribe(broker: Broker) -> Iterator[Callable[[str], Collector]]:
    """Subscribers to the test's broker, closed at the end whatever happens."""
    made: list[Collector] = []

    def make(topic: str) -> Collector:
        made.append(Collector(broker.port, topic))
        return made[-1]

    yield make
    for c in made:
        c.close()


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


# The update states in the order a successful update goes through them.
PATH = ("downloading", "verifying", "installing", "switching", "probation")


def succeeds_from(state: str) -> tuple[str, ...]:
    """The update events reported after a restart in ``state``: it resumes there and succeeds."""
    out: list[str] = []
    for s in PATH[PATH.index(state):]:
        out.append(f"state:{s}")
        if s == "installing":
            out.append("update_health")
    return (*out, "update_succeeded", "state:idle")


@dataclass(frozen=True)
class Row:
    """Kill the agent once ``crash_at`` is persisted, start it again, and expect this."""

    name: str
    crash_at: str | None  # None: killed while idle, no update ever started
    result: str | None  # the finished update's result, as /v1/status and …/state report it
    version: str  # the model served, on disk and reported as active at the end
    reason: str | None = None
    reports: tuple[str, ...] = ()  # update events after the restart, in seq order (see _reports.chain)
    lose_candidate: bool = False  # the verified candidate file is gone before the restart


SCENARIOS = [
    Row("idle", None, None, "1.0.0"),
    *(Row(s, s, "success", "2.0.0", reports=succeeds_from(s)) for s in PATH),
    Row("rolling_back", "rolling_back", "rolled_back", "1.0.0", "latency",
        ("state:rolling_back", "update_rolled_back", "state:idle")),
    Row("switch_fails", "switching", "rolled_back", "1.0.0", "load_failed",
        ("state:switching", "update_failed", "state:rolling_back", "update_rolled_back", "state:idle"),
        lose_candidate=True),
    # killed right after the success was committed: the events of that instant may be lost (the
    # buffer's durability window), the restarted agent reports the outcome in its state only
    Row("idle_after_update", "idle", "success", "2.0.0"),
]


@pytest.mark.parametrize("row", SCENARIOS, ids=[r.name for r in SCENARIOS])
def test_kill_at_every_state(
    row: Row, broker: Broker, fleet: Fleet, models: dict[str, Path], tmp_path: Path, agent_process, subscribe,
) -> None:
    shas = {"1.0.0": fleet.register(models["onnx_float"], "1.0.0")["sha256"],
            "2.0.0": fleet.register(models["onnx_v2"], "2.0.0")["sha256"]}
    telemetry = subscribe(TOPICS.telemetry)  # from the first start: sees both boots
    extra: dict[str, Any] = {}
    if row.crash_at == "rolling_back":  # reach rolling_back: a latency budget no model meets
        extra = {"EDGEML_UPDATES__PROBATION_LATENCY_BUDGET_MS": 0.000001, "EDGEML_UPDATES__PROBATION_MIN_PREDICTIONS": 5}
    env = agent_settings(tmp_path, broker, fleet, models["onnx_float"], **extra)
    if row.crash_at is not None:
        env[CRASH_AT_ENV] = row.crash_at
    agent = agent_process(**env).start()
    base = f"http://{agent.api_addr}"

    def predict_until_dead() -> bool:
        with contextlib.suppress(httpx.HTTPError):
            httpx.post(f"{base}/v1/predict", json={"inputs": {"input": [[0.1, 0.2, 0.3, 0.4]]}}, timeout=2)
        return agent.proc.poll() is not None  # type: ignore[union-attr]

    data = Path(env["EDGEML_DATA_DIR"])
    revision = None
    if row.crash_at is None:
        agent.kill()
    else:
        revision = fleet.deploy("mlp@2.0.0")["revision"]
        wait_until(predict_until_dead, 30, what=f"the agent to die in {row.crash_at}")
        agent.proc = None
    assert update_state(data)["state"] == (row.crash_at or "idle")  # persisted before the action
    before = on_disk(data)  # a verified model is always there
    assert before["version"] in ("1.0.0", "2.0.0")
    if row.lose_candidate:
        (data / "models" / f"{shas['2.0.0']}.onnx").unlink()  # the verified candidate is gone (disk fault)

    clear_retained(broker.port, TOPICS.state)  # what …/state holds from now on, the restarted agent said
    states = subscribe(TOPICS.state)
    agent.env.pop(CRASH_AT_ENV, None)
    agent.start()

    def finished() -> bool:
        update = agent.status()["update"]
        if update["state"] == "probation":  # traffic for the probation to judge
            predict_until_dead()
        return update["state"] == "idle" and (update["result"] or row.result is None)

    wait_until(finished, 30, what="the update to finish after the restart")
    status = agent.status()
    assert (status["update"]["state"], status["update"]["result"]) == ("idle", row.result), status["update"]
    assert status["model"]["version"] == row.version and status["model"]["sha256"] == shas[row.version]
    assert on_disk(data)["version"] == row.version

    # what reached the broker: the reported state, live and retained
    last = wait_until(lambda: (docs := states.payloads("state")) and docs[-1]["update"]["state"] == "idle"
                      and (docs[-1]["update"]["result"] or row.result is None) and docs[-1], 30,
                      what="the reported state of the finished update")
    for doc in (last, orjson.loads(retained(broker.port, TOPICS.state))):
        check_reported(ReportedState.model_validate(doc), row, revision, shas)

    # ... and the events of the new boot
    boot = boot_seq(telemetry, agent.proc.pid)  # type: ignore[union-attr]
    settle(base, telemetry, boot)
    events = update_events(telemetry, boot)
    assert chain(events) == list(row.reports), events
    check_events(events, row, revision, shas)
    agent.stop()


def check_reported(state: ReportedState, row: Row, revision: int | None, shas: dict[str, str]) -> None:
    assert undocumented(state) == [], "fields missing from docs/protocol.md"
    update = state.update
    assert (update.state, update.result, update.reason) == ("idle", row.result, row.reason), update
    assert update.revision == revision and state.applied_revision == revision
    assert state.active is not None
    assert (state.active.version, state.active.sha256) == (row.version, shas[row.version])


def check_events(events: list[dict[str, Any]], row: Row, revision: int | None, shas: dict[str, str]) -> None:
    if not events:
        return
    first, last = events[0], events[-1]
    assert first["data"]["event"] == "resume" and first["data"]["state"] == row.crash_at, first
    assert (last["data"]["result"], last["data"]["reason"]) == (row.result, row.reason), last
    assert {e["data"]["revision"] for e in events} == {revision}
    for e in events:
        if e["name"] == "update_rolled_back":
            assert e["message"] == row.reason and e["data"]["restored"]["sha256"] == shas[row.version], e
        if e["name"] == "update_failed":
            assert e["data"]["reason"] == row.reason, e


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

