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
      - {metric: accuracy, threshold: 0.02}                          # -2 points at most (feedback)
      - {metric: health, threshold: 0}                               # device rollbacks allowed
    windows: ["Mon-Fri 01:00-05:00 UTC"]  # deploy only then (empty: any time)
    on_fail: rollback            # rollback | pause
    on_inconclusive: wait        # wait | pause
    inconclusive_timeout_s: null # after this long inconclusive: pause (null: wait forever)
    approval: {before_start: false, before_full: false}
    hil: {required: false, scenarios: null, hardware_profiles: null}  # HIL gate before the start
    test: fixed                  # each test judged once, at its min_samples (or sequential: always-valid p-values)

What a gate's ``threshold`` means depends on its metric (see :data:`GATE_DOC`). A gate
fails only when the difference is both statistically significant at ``confidence``
and larger than the threshold (Kayenta's rule: significant *and* material); too few
samples on either side gives ``inconclusive``.

``windows`` restricts when the engine writes a step's documents (the start, each
promotion, a blue/green flip); outside every window a rollout due to deploy waits and
its status says until when. Rollbacks are never held back. A window is a string
``"DAYS HH:MM-HH:MM TZ"`` (days ``Mon-Fri``, ``Sat,Sun``, ``*``/``daily``; the zone
defaults to UTC) or a mapping ``{days: [Mon, Tue], start: "01:00", end: "05:00",
tz: UTC}``; an end before the start crosses midnight (the days name the start).
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .._exceptions import PolicyError

Metric = Literal["latency_p95", "error_rate", "psi", "shadow_agreement", "health", "accuracy"]
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
    "accuracy": "fail if the canary's accuracy (feedback records with `correct`) is below the baseline's by more "
                "than threshold (absolute, 0.02 = 2 points), significantly (one-sided two-proportion z-test of "
                "H0: baseline - canary <= threshold, p < 1-confidence)",
}

DAYS: tuple[str, ...] = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


class Gate(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    metric: Metric
    threshold: float = Field(description="meaning depends on the metric: see GATE_DOC")
    min_samples: int | None = Field(None, ge=1, description="per side; null: the policy's min_samples")


def _day(name: str) -> int:
    try:
        return DAYS.index(name.strip().lower()[:3])
    except ValueError:
        raise ValueError(f"unknown day {name!r} (Mon..Sun)") from None


def _days(spec: str) -> list[int]:
    """``Mon-Fri``, ``Sat,Sun``, ``Fri-Mon`` (wraps), ``*`` or ``daily``."""
    if spec.strip().lower() in ("*", "daily", "all"):
        return list(range(7))
    out: list[int] = []
    for part in spec.split(","):
        first, _, last = part.partition("-")
        a = _day(first)
        b = _day(last) if last else a
        out += [(a + i) % 7 for i in range((b - a) % 7 + 1)]
    return sorted(set(out))


def _minutes(hhmm: str) -> int:
    hh, sep, mm = hhmm.strip().partition(":")
    if not sep or not hh.isdigit() or not mm.isdigit() or not (0 <= int(hh) <= 24 and 0 <= int(mm) < 60) \
            or int(hh) * 60 + int(mm) > 1440:
        raise ValueError(f"a time is HH:MM (00:00..24:00), got {hhmm!r}")
    return int(hh) * 60 + int(mm)


class Window(BaseModel):
    """A weekly maintenance window: ``days`` (0 = Monday), ``start``/``end`` as HH:MM in ``tz``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    days: tuple[int, ...] = tuple(range(7))
    start: str
    end: str
    tz: str = "UTC"

    @model_validator(mode="before")
    @classmethod
    def _parse(cls, data: Any) -> Any:
        if isinstance(data, str):  # "Mon-Fri 01:00-05:00 UTC"
            parts = data.split()
            if len(parts) not in (2, 3) or "-" not in parts[1]:
                raise ValueError(f"a window is 'DAYS HH:MM-HH:MM [TZ]', got {data!r}")
            start, _, end = parts[1].partition("-")
            data = {"days": parts[0], "start": start, "end": end, "tz": parts[2] if len(parts) == 3 else "UTC"}
        if isinstance(data, dict) and data.get("days") is not None:
            days = data["days"]
            if isinstance(days, str):
                days = _days(days)
            data = {**data, "days": tuple(_day(d) if isinstance(d, str) else int(d) for d in days)}
        return data

    @model_validator(mode="after")
    def _check(self) -> Window:
        if not self.days or any(not 0 <= d < 7 for d in self.days):
            raise ValueError("days must name at least one of Mon..Sun")
        if _minutes(self.start) == _minutes(self.end):
            raise ValueError("a window needs start != end")
        try:
            ZoneInfo(self.tz)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {self.tz!r}") from None
        return self

    def _spans(self, ts: float, days_back: int, days_ahead: int) -> list[tuple[float, float]]:
        """(open, close) Unix times of this window's occurrences around ``ts``."""
        zone = ZoneInfo(self.tz)
        today = dt.datetime.fromtimestamp(ts, zone).date()
        start, end = _minutes(self.start), _minutes(self.end)
        length = (end - start) % 1440 or 1440
        spans = []
        for offset in range(-days_back, days_ahead + 1):
            day = today + dt.timedelta(days=offset)
            if day.weekday() in self.days:
                opens = dt.datetime.combine(day, dt.time(), zone) + dt.timedelta(minutes=start)
                spans.append((opens.timestamp(), opens.timestamp() + length * 60))
        return spans

    def contains(self, ts: float) -> bool:
        return any(a <= ts < b for a, b in self._spans(ts, 1, 0))

    def next_open(self, ts: float) -> float | None:
        return min((a for a, _ in self._spans(ts, 0, 7) if a > ts), default=None)


class Approval(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    before_start: bool = False
    before_full: bool = Field(False, description="before the step that reaches 100 %")


class HilRequirement(BaseModel):
    """A hardware-in-the-loop gate before the start: ``edgeml hil run … --report URL`` records runs."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    required: bool = False
    scenarios: tuple[str, ...] | None = Field(None, description="each must have passed (null: every run recorded)")
    hardware_profiles: tuple[str, ...] | None = Field(None, description="on each of these profiles (null: any)")


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
    windows: tuple[Window, ...] = Field((), description="when steps may be deployed; empty: any time")
    on_fail: Literal["rollback", "pause"] = "rollback"
    on_inconclusive: Literal["wait", "pause"] = "wait"
    inconclusive_timeout_s: float | None = Field(None, gt=0)
    approval: Approval = Approval()
    hil: HilRequirement = HilRequirement()
    #: The engine looks at a step at every tick. fixed: each statistical gate is judged once,
    #: at the first look with its min_samples on both sides, and that verdict is kept for the
    #: step (one look per test: its p-value means what it says). sequential: re-judged at
    #: every look with always-valid p-values (mSPRT), so a regression that only shows with
    #: more data is still caught, at the price of needing more samples for the same effect.
    test: Literal["fixed", "sequential"] = "fixed"

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

    def in_window(self, ts: float) -> bool:
        """May a step be deployed at ``ts``? Always, when the policy has no windows."""
        return not self.windows or any(w.contains(ts) for w in self.windows)

    def next_window(self, ts: float) -> float | None:
        """When the next window opens after ``ts`` (None: no windows)."""
        return min((t for w in self.windows if (t := w.next_open(ts)) is not None), default=None)


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
