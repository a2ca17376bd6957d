"""Agent settings: a validated, immutable model loaded from YAML and the environment.

The environment wins over the file. The well-known variables are::

    EDGEML_DEVICE_ID  EDGEML_FLEET  EDGEML_DATA_DIR  EDGEML_BROKER_URL
    EDGEML_MODEL_PATH  EDGEML_API_ADDR

and any nested key can be set as ``EDGEML_<SECTION>__<KEY>`` (for example
``EDGEML_TELEMETRY__SAMPLE_RATE=0.1``). configs/agent.yaml documents every key.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ._exceptions import ConfigError
from .protocol import check_id

ENV_PREFIX = "EDGEML_"
#: The top-level keys with a short environment variable of their own.
ENV_KEYS = (
    "device_id", "fleet", "data_dir", "broker_url", "model_path", "api_addr", "hardware_profile", "fleet_pubkey",
)

DEFAULT_API_ADDR = "127.0.0.1:8470"
DEFAULT_DATA_DIR = "edgeml-data"


class _Settings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class BrokerURL(_Settings):
    """A parsed ``mqtt://host:port`` or ``mqtts://host:port`` URL."""

    scheme: Literal["mqtt", "mqtts"]
    host: str
    port: int
    username: str | None = None
    password: str | None = None

    @property
    def tls(self) -> bool:
        return self.scheme == "mqtts"

    def __str__(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"


def parse_broker_url(value: str) -> BrokerURL:
    """Parse a broker URL; ValueError says what is wrong."""
    parts = urlsplit(value)
    if parts.scheme not in ("mqtt", "mqtts"):
        raise ValueError(f"scheme must be mqtt:// or mqtts://, got {value!r}")
    if not parts.hostname:
        raise ValueError(f"no host in {value!r}")
    try:
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"bad port in {value!r}") from exc
    return BrokerURL(
        scheme=parts.scheme,  # type: ignore[arg-type]
        host=parts.hostname,
        port=port or (8883 if parts.scheme == "mqtts" else 1883),
        username=parts.username,
        password=parts.password,
    )


def parse_host_port(value: str) -> tuple[str, int]:
    """Parse ``host:port`` (``[::1]:port`` for IPv6); ValueError says what is wrong."""
    host, sep, port_text = value.rpartition(":")
    if not sep or not host:
        raise ValueError(f"expected host:port, got {value!r}")
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"port must be a number 0-65535, got {port_text!r}")
    return host.strip("[]"), int(port_text)


class TLSFiles(_Settings):
    """TLS to the broker (``mqtts://``): the CA to trust (None: the system's), and a client
    certificate with its key for mutual TLS (both or neither)."""

    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None

    @field_validator("ca_file", "cert_file", "key_file", mode="before")
    @classmethod
    def _empty_path(cls, v: Any) -> Any:
        return None if v == "" else v

    @field_validator("ca_file", "cert_file", "key_file")
    @classmethod
    def _tls_file(cls, v: Path | None) -> Path | None:
        return check_tls_file(v)

    @model_validator(mode="after")
    def _tls_pair(self) -> TLSFiles:
        check_tls_pair(self.cert_file, self.key_file)
        return self

    def apply(self, client: Any) -> None:
        """``client.tls_set(...)`` on a paho client with these files."""
        client.tls_set(ca_certs=_str(self.ca_file), certfile=_str(self.cert_file), keyfile=_str(self.key_file))


def _str(path: Path | None) -> str | None:
    return None if path is None else str(path)


def check_tls_file(path: Path | None) -> Path | None:
    """``path`` if it is None or a readable file; ValueError naming it otherwise."""
    if path is not None and not path.is_file():
        raise ValueError(f"no such file: {path}")
    return path


def check_tls_pair(cert: Path | None, key: Path | None) -> None:
    """A client certificate and its key come together (mutual TLS), or neither."""
    if (cert is None) != (key is None):
        raise ValueError("cert_file and key_file go together: set both for mutual TLS, or neither")


