"""Rollout policies: frozen, validated once, loaded from YAML (``configs/rollouts/``).

A policy says how far each step goes, how long it dwells, which gates judge it and
what each verdict does::

    steps: [5, 25, 100]          # percent of the targets in the canary cohort
    min_dwell_s: 300             # at least this long per step before a decision
    confidence: 0.95             # of every statistical test (alpha = 1 - confidence)
    gates:
      - {metric: latency_p95, threshold: 0.10, min_samples: 200}   # p95 may grow <= 10 %
      - {metric: error_rate, threshold: 0.01}                        # +1 point at most
      - {metric: psi, threshold: 0.2}                                # top1 distribution shift
      - {metric: shadow_agreement, threshold: 0.95}                  # shadow rollouts
      - {metric: health, threshold: 0}                               # device rollbacks allowed
    on_fail: rollback            # rollback | pause
    on_inconclusive: wait        # wait | pause
    inconclusive_timeout_s: null # after this long inconclusive: pause (null: wait forever)
    approval: {before_start: false, before_full: false}

What a gate's ``threshold`` means depends on its metric (see :data:`GATE_DOC`). A gate
fails only when the difference is both statistically significant at ``confidence``
and larger than the threshold (Kayenta's rule: significant *and* material); too few
samples on either side gives ``inconclusive``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .._exceptions import PolicyError

Metric = Literal["latency_p95", "error_rate", "psi", "shadow_agreement", "health"]
Strategy = Literal["canary", "phased", "bluegreen", "ab", "shadow"]
STRATEGIES: tuple[str, ...] = ("canary", "phased", "bluegreen", "ab", "shadow")

GATE_DOC: dict[str, str] = {
    "latency_p95": "fail if canary latency is larger than the baseline's grown by threshold (one-sided "
                   "Mann-Whitney U against baseline x (1 + threshold), p < 1-confidence) and its p95 grew by "
                   "more than threshold (relative, 0.10 = 10 %)",
    "error_rate": "fail if the canary error rate exceeds the baseline's by more than threshold (absolute), "
                  "significantly (one-sided z-test of H0: difference <= threshold)",
    "psi": "fail if the PSI of the canary's top1 distribution against the baseline's exceeds threshold",
    "shadow_agreement": "fail if the upper confidence bound of shadow top1 agreement is below threshold",
    "health": "fail if more than threshold canary devices rolled the update back or failed it",
}


class Gate(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    metric: Metric
    threshold: float = Field(description="meaning depends on the metric: see GATE_DOC")
    min_samples: int | None = Field(None, ge=1, description="per side; null: the policy's min_samples")


class Approval(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    before_start: bool = False
    before_full: bool = Field(False, description="before the step that reaches 100 %")


class Policy(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    steps: tuple[float, ...] = (5.0, 25.0, 100.0)
    min_dwell_s: float = Field(300.0, ge=0)
    confidence: float = Field(0.95, gt=0.5, lt=1.0)
    min_samples: int = Field(200, ge=1)
    gates: tuple[Gate, ...] = (
        Gate(metric="latency_p95", threshold=0.10),
        Gate(metric="error_rate", threshold=0.01),
        Gate(metric="psi", threshold=0.2),
        Gate(metric="health", threshold=0),
    )
    on_fail: Literal["rollback", "pause"] = "rollback"
    on_inconclusive: Literal["wait", "pause"] = "wait"
    inconclusive_timeout_s: float | None = Field(None, gt=0)
    approval: Approval = Approval()

    @field_validator("steps")
    @classmethod
    def _steps_grow(cls, steps: tuple[float, ...]) -> tuple[float, ...]:
        if not steps:
            raise ValueError("at least one step is needed")
        if any(not 0 < s <= 100 for s in steps):
            raise ValueError("every step is a percentage in (0, 100]")
        if list(steps) != sorted(set(steps)):
            raise ValueError("steps must strictly grow")
        return steps

    @property
    def alpha(self) -> float:
        return 1.0 - self.confidence

    def samples_for(self, gate: Gate) -> int:
        return gate.min_samples or self.min_samples


def parse_policy(data: Any, *, source: str = "policy", **overrides: Any) -> Policy:
    """A :class:`Policy` from a mapping; :class:`PolicyError` naming the bad key."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise PolicyError(f"{source}: a policy is a mapping, got {type(data).__name__}")
    merged = {**data, **{k: v for k, v in overrides.items() if v is not None}}
    merged.pop("strategy", None)  # documentation in the YAML files; the caller picks the strategy
    try:
        return Policy.model_validate(merged)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(policy)"
        raise PolicyError(f"{source}: {where}: {first['msg']}") from None


def load_policy(path: str | Path, **overrides: Any) -> Policy:
    """Read a YAML policy file (``configs/rollouts/*.yaml``)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise PolicyError(f"cannot read policy {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise PolicyError(f"policy {path} is not valid YAML: {exc}") from exc
    return parse_policy(data, source=str(path), **overrides)
