"""Hardware profiles: what a device is and what budgets its models must meet.

A profile is named by ``hardware_profile`` in the agent's settings and looked up as a
YAML file: a path, else ``{data_dir}/hardware/{name}.yaml``, else the profiles shipped
with edgeml (``configs/hardware/``: rpi4, jetson-orin-nano, x86-gateway). The agent
reports the profile name; the update health check and probation use its budgets when
the settings give none, and its threads when ``runtime.threads`` is not set.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ._exceptions import ConfigError

SHIPPED = Path(__file__).resolve().parent / "hardware"


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Cpu(_Frozen):
    arch: str
    cores: int = Field(ge=1)
    model: str = ""
    mhz: int | None = None


class Accelerator(_Frozen):
    kind: Literal["gpu", "npu", "tpu", "dsp"]
    model: str
    memory_mb: int | str | None = None


class RuntimePrefs(_Frozen):
    preferred: Literal["onnx", "litert"] = "onnx"
    threads: int = Field(1, ge=1, le=64)


class Budgets(_Frozen):
    latency_ms: float | None = Field(None, gt=0)
    probation_p95_ms: float | None = Field(None, gt=0)
    memory_mb: int | None = Field(None, ge=1)


class HardwareProfile(_Frozen):
    name: str
    description: str = ""
    cpu: Cpu
    ram_mb: int = Field(ge=16)
    accelerators: list[Accelerator] = []
    runtime: RuntimePrefs = RuntimePrefs()
    budgets: Budgets = Budgets()


def shipped_profiles() -> list[str]:
    return sorted(p.stem for p in SHIPPED.glob("*.yaml"))


def load_profile(name: str, data_dir: Path | None = None) -> HardwareProfile:
    """Find and validate a profile; ConfigError names the problem."""
    candidates = [Path(name)] if name.endswith((".yaml", ".yml")) else []
    if data_dir is not None:
        candidates.append(Path(data_dir) / "hardware" / f"{name}.yaml")
    candidates.append(SHIPPED / f"{name}.yaml")
    for path in candidates:
        if path.is_file():
            return _read(path)
    raise ConfigError("hardware_profile", f"no profile {name!r} (shipped: {', '.join(shipped_profiles())})")


def _read(path: Path) -> HardwareProfile:
    import yaml  # only when a profile is read

    try:
        data: Any = yaml.safe_load(path.read_text())
        return HardwareProfile.model_validate(data)
    except yaml.YAMLError as exc:
        raise ConfigError("hardware_profile", f"{path} is not valid YAML") from exc
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise ConfigError("hardware_profile", f"{path}: {where}: {err['msg']}") from None