class MqttSettings(TLSFiles):
    """The MQTT session; its TLS files (``ca_file``, ``cert_file``, ``key_file``) and their
    checks come from :class:`TLSFiles`."""

    client_id: str | None = None
    keepalive_s: int = Field(30, ge=5, le=3600)
    reconnect_min_s: float = Field(0.5, gt=0)
    reconnect_max_s: float = Field(30.0, gt=0)
    max_inflight: int = Field(16, ge=1, le=1000)
    batch_max_records: int = Field(500, ge=1)
    batch_max_bytes: int = Field(256 * 1024, ge=1024)
    bandwidth_limit_bps: int | None = Field(None, ge=1024)


class TelemetrySettings(_Settings):
    buffer_max_bytes: int = Field(64 * 1024 * 1024, ge=64 * 1024)
    flush_interval_ms: int = Field(50, ge=1, le=10_000)
    fsync: bool = True
    sample_rate: float = Field(0.0, ge=0.0, le=1.0)
    metrics_interval_s: float = Field(30.0, gt=0)
    housekeeping_interval_s: float = Field(60.0, gt=0)


class RuntimeSettings(_Settings):
    engine: Literal["auto", "onnx", "litert"] = "auto"
    threads: int | None = Field(None, ge=1, le=64)  # None: the hardware profile's, else 1
    warmup_runs: int = Field(3, ge=0, le=1000)
    # glibc malloc arenas for the process (0: glibc's default, eight per core); MALLOC_ARENA_MAX wins
    malloc_arenas: int = Field(2, ge=0, le=64)


class UpdateSettings(_Settings):
    """Safe model updates: how candidates are fetched, checked and put on probation."""

    require_signature: bool = True
    download_timeout_s: float = Field(30.0, gt=0)
    download_retries: int = Field(5, ge=0, le=100)
    retry_backoff_s: float = Field(1.0, ge=0)
    max_model_bytes: int = Field(512 * 1024 * 1024, ge=1024)
    min_free_bytes: int = Field(32 * 1024 * 1024, ge=0)
    contract: Literal["same", "none"] = "same"
    health_latency_budget_ms: float | None = Field(None, gt=0)
    probation_s: float = Field(60.0, ge=0)
    probation_min_predictions: int = Field(20, ge=0)
    max_error_rate: float = Field(0.05, ge=0, le=1)
    probation_latency_budget_ms: float | None = Field(None, gt=0)
    crash_loop_limit: int = Field(2, ge=1)
    shadow_sample_rate: float = Field(0.1, ge=0, le=1)
    shadow_cpu_share: float = Field(0.25, gt=0, le=1)


class DiscoverySettings(_Settings):
    browse: bool = True
    announce: bool = True
    timeout_s: float = Field(5.0, gt=0)


class AgentConfig(_Settings):
    """Settings of one agent. Build with :func:`load_config` or directly."""

    device_id: str = Field(default_factory=lambda: _default_device_id())
    fleet: str = "default"
    data_dir: Path = Path(DEFAULT_DATA_DIR)
    broker_url: BrokerURL | None = None
    model_path: Path | None = None
    api_addr: str | None = DEFAULT_API_ADDR
    hardware_profile: str | None = None
    #: Trusted fleet public keys: one file (it may hold several keys), or several files
    #: (a list; in the environment separated by ','): more than one during a key rotation.
    fleet_pubkey: Path | list[Path] | None = None
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    mqtt: MqttSettings = MqttSettings()
    telemetry: TelemetrySettings = TelemetrySettings()
    runtime: RuntimeSettings = RuntimeSettings()
    discovery: DiscoverySettings = DiscoverySettings()
    updates: UpdateSettings = UpdateSettings()

    @field_validator("device_id")
    @classmethod
    def _device_id(cls, v: str) -> str:
        return check_id(v, "device_id")

    @field_validator("fleet")
    @classmethod
    def _fleet(cls, v: str) -> str:
        return check_id(v, "fleet")

    @field_validator("broker_url", mode="before")
    @classmethod
    def _broker(cls, v: Any) -> Any:
        if isinstance(v, str):
            return parse_broker_url(v) if v.strip() else None
        return v

    @field_validator("fleet_pubkey", mode="before")
    @classmethod
    def _pubkeys(cls, v: Any) -> Any:
        if isinstance(v, str) and "," in v:
            return [p.strip() for p in v.split(",") if p.strip()]
        return None if v in ("", []) else v

    @property
    def fleet_pubkeys(self) -> list[Path]:
        """The trusted fleet public key files (empty: none configured)."""
        keys = self.fleet_pubkey
        return [] if keys is None else list(keys) if isinstance(keys, list) else [keys]

    @field_validator("model_path", mode="before")
    @classmethod
    def _model_path(cls, v: Any) -> Any:
        return None if isinstance(v, str) and not v.strip() else v  # EDGEML_MODEL_PATH= in an env file: none

    @field_validator("model_path")
    @classmethod
    def _model_file(cls, v: Path | None) -> Path | None:
        if v is not None and v.is_dir():
            raise ValueError(f"{v} is a directory; expected a model file (.onnx or .tflite)")
        return v

    @field_validator("api_addr")
    @classmethod
    def _api_addr(cls, v: str | None) -> str | None:
        if v in (None, "", "off"):
            return None
        parse_host_port(v)
        return v

    @property
    def api_host_port(self) -> tuple[str, int] | None:
        return parse_host_port(self.api_addr) if self.api_addr else None

    @property
    def client_id(self) -> str:
        return self.mqtt.client_id or f"edgeml-{self.fleet}-{self.device_id}"


