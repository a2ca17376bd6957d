"""Coordinator settings: a YAML file and the environment (which wins), validated once.

Short variables: ``EDGEML_BROKER_URL``, ``EDGEML_CLOUD_DB``, ``EDGEML_HTTP_ADDR``,
``EDGEML_ARTIFACT_DIR``, ``EDGEML_SIGNING_KEY``, ``EDGEML_PUBLIC_URL``; any nested key as
``EDGEML_<SECTION>__<KEY>`` (``EDGEML_INGEST__POLICY=preregistered``). Variables meant
for the agent (``EDGEML_DEVICE_ID``…) are ignored. configs/cloud.yaml documents every key.
A bad value raises :class:`InvalidSetting` naming the key (and the variable it came from).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator

from edgeml._config import (
    TLSFiles,
    _merge,
    _read_yaml,
    check_text,
    describe_error,
    parse_broker_url,
    parse_host_port,
)
from edgeml._exceptions import ConfigError as _AgentConfigError

from ._exceptions import ConfigError
from .ingest import IngestConfig

__all__ = ["DEFAULT_HTTP_ADDR", "CloudConfig", "InvalidSetting", "load_cloud_config"]

ENV_PREFIX = "EDGEML_"
#: Short variables -> top-level keys.
ENV_KEYS = {
    "EDGEML_BROKER_URL": "broker_url",
    "EDGEML_CLOUD_DB": "db",
    "EDGEML_HTTP_ADDR": "http_addr",
    "EDGEML_ARTIFACT_DIR": "artifact_dir",
    "EDGEML_SIGNING_KEY": "signing_key",
    "EDGEML_PUBLIC_URL": "public_url",
}
DEFAULT_HTTP_ADDR = "127.0.0.1:8480"
DEFAULT_DB = "edgeml-cloud.db"


class InvalidSetting(ConfigError):
    """A coordinator setting is invalid; ``key`` names it (dotted for nested keys)."""

    def __init__(self, key: str, reason: str) -> None:
        self.key = key
        self.reason = reason
        super().__init__(f"invalid setting {key!r}: {reason}")


class _Settings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


#: The ``ingest`` section: every :class:`IngestConfig` field but ``broker_url`` (top level).
IngestSettings: type[BaseModel] = create_model(  # type: ignore[call-overload]
    "IngestSettings",
    __base__=_Settings,
    **{name: (f.annotation, f) for name, f in IngestConfig.model_fields.items() if name not in ("broker_url", "tls")},
)


class MetricsSettings(_Settings):
    enabled: bool = True
    lag_window_s: float = Field(300.0, gt=0)


class AuthSettings(_Settings):
    #: Enforce API tokens even before the first one exists (false: open until a token is created).
    required: bool = False


# >>> TRAINING SETTINGS
class TrainedModelSettings(_Settings):
    """One model under continuous training."""

    recipe: str = Field(description="Recipe file name under training.recipes_dir (or a path).")
    fleet: str = "default"
    include_recipe_data: bool = Field(True, description="Train on the recipe's own sources too, not only fleet data.")


class AutoCanarySettings(_Settings):
    """Start a canary rollout of a retrained version that passes its gate."""

    enabled: bool = False
    policy: str | dict[str, Any] = Field("canary", description="configs/rollouts/NAME.yaml, a path, or inline.")
    target: str = "all"
    artifact: Literal["int8", "float"] = Field("int8", description="int8: only when the quantization gate accepted one.")
    min_accuracy: float = Field(0.0, ge=0.0, le=1.0, description="Held-out accuracy the version needs.")


class TrainingSettings(_Settings):
    enabled: bool = Field(False, description="Run the drift/retraining check on the leader.")
    check_interval_s: float = Field(300.0, gt=0)
    drift_threshold: float = Field(0.2, gt=0)
    retrain_interval_s: float | None = Field(None, gt=0)
    new_labels: int | None = Field(None, ge=1, description="Retrain after this many new labeled samples.")
    window_s: float = Field(3600.0, gt=0, description="Telemetry window of a drift measurement.")
    min_samples: int = Field(50, ge=1)
    min_predictions: int = Field(100, ge=1)
    cohort_tag: str | None = None
    recipes_dir: Path = Path("configs/recipes")
    models: dict[str, TrainedModelSettings] = Field(default_factory=dict)
    auto_canary: AutoCanarySettings = AutoCanarySettings()
# <<< TRAINING SETTINGS


class DesiredSettings(_Settings):
    #: Lifetime of every desired document (s); the leader re-issues each one when a third
    #: of it is left. None: documents do not expire.
    ttl_s: int | None = Field(None, ge=2, description="Desired-state lifetime (s); empty: no expiry.")

    @field_validator("ttl_s", mode="before")
    @classmethod
    def _ttl_empty(cls, v: Any) -> Any:
        return None if v in ("", None) else v


class CloudConfig(_Settings):
    """Settings of one coordinator. Build with :func:`load_cloud_config` or directly."""

    broker_url: str = "mqtt://127.0.0.1:1883"
    #: mqtts:// only: the CA and the coordinator's client certificate (``edgeml ca coordinator``).
    broker_tls: TLSFiles = TLSFiles()
    db: str = DEFAULT_DB
    http_addr: str = DEFAULT_HTTP_ADDR
    #: Base URL devices download artifacts from (desired states carry absolute URLs);
    #: None: ``http://{http_addr}`` with the port actually bound (see :meth:`public_base`).
    public_url: str | None = None
    artifact_dir: Path = Path("edgeml-artifacts")
    signing_key: Path | None = None
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    max_upload_bytes: int = Field(1 << 30, ge=1024)
    broker_wait_s: float = Field(10.0, ge=0)
    ingest: IngestSettings = IngestSettings()  # type: ignore[valid-type]
    metrics: MetricsSettings = MetricsSettings()
    training: TrainingSettings = TrainingSettings()
    auth: AuthSettings = AuthSettings()
    desired: DesiredSettings = DesiredSettings()

    @field_validator("broker_url")
    @classmethod
    def _broker(cls, v: str) -> str:
        parse_broker_url(v)
        return v

    @field_validator("db")
    @classmethod
    def _db(cls, v: str) -> str:
        scheme = urlsplit(v).scheme
        if not v.strip():
            raise ValueError("empty; give a SQLite path or a postgresql:// URL")
        if scheme not in ("", "sqlite", "postgresql", "postgres"):
            raise ValueError(f"use a SQLite path, sqlite:///path or postgresql://..., got {v!r}")
        return v

    @field_validator("http_addr")
    @classmethod
    def _http_addr(cls, v: str) -> str:
        parse_host_port(v)
        return v

    @field_validator("public_url", mode="before")
    @classmethod
    def _public_url_empty(cls, v: Any) -> Any:
        return None if v in ("", None) else v

    @field_validator("public_url")
    @classmethod
    def _public_url(cls, v: str | None) -> str | None:
        if v is None:
            return None
        parts = urlsplit(v)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"use http://host[:port][/prefix] or https://..., got {v!r}")
        if parts.query or parts.fragment:
            raise ValueError(f"no query or fragment allowed, got {v!r}")
        return v.rstrip("/")

    @field_validator("signing_key", mode="before")
    @classmethod
    def _signing_key_empty(cls, v: Any) -> Any:
        return None if v in ("", None) else v

    @field_validator("signing_key")
    @classmethod
    def _signing_key(cls, v: Path | None) -> Path | None:
        if v is None:
            return None
        from edgeml._exceptions import SignatureError
        from edgeml.protocol.signing import load_private_key

        if not v.is_file():
            raise ValueError(f"no key file {v} (create one with: edgeml keys generate --out DIR)")
        try:
            load_private_key(v)
        except (SignatureError, OSError) as exc:
            raise ValueError(f"{v} is not an ed25519 private key: {exc}") from exc
        return v

    @property
    def http_host_port(self) -> tuple[str, int]:
        return parse_host_port(self.http_addr)

    def public_base(self, bound: tuple[str, int] | None = None) -> str:
        """Base of the artifact URLs given to devices: ``public_url``, else derived from
        ``http_addr`` (with the ``bound`` port when ``http_addr`` ends in ``:0``)."""
        if self.public_url is not None:
            return self.public_url
        host, port = self.http_host_port
        if bound is not None:
            port = bound[1]
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    @property
    def store_url(self) -> str:
        return self.db

    def ingest_config(self) -> IngestConfig:
        return IngestConfig(broker_url=self.broker_url, tls=self.broker_tls, **self.ingest.model_dump())


def _env_overrides(env: Mapping[str, str]) -> tuple[dict[str, Any], dict[str, str]]:
    data: dict[str, Any] = {}
    origin: dict[str, str] = {}
    sections = {k for k, f in CloudConfig.model_fields.items() if isinstance(f.default, BaseModel)}
    for var, value in env.items():
        if var in ENV_KEYS:
            data[ENV_KEYS[var]] = value
            origin[ENV_KEYS[var]] = var
        elif var.startswith(ENV_PREFIX) and "__" in var:
            section, key = var[len(ENV_PREFIX):].lower().split("__", 1)
            if section in sections and key:
                data.setdefault(section, {})[key] = value
                origin[f"{section}.{key}"] = var
    return data, origin


def load_cloud_config(path: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None) -> CloudConfig:
    """Load settings from a YAML file (optional) and the environment (which wins).

    Raises :class:`InvalidSetting` naming the first bad key and why it is bad.
    """
    env = os.environ if env is None else env
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = _read_yaml(Path(path))
        except _AgentConfigError as exc:
            raise InvalidSetting(exc.key, exc.reason) from None
    overrides, origin = _env_overrides(env)
    data = _merge(data, overrides)
    try:
        check_text(data, origin)
    except _AgentConfigError as exc:
        raise InvalidSetting(exc.key, exc.reason) from None
    try:
        return CloudConfig.model_validate(data)
    except ValidationError as exc:
        raise InvalidSetting(*describe_error(exc, origin)) from None
