"""`edgeml agent run` and `Agent.start` when a setting cannot work here; `edgeml agent status` without data."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgeml import Agent, ConfigError, load_config

from .conftest import REPO, agent_env, free_port

IMPOSSIBLE_DIR = "/proc/edgeml"  # procfs refuses mkdir, even to root


@pytest.fixture
def busy_addr() -> Iterator[str]:
    """host:port of a socket listening here: the address is in use."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield f"127.0.0.1:{sock.getsockname()[1]}"


def _edgeml(*args: str, **env: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edgeml.cli", *args], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, **agent_env(**env)}, timeout=60)


def _agent_threads() -> list[str]:
    return sorted(t.name for t in threading.enumerate() if t.name.startswith(("edgeml", "paho", "APScheduler")))


def test_a_busy_api_port_is_a_config_error_and_start_leaves_nothing_running(busy_addr: str, tmp_path: Path) -> None:
    before = _agent_threads()
    agent = Agent(load_config(env=agent_env(EDGEML_DATA_DIR=tmp_path / "d", EDGEML_API_ADDR=busy_addr)))
    with pytest.raises(ConfigError, match="api_addr") as info:
        agent.start()
    assert info.value.key == "api_addr" and busy_addr in str(info.value)
    assert _agent_threads() == before  # the buffer's flusher was started before the bind: it is stopped
    assert agent._buffer is None and agent.status()["running"] is False
    with Agent(load_config(env=agent_env(EDGEML_DATA_DIR=tmp_path / "d"))) as again:  # the database was closed
        assert again.status()["running"] is True


def test_stop_stops_every_part_even_when_one_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    before = _agent_threads()
    agent = Agent(load_config(env=agent_env(EDGEML_DATA_DIR=tmp_path / "d", EDGEML_API_ADDR=f"127.0.0.1:{free_port()}")))
    agent.start()
    assert _agent_threads() != before

    def broken() -> None:
        raise OSError("the local API would not close")

    api = agent._api
    monkeypatch.setattr(api, "stop", broken)
    with pytest.raises(OSError, match="would not close"):
        agent.stop()  # the first error, raised after every other part was stopped
    assert agent._buffer is None and agent._updates is None and agent._sync is None
    assert [t for t in _agent_threads() if t not in before and t != "edgeml-api"] == []
    monkeypatch.undo()
    api.stop()  # what the failed part left: this test's own cleanup


def test_a_data_dir_that_cannot_be_created_is_a_config_error(tmp_path: Path) -> None:
    agent = Agent(load_config(env=agent_env(EDGEML_DATA_DIR=IMPOSSIBLE_DIR, EDGEML_API_ADDR="off")))
    with pytest.raises(ConfigError, match="data_dir") as info:
        agent.start()
    assert info.value.key == "data_dir" and IMPOSSIBLE_DIR in str(info.value)


def test_agent_run_start_failures_are_one_line_and_nonzero(busy_addr: str, tmp_path: Path) -> None:
    for env, key in [
        ({"EDGEML_DATA_DIR": tmp_path / "d", "EDGEML_API_ADDR": busy_addr}, "api_addr"),
        ({"EDGEML_DATA_DIR": IMPOSSIBLE_DIR, "EDGEML_API_ADDR": f"127.0.0.1:{free_port()}"}, "data_dir"),
    ]:
        run = _edgeml("agent", "run", **env)
        assert run.returncode == 2, run.stderr
        assert "Traceback" not in run.stderr
        errors = [line for line in run.stderr.splitlines() if line.startswith("edgeml: error:")]
        assert len(errors) == 1 and key in errors[0], run.stderr


def test_an_unresolvable_broker_is_not_fatal(tmp_path: Path) -> None:
    """The broker may come later: the agent runs offline and buffers."""
    env = agent_env(EDGEML_DATA_DIR=tmp_path / "d", EDGEML_API_ADDR=f"127.0.0.1:{free_port()}",
                    EDGEML_BROKER_URL="mqtt://nohost.invalid:1883")
    with Agent(load_config(env=env)) as agent:
        status = agent.status()
        assert status["running"] is True and status["sync"]["connected"] is False
        assert status["sync"]["broker"] == "mqtt://nohost.invalid:1883"


def test_agent_status_without_agent_data_says_so(tmp_path: Path) -> None:
    cfg = tmp_path / "agent.yaml"
    missing = tmp_path / "no-such-dir"
    cfg.write_text(f"data_dir: {missing}\napi_addr: 127.0.0.1:{free_port()}\n")
    for extra in ([], ["--json"]):
        run = _edgeml("agent", "status", "-c", str(cfg), *extra)
        assert run.returncode == 1, run.stdout
        assert f"no agent data at {missing}" in run.stderr and "records" not in run.stdout
    assert not missing.exists()  # status only reads
