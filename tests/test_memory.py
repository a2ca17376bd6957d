"""Giving heap memory back after bursts (glibc's malloc_trim)."""

from __future__ import annotations

import ctypes.util
import time
from pathlib import Path

import numpy as np
import pytest

from edgeml import _memory
from edgeml.buffer import TelemetryBuffer

glibc = pytest.mark.skipif(ctypes.util.find_library("c") is None or not hasattr(ctypes.CDLL(None), "malloc_trim"),
                           reason="glibc only")


@glibc
def test_release_works_on_glibc() -> None:
    assert _memory.release() is True


def test_trimmer_trims_only_after_enough_records(monkeypatch: pytest.MonkeyPatch) -> None:
    trims = []
    monkeypatch.setattr(_memory, "release", lambda: trims.append(1) or True)
    trimmer = _memory.Trimmer()
    trimmer.pending = _memory.TRIM_AFTER_RECORDS - 1
    assert trimmer.idle() is False and trims == []
    trimmer.pending += 1
    assert trimmer.idle() is True and trims == [1] and trimmer.pending == 0
    assert trimmer.idle() is False  # nothing new since


def test_the_flusher_trims_when_idle_after_a_burst(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    trims = []
    monkeypatch.setattr(_memory, "release", lambda: trims.append(1) or True)
    with TelemetryBuffer(tmp_path / "t.db", flush_interval_ms=10) as buf:
        buf.start()
        out = np.zeros((1, 3), np.float32)
        for _ in range(_memory.TRIM_AFTER_RECORDS + 10):
            buf.append_prediction("m", "1", 1.0, "probs", out)
        for _ in range(200):
            if trims:
                break
            time.sleep(0.01)
    assert trims == [1]


def test_process_stats_from_the_standard_library() -> None:
    import resource

    from edgeml._process import CpuMeter, rss_bytes

    meter = CpuMeter()
    rss = rss_bytes()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    assert 10 * 2**20 < rss <= peak + 2**20
    block = bytearray(64 * 2**20)  # touched: resident
    block[:: 4096] = b"x" * len(block[:: 4096])
    assert rss_bytes() >= rss + 60 * 2**20
    del block
    meter.percent()  # from here on
    cpu0, wall0 = time.process_time(), time.monotonic()
    while time.process_time() < cpu0 + 0.3:  # busy: one core, however loaded the machine is
        pass
    measured = meter.percent()
    expected = 100.0 * (time.process_time() - cpu0) / (time.monotonic() - wall0)
    assert measured > 5.0 and abs(measured - expected) <= 0.2 * expected, (measured, expected)
