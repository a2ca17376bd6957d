"""Scenario files: YAML validated by pydantic; a bad file names the key.

    name: broker-restart
    description: the broker goes away mid-stream and comes back
    hardware_profile: x86-gateway        # its budgets apply when the scenario sets none
    model: {name: iris-mlp, version: 1.0.0}
    dataset: iris                        # hil/data/iris.npz, or a path to an .npz
    budgets: {latency_p95_ms: 40, accuracy: 0.9, recover_s: 20}
    agent: {EDGEML_MQTT__KEEPALIVE_S: 5} # extra agent settings (environment form)
    steps:
      - replay: {seconds: 2, rate: 50}
      - fault: {kind: broker_restart, down_s: 1}
      - replay: {seconds: 2, rate: 50}

Invariants (no telemetry lost, a verified model, healthy again) run after every
``fault`` step and at the end.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ._exceptions import ScenarioError

SHIPPED = Path(__file__).resolve().parent / "scenarios"
DATA = Path(__file__).resolve().parent / "data"

FaultKind = Literal[
    "partition", "drop_connections", "delay", "throttle", "packet_loss", "broker_restart", "kill_agent",
    "power_cut_update", "full_disk", "corrupt_artifact", "clock_skew",
]
#: Update states at which a power cut can be injected (edgeml.updates crash points).
CRASH_POINTS = ("downloading", "verifying", "installing", "switching", "probation", "rolling_back")


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ModelSpec(_Frozen):
    """A model built from the dataset's recorded weights. ``variant: broken`` swaps the
    output classes (it loads, passes the health check and answers, all wrong)."""

    name: str = "iris-mlp"
    version: str = "1.0.0"
    variant: Literal["good", "broken"] = "good"

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"


class Budgets(_Frozen):
    latency_p95_ms: float | None = Field(None, gt=0, description="default: the profile's probation_p95_ms")
    accuracy: float | None = Field(None, ge=0, le=1)
    recover_s: float = Field(20.0, gt=0, description="bound for the agent to be healthy again after a fault")
    max_error_rate: float = Field(0.0, ge=0, le=1, description="failed predictions allowed outside fault windows")


class Replay(_Frozen):
    seconds: float = Field(gt=0, le=120)
    rate: float = Field(50.0, gt=0, le=2000, description="predictions per second")
    label: str | None = None


class Fault(_Frozen):
    kind: FaultKind
    seconds: float = Field(2.0, ge=0, le=120, description="how long the fault lasts (network, disk, broker)")
    rate: float = Field(20.0, gt=0, description="predictions per second replayed during the fault")
    delay_ms: float = Field(200.0, ge=0)
    bytes_per_s: int = Field(2048, ge=64)
    loss: float = Field(0.1, gt=0, le=1, description="packet_loss: share of forwarded chunks that reset the connection")
    at: str = Field("switching", description="power_cut_update: the update state to cut power in")
    candidate: ModelSpec | None = Field(None, description="model deployed during the fault (updates)")
    offset: str = Field("+6h", description="clock_skew: offset of the agent's wall clock (+6h, -90m, +30s)")
    expect_model: Literal["primary", "candidate"] | None = Field(
        None, description="which model the device must run after the fault (default: primary)")

    @model_validator(mode="after")
    def _check(self) -> Fault:
        if self.kind == "power_cut_update" and self.at not in CRASH_POINTS:
            raise ValueError(f"at must be one of {', '.join(CRASH_POINTS)}")
        if self.kind in ("power_cut_update", "corrupt_artifact") and self.candidate is None:
            raise ValueError(f"{self.kind} needs a candidate model")
        return self


class Deploy(_Frozen):
    model: ModelSpec
    expect: Literal["applied", "rolled_back", "rejected"] = "applied"
    within_s: float = Field(40.0, gt=0, description="bound for the update to end")


class Step(_Frozen):
    replay: Replay | None = None
    fault: Fault | None = None
    deploy: Deploy | None = None

    @model_validator(mode="after")
    def _one(self) -> Step:
        given = [k for k in ("replay", "fault", "deploy") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("each step is exactly one of replay, fault, deploy")
        return self

    @property
    def kind(self) -> str:
        return "replay" if self.replay else "fault" if self.fault else "deploy"


class Scenario(_Frozen):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9._-]{1,64}$")]
    description: str = ""
    hardware_profile: str = "x86-gateway"
    model: ModelSpec = ModelSpec()
    dataset: str = "iris"
    budgets: Budgets = Budgets()
    agent: dict[str, str | int | float | bool] = Field(default_factory=dict)
    steps: list[Step] = Field(min_length=1)

    def dataset_path(self) -> Path:
        path = Path(self.dataset)
        return path if path.suffix == ".npz" else DATA / f"{self.dataset}.npz"


def shipped_scenarios() -> list[str]:
    return sorted(p.stem for p in SHIPPED.glob("*.yaml"))


def find_scenario(ref: str) -> Path:
    """A path to a YAML file, or the name of a shipped scenario."""
    path = Path(ref)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ScenarioError(f"no scenario file {path}")
        return path
    shipped = SHIPPED / f"{ref}.yaml"
    if not shipped.is_file():
        raise ScenarioError(f"no scenario {ref!r} (shipped: {', '.join(shipped_scenarios())})")
    return shipped


def load_scenario(ref: str | Path) -> Scenario:
    path = find_scenario(str(ref))
    try:
        data: Any = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ScenarioError(f"{path} is not valid YAML: {exc}") from None
    return parse_scenario(data, str(path))


def parse_scenario(data: Any, where: str = "scenario") -> Scenario:
    try:
        return Scenario.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        raise ScenarioError(f"{where}: {key}: {err['msg']}") from None
