"""Shadow mode: a candidate model runs beside the active one on the same inputs.

Its outputs never reach callers. The cost is bounded: only a ``sample_rate`` share of the
predictions is copied to the shadow (evenly spaced: 0.1 is every tenth, 0.4 two in five),
the hand-over queue is bounded (a full queue skips, never blocks the caller), and the
worker sleeps so that the shadow uses at most ``cpu_share`` of one core. Statistics are reported as ``shadow`` telemetry records.
"""

from __future__ import annotations

import collections
import itertools
import logging
import math
import threading
import time
from typing import Any

import numpy as np

from .._models import LoadedModel, copied

log = logging.getLogger(__name__)


def _first_row(value: Any) -> np.ndarray | None:
    if isinstance(value, np.ndarray) and value.dtype.kind in "biuf" and value.size:
        return value.reshape(value.shape[0], -1) if value.ndim >= 2 else value.reshape(1, -1)
    return None


class ShadowStats:
    def __init__(self) -> None:
        self.compared = 0
        self.top1_matches = 0
        self.abs_diff_sum = 0.0
        self.abs_diff_count = 0
        self.primary_latency: list[float] = []
        self.shadow_latency: list[float] = []
        self.errors = 0
        self.skipped = 0

    def to_json(self) -> dict[str, Any]:
        def lat(values: list[float]) -> dict[str, float | None]:
            if not values:
                return {"mean": None, "p95": None}
            return {"mean": round(float(np.mean(values)), 3), "p95": round(float(np.percentile(values, 95)), 3)}

        return {
            "compared": self.compared,
            "top1_agreement": round(self.top1_matches / self.compared, 6) if self.compared else None,
            "mean_abs_diff": self.abs_diff_sum / self.abs_diff_count if self.abs_diff_count else None,
            "latency_us_primary": lat(self.primary_latency),
            "latency_us_shadow": lat(self.shadow_latency),
            "errors": self.errors,
            "skipped": self.skipped,
        }


class ShadowRunner:
    def __init__(self, model: LoadedModel, *, sample_rate: float, cpu_share: float, queue_size: int = 256) -> None:
        self.model = model
        self.sample_rate = min(max(sample_rate, 0.0), 1.0)
        self._counter = itertools.count(1)  # atomic under the GIL: offer() runs on every caller's thread
        self.cpu_share = cpu_share
        self._queue: collections.deque[tuple[dict[str, np.ndarray], LoadedModel, dict[str, Any], float]] = (
            collections.deque(maxlen=queue_size)
        )
        self._lock = threading.Lock()
        self._stats = ShadowStats()
        self._busy = False  # set before an item leaves the queue, cleared once it is counted
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._work, name="edgeml-shadow", daemon=True)
        self._thread.start()

    # predict path: a counter and, for sampled requests, one append
    def offer(self, feeds: dict[str, np.ndarray], primary: LoadedModel, outputs: dict[str, Any], latency_us: float) -> None:
        n, rate = next(self._counter), self.sample_rate
        # prediction n is sampled when floor(n * rate) moves: exactly floor(N * rate) of the first N
        # (the tolerance: 10 * 0.1 must count as 1)
        if math.floor(n * rate + 1e-9) == math.floor((n - 1) * rate + 1e-9):
            return
        if len(self._queue) == self._queue.maxlen:
            self._stats.skipped += 1
            return
        # copies: run and compared later, and the application may reuse or change its arrays
        self._queue.append((copied(feeds), primary, copied(outputs), latency_us))
        self._wake.set()

    def _work(self) -> None:
        while not self._stop.is_set():
            if not self._queue:
                self._wake.wait(0.5)
                self._wake.clear()
                continue
            self._busy = True
            feeds, primary, outputs, primary_latency = self._queue.popleft()
            t0 = time.perf_counter()
            try:
                shadow_out = self.model.runtime.run(feeds)
                elapsed = time.perf_counter() - t0
                self._compare(primary, outputs, primary_latency, shadow_out, elapsed * 1e6)
            except Exception as exc:  # a failing shadow is a finding to report, not a crash
                elapsed = time.perf_counter() - t0
                with self._lock:
                    self._stats.errors += 1
                log.debug("shadow model failed: %s", exc)
            finally:
                self._busy = False
            if self.cpu_share < 1.0:  # bound the shadow's CPU: sleep in proportion to its work
                self._stop.wait(elapsed * (1 - self.cpu_share) / self.cpu_share)

    def _compare(self, primary: LoadedModel, outputs: dict[str, Any], primary_latency: float,
                 shadow_out: dict[str, Any], shadow_latency: float) -> None:
        a = _first_row(outputs.get(primary.first_output))
        b = _first_row(shadow_out.get(self.model.first_output))
        with self._lock:
            s = self._stats
            s.compared += 1
            s.primary_latency.append(primary_latency)
            s.shadow_latency.append(shadow_latency)
            if a is not None and b is not None and a.shape == b.shape:
                s.top1_matches += int((a.argmax(axis=1) == b.argmax(axis=1)).all())
                s.abs_diff_sum += float(np.abs(a.astype(np.float64) - b.astype(np.float64)).mean())
                s.abs_diff_count += 1

    def drain(self, timeout: float = 5.0) -> None:
        """Wait until every queued comparison is done (for reports and tests)."""
        deadline = time.monotonic() + timeout
        while (self._queue or self._busy) and time.monotonic() < deadline:
            time.sleep(0.005)

    def take_stats(self) -> dict[str, Any] | None:
        """The statistics since the last call (None if nothing happened)."""
        with self._lock:
            stats, self._stats = self._stats, ShadowStats()
        if not stats.compared and not stats.errors and not stats.skipped:
            return None
        return {"shadow_model": self.model.name, "shadow_version": self.model.version, **stats.to_json()}

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(5)