def _default_device_id() -> str:
    name = "".join(c if c.isalnum() or c in "._-" else "-" for c in socket.gethostname())
    return name.strip("-._")[:64] or "device"


def _env_overrides(env: Mapping[str, str]) -> tuple[dict[str, Any], dict[str, str]]:
    data: dict[str, Any] = {}
    origin: dict[str, str] = {}
    for var, value in env.items():
        if not var.startswith(ENV_PREFIX):
            continue
        rest = var[len(ENV_PREFIX):].lower()
        if rest in ENV_KEYS:
            data[rest] = value
            origin[rest] = var
        elif "__" in rest:
            section, key = rest.split("__", 1)
            if section in AgentConfig.model_fields and key:
                data.setdefault(section, {})[key] = value
                origin[f"{section}.{key}"] = var
    return data, origin


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def load_config(path: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None) -> AgentConfig:
    """Load settings from a YAML file (optional) and the environment (which wins).

    Raises :class:`ConfigError` naming the first bad key and why it is bad.
    """
    env = os.environ if env is None else env
    data: dict[str, Any] = {}
    if path is not None:
        data = _read_yaml(Path(path))
    overrides, origin = _env_overrides(env)
    data = _merge(data, overrides)
    check_text(data, origin)
    try:
        return AgentConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(*describe_error(exc, origin)) from None


def check_text(data: Any, origin: Mapping[str, str], key: str = "") -> None:
    """ConfigError naming the first key or value that is not Unicode text: a lone surrogate
    (undecodable bytes in the environment, a ``\\ud800`` escape in YAML) breaks validation."""
    if isinstance(data, str):
        try:
            data.encode("utf-8")
        except UnicodeEncodeError:
            where = f" (from {origin[key]})" if key in origin else ""
            raise ConfigError(key or "<root>", f"not valid UTF-8 text{where}") from None
    elif isinstance(data, dict):
        for k, v in data.items():
            name = f"{key}.{k}" if key else str(k)
            check_text(k, origin, name)
            check_text(v, origin, name)
    elif isinstance(data, list):
        for i, v in enumerate(data):
            check_text(v, origin, f"{key}.{i}")


def describe_error(exc: ValidationError, origin: Mapping[str, str]) -> tuple[str, str]:
    """(dotted key, reason) of the first error, naming the variable a value came from."""
    err = exc.errors()[0]
    key = ".".join(str(p) for p in err["loc"]) or "<root>"
    reason = str(err["msg"]).removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        reason = "unknown setting"
    where = f" (from {origin[key]})" if key in origin else ""
    return key, reason + where


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError("--config", f"cannot read {path}: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError("--config", f"{path} is not UTF-8 text (byte {exc.start})") from exc
    import yaml  # here: an application that builds AgentConfig in code never loads the YAML parser

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError("--config", f"{path} is not valid YAML{at}") from exc
    except RecursionError:
        raise ConfigError("--config", f"{path} is nested too deeply") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError("--config", f"{path} must hold a mapping of settings, got {type(data).__name__}")
    return data
