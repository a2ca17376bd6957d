"""Replaying the recorded input set through the agent's local HTTP API at a fixed rate."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import httpx
import numpy as np

from ._data import RecordedSet


@dataclass(frozen=True, slots=True)
class Sample:
    t: float  # seconds since the run started
    ms: float  # round trip as the application sees it; NaN when the call failed
    ok: bool
    inference_ms: float  # as the agent measured it (latency_us); NaN when the call failed
    correct: bool
    version: str | None


@dataclass
class Phase:
    """One stretch of replay: a ``replay`` step, or the traffic during a fault."""

    label: str
    kind: str  # replay | fault
    start: float
    end: float = 0.0
    samples: list[Sample] = field(default_factory=list)

    @property
    def answered(self) -> list[Sample]:
        return [s for s in self.samples if s.ok]

    def p(self, q: float, inference: bool = True) -> float | None:
        """Percentile of the agent's inference latency (or of the round trip)."""
        ms = [s.inference_ms if inference else s.ms for s in self.answered]
        return float(np.percentile(ms, q)) if ms else None

    @property
    def accuracy(self) -> float | None:
        answered = self.answered
        return sum(s.correct for s in answered) / len(answered) if answered else None

    @property
    def error_rate(self) -> float:
        return 1 - len(self.answered) / len(self.samples) if self.samples else 0.0

    def summary(self) -> dict[str, float | int | str | None]:
        p50, p95, rt95, acc = self.p(50), self.p(95), self.p(95, inference=False), self.accuracy
        r = lambda v: None if v is None else round(v, 3)  # noqa: E731
        return {"label": self.label, "kind": self.kind, "requests": len(self.samples), "answered": len(self.answered),
                "p50_ms": r(p50), "p95_ms": r(p95), "round_trip_p95_ms": r(rt95),
                "accuracy": None if acc is None else round(acc, 4), "error_rate": round(self.error_rate, 4)}


class Replayer:
    """Paced calls to ``POST /v1/predict``, one row of the set per call, in a loop."""

    def __init__(self, api: str, recorded: RecordedSet, t0: float) -> None:
        self.api = api
        self.recorded = recorded
        self.t0 = t0
        self._next = 0

    def run(self, phase: Phase, seconds: float, rate: float, stop: threading.Event | None = None) -> Phase:
        interval = 1.0 / rate
        start = time.monotonic()
        with httpx.Client(base_url=self.api, timeout=2.0) as client:
            i = 0
            while True:
                due = start + i * interval
                now = time.monotonic()
                if now - start >= seconds or (stop is not None and stop.is_set()):
                    break
                if due > now:
                    time.sleep(due - now)
                phase.samples.append(self._one(client))
                i += 1
        phase.end = time.monotonic() - self.t0
        return phase

    def _one(self, client: httpx.Client) -> Sample:
        k = self._next % len(self.recorded)
        self._next += 1
        row = self.recorded.inputs[k : k + 1].tolist()
        t = time.monotonic()
        try:
            r = client.post("/v1/predict", json={"inputs": {"input": row}})
            ms = (time.monotonic() - t) * 1000
            if r.status_code != 200:
                return Sample(t - self.t0, float("nan"), False, float("nan"), False, None)
            body = r.json()
        except (httpx.HTTPError, ValueError):
            return Sample(t - self.t0, float("nan"), False, float("nan"), False, None)
        probs = next(iter(body["outputs"].values()))
        correct = int(np.argmax(probs[0])) == int(self.recorded.labels[k])
        return Sample(t - self.t0, ms, True, float(body.get("latency_us", 0)) / 1000, correct, body.get("version"))


class Background:
    """A replay on its own thread, for the length of a fault."""

    def __init__(self, replayer: Replayer, phase: Phase, rate: float) -> None:
        self.phase = phase
        self._stop = threading.Event()
        self._thread = threading.Thread(target=replayer.run, args=(phase, 3600.0, rate, self._stop),
                                        name="hil-replay", daemon=True)

    def __enter__(self) -> Background:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)
