from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import BaseModel

from edgeml import ConfigError, load_config
from edgeml._config import BrokerURL

REPO = Path(__file__).resolve().parent.parent


def test_environment_wins_over_file(tmp_path: Path) -> None:
    f = tmp_path / "agent.yaml"
    f.write_text("device_id: from-file\nfleet: f1\nbroker_url: mqtt://filehost:1883\ntelemetry:\n  sample_rate: 0.1\n")
    cfg = load_config(f, env={"EDGEML_DEVICE_ID": "from-env", "EDGEML_TELEMETRY__SAMPLE_RATE": "0.5"})
    assert cfg.device_id == "from-env"
    assert cfg.fleet == "f1"
    assert cfg.broker_url is not None and (cfg.broker_url.host, cfg.broker_url.port) == ("filehost", 1883)
    assert cfg.telemetry.sample_rate == 0.5


def test_all_short_variables(tmp_path: Path) -> None:
    env = {
        "EDGEML_DEVICE_ID": "d1", "EDGEML_FLEET": "plant-7", "EDGEML_DATA_DIR": str(tmp_path),
        "EDGEML_BROKER_URL": "mqtts://broker.example:8883", "EDGEML_MODEL_PATH": "/m.onnx",
        "EDGEML_API_ADDR": "0.0.0.0:9000",
    }
    cfg = load_config(env=env)
    assert (cfg.device_id, cfg.fleet, cfg.data_dir) == ("d1", "plant-7", tmp_path)
    assert cfg.broker_url is not None and cfg.broker_url.tls and cfg.broker_url.port == 8883
    assert cfg.model_path == Path("/m.onnx") and cfg.api_host_port == ("0.0.0.0", 9000)


@pytest.mark.parametrize(
    ("env", "key", "reason"),
    [
        ({"EDGEML_BROKER_URL": "http://x:1"}, "broker_url", "mqtt://"),
        ({"EDGEML_BROKER_URL": "mqtt://x:99999"}, "broker_url", "port"),
        ({"EDGEML_API_ADDR": "localhost"}, "api_addr", "host:port"),
        ({"EDGEML_DEVICE_ID": "a/b"}, "device_id", "letters"),
        ({"EDGEML_FLEET": "#"}, "fleet", "letters"),
        ({"EDGEML_TELEMETRY__SAMPLE_RATE": "2"}, "telemetry.sample_rate", "less than or equal"),
        ({"EDGEML_MQTT__MAX_INFLIGHT": "lots"}, "mqtt.max_inflight", "integer"),
        ({"EDGEML_MODEL_PATH": "/"}, "model_path", "is a directory"),
    ],
)
def test_bad_setting_names_key_and_reason(env: dict[str, str], key: str, reason: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(env=env)
    assert info.value.key == key
    assert reason in str(info.value)
    assert next(iter(env)) in str(info.value)  # says which variable it came from


def test_unknown_key_and_bad_yaml(tmp_path: Path) -> None:
    f = tmp_path / "a.yaml"
    f.write_text("telemetry:\n  sample_rat: 0.1\n")
    with pytest.raises(ConfigError, match="telemetry.sample_rat.*unknown setting"):
        load_config(f, env={})
    f.write_text("device_id: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML at line"):
        load_config(f, env={})
    f.write_text("- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(f, env={})
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml", env={})


def test_example_config_is_valid_and_documents_every_key() -> None:
    cfg = load_config(REPO / "configs" / "agent.yaml", env={})
    text = (REPO / "configs" / "agent.yaml").read_text()
    for section in type(cfg).model_fields:
        assert f"{section}:" in text, f"configs/agent.yaml does not document {section}"
        sub = getattr(cfg, section)
        if isinstance(sub, BaseModel) and not isinstance(sub, BrokerURL):
            for key in type(sub).model_fields:
                assert f"{key}:" in text, f"configs/agent.yaml does not document {section}.{key}"


def test_cli_refuses_bad_setting_with_exit_2(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "EDGEML_BROKER_URL": "tcp://nowhere", "HOME": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-m", "edgeml.cli", "agent", "run"], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert "broker_url" in result.stderr and "EDGEML_BROKER_URL" in result.stderr


def test_an_empty_model_path_means_none() -> None:  # EDGEML_MODEL_PATH= in an env file
    assert load_config(env={"EDGEML_MODEL_PATH": ""}).model_path is None
    assert load_config(env={"EDGEML_MODEL_PATH": "  "}).model_path is None


def test_an_unreadable_fleet_key_stops_the_start_naming_the_key(tmp_path: Path) -> None:
    from edgeml import Agent

    cfg = load_config(env={"EDGEML_DATA_DIR": str(tmp_path / "d"), "EDGEML_FLEET_PUBKEY": str(tmp_path / "nope.pub"),
                           "EDGEML_API_ADDR": "off", "EDGEML_DISCOVERY__BROWSE": "false",
                           "EDGEML_DISCOVERY__ANNOUNCE": "false"})
    with pytest.raises(ConfigError) as info:
        Agent(cfg).start()
    assert info.value.key == "fleet_pubkey" and "nope.pub" in str(info.value)
