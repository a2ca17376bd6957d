"""Hardware profiles: shipped ones validate, the agent reports and applies them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from edgeml import Agent, ConfigError, load_config
from edgeml._hardware import load_profile, shipped_profiles

from .conftest import REPO, agent_env, free_port


def test_shipped_profiles_validate() -> None:
    assert {"rpi4", "jetson-orin-nano", "x86-gateway"} <= set(shipped_profiles())
    for name in shipped_profiles():
        profile = load_profile(name)
        assert profile.name == name and profile.cpu.cores >= 1 and profile.budgets.latency_ms
    assert (REPO / "configs" / "hardware" / "rpi4.yaml").is_file()  # where the issue and README point


def test_profile_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no profile 'nope'.*rpi4"):
        load_profile("nope")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ncpu: {arch: arm, cores: 0}\nram_mb: 512\n")
    with pytest.raises(ConfigError, match="cpu.cores"):
        load_profile(str(bad))


def test_agent_applies_and_reports_its_profile(models: dict[str, Path], tmp_path: Path) -> None:
    env = agent_env(EDGEML_DATA_DIR=tmp_path / "d", EDGEML_API_ADDR=f"127.0.0.1:{free_port()}",
                    EDGEML_MODEL_PATH=models["onnx_float"], EDGEML_HARDWARE_PROFILE="rpi4")
    with Agent(load_config(env=env)) as agent:
        status = agent.status()
        assert status["hardware_profile"]["name"] == "rpi4"
        assert agent._updates.settings.health_latency_budget_ms == 50  # the profile's budget
        assert agent._updates.settings.probation_latency_budget_ms == 80
        assert agent._updates.state_document()["hardware_profile"] == "rpi4"


def test_unknown_profile_stops_the_start(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "EDGEML_HARDWARE_PROFILE": "toaster",
           "EDGEML_DATA_DIR": str(tmp_path / "d"), "EDGEML_DISCOVERY__BROWSE": "false"}
    result = subprocess.run([sys.executable, "-m", "edgeml.cli", "agent", "run"], env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2 and "hardware_profile" in result.stderr and "toaster" in result.stderr
