"""Fuzzing what is read from files: model files and their metadata, the agent's model
pointer, and the agent's and the coordinator's settings (YAML and environment).

Properties: a mangled model is :class:`InvalidModel` (cloud) or ``ModelLoadError``
(agent), or inspects fine; a broken pointer file is ignored; settings load or raise the
package's config error naming a key, never another exception.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import example, given
from hypothesis import strategies as st

from cloud._config import InvalidSetting, load_cloud_config
from cloud._exceptions import InvalidModel
from cloud.registry.inspect import inspect_model
from edgeml._config import load_config
from edgeml._exceptions import ConfigError
from edgeml._models import ModelInfo, ModelStore

from ._fuzz import FUZZ, SLOW, json_values, mutated_bytes


@pytest.fixture(scope="module")
def model_bytes(models: dict[str, Path]) -> dict[str, bytes]:
    return {k: models[k].read_bytes() for k in ("onnx_float", "onnx_int8", "tflite_float")}


def test_mangled_models_are_invalid_models(model_bytes: dict[str, bytes], tmp_path: Path) -> None:
    @given(which=st.sampled_from(sorted(model_bytes)), data=st.data(), suffix=st.sampled_from([".onnx", ".tflite", ""]))
    @SLOW
    def inspect(which: str, data: Any, suffix: str) -> None:
        raw = data.draw(mutated_bytes(model_bytes[which]))
        path = tmp_path / f"m{suffix}"
        path.write_bytes(raw)
        try:
            facts = inspect_model(path)
        except InvalidModel:
            return
        assert facts.size == len(raw) and facts.format in ("onnx", "tflite")

    inspect()


def test_mangled_tflite_metadata_is_read_or_a_value_error(model_bytes: dict[str, bytes], tmp_path: Path) -> None:
    """The agent's own flatbuffer reader (no LiteRT schema): any mangling gives text entries
    or ValueError, never another exception (negative offsets included)."""
    from edgeml.runtime.tflite_metadata import read_tflite_metadata

    @given(data=st.data())
    @FUZZ
    def read(data: Any) -> None:
        path = tmp_path / "m.tflite"
        path.write_bytes(data.draw(mutated_bytes(model_bytes["tflite_float"])))
        try:
            meta = read_tflite_metadata(path)
        except ValueError:
            return
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())

    read()


@pytest.mark.parametrize("field", [b"edgeml._testing", b"edgeml.version", b"Gemm", b"input"])
def test_a_string_field_that_is_not_utf8_is_an_invalid_model(
    model_bytes: dict[str, bytes], tmp_path: Path, field: bytes,
) -> None:
    """Found by the property above: ONNX is proto2, so a string field holding bytes that
    are not UTF-8 (here its first byte made 0x80) reads as ``bytes``, which escaped as a
    TypeError (the producer) or would have been stored as a name."""
    raw = model_bytes["onnx_float"]
    assert raw.count(field) >= 1
    path = tmp_path / "m.onnx"
    path.write_bytes(raw.replace(field, b"\x80" + field[1:]))
    with pytest.raises(InvalidModel, match="(?i)utf-8"):  # the checker or our reader says which
        inspect_model(path)


@given(text=st.text(max_size=200) | st.builds(json.dumps, json_values))
@example(text="[]")  # a list: AttributeError escaped from the pointer reader
@FUZZ
def test_a_broken_pointer_file_is_ignored(text: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    root = tmp_path_factory.mktemp("store")
    (root / "active.json").write_text(text)
    store = ModelStore(root)
    for info in (store.active_info(), store.previous_info()):
        assert info is None or isinstance(info, ModelInfo)
    store.seed()


# --------------------------------------------------------------------------- settings

AGENT_KEYS = ["device_id", "fleet", "broker_url", "data_dir", "model_path", "api_addr", "mqtt", "telemetry",
              "updates", "runtime", "discovery", "fleet_pubkey", "hardware_profile", "x"]
CLOUD_KEYS = ["broker_url", "db", "http_addr", "public_url", "artifact_dir", "signing_key", "log_level",
              "max_upload_bytes", "ingest", "metrics", "auth", "x"]


def settings_text(keys: list[str]) -> st.SearchStrategy[str | bytes]:
    documents = st.dictionaries(st.sampled_from(keys) | st.text(max_size=6), json_values, max_size=4)
    # YAML as people write it, and JSON (YAML too): the YAML writer cannot write deep nesting
    return (st.builds(_yaml, documents) | st.builds(json.dumps, documents) | st.text(max_size=120)
            | st.binary(max_size=60))


def _yaml(doc: dict[str, Any]) -> str:
    text = json.dumps(doc)
    if text.count("[") + text.count("{") > 100:  # the YAML writer recurses: deep documents go as JSON
        return text
    return yaml.safe_dump(doc, allow_unicode=True)


def env_vars(prefix_keys: list[str]) -> st.SearchStrategy[dict[str, str]]:
    names = st.sampled_from([f"EDGEML_{k.upper()}" for k in prefix_keys]
                            + ["EDGEML_MQTT__KEEPALIVE_S", "EDGEML_INGEST__POLICY", "EDGEML_AUTH__REQUIRED",
                               "EDGEML_UPDATES__PROBATION_S", "EDGEML___", "EDGEML_X__"])
    return st.dictionaries(names, st.text(max_size=12), max_size=3)


def _write(path: Path, content: str | bytes) -> Path:
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


@given(content=settings_text(AGENT_KEYS), env=env_vars(AGENT_KEYS))
@example(content=b"fleet: \xff\xfe", env={})  # not UTF-8: a UnicodeDecodeError escaped
@example(content="", env={"EDGEML_FLEET_PUBKEY": "key\udcff"})  # undecodable bytes in the environment
@FUZZ
def test_agent_settings_load_or_name_the_bad_key(content: str | bytes, env: dict[str, str],
                                                tmp_path_factory: pytest.TempPathFactory) -> None:
    path = _write(tmp_path_factory.mktemp("agent") / "agent.yaml", content)
    try:
        config = load_config(path, env=env)
    except ConfigError as exc:
        assert exc.key and exc.reason
        return
    assert config.device_id


@given(content=settings_text(CLOUD_KEYS), env=env_vars(CLOUD_KEYS))
@example(content=b"db: \xff", env={})
@example(content='signing_key: "ab\\ud800cdefghijklmn"', env={})  # a lone surrogate broke pydantic's error
@example(content="", env={"EDGEML_SIGNING_KEY": "key\udcff"})  # undecodable bytes in the environment
@FUZZ
def test_cloud_settings_load_or_name_the_bad_key(content: str | bytes, env: dict[str, str],
                                                tmp_path_factory: pytest.TempPathFactory) -> None:
    path = _write(tmp_path_factory.mktemp("cloud") / "cloud.yaml", content)
    try:
        config = load_cloud_config(path, env=env)
    except InvalidSetting as exc:
        assert exc.key and exc.reason
        return
    assert config.db


def test_settings_nested_past_the_recursion_limit_are_a_config_error(tmp_path: Path) -> None:
    """PyYAML composes recursively: 700 levels raised RecursionError out of both loaders.
    (Not an @example: Hypothesis raises the recursion limit while it runs a test.)"""
    path = tmp_path / "deep.yaml"
    path.write_text("db: " + "[" * 700 + "]" * 700)
    with pytest.raises(ConfigError, match="nested too deeply"):
        load_config(path, env={})
    with pytest.raises(InvalidSetting, match="nested too deeply"):
        load_cloud_config(path, env={})
