"""Heap tuning of the agent process (glibc): trimming after bursts, a fixed mmap threshold."""

from __future__ import annotations

import ctypes.util
import time
from pathlib import Path

import numpy as np
import pytest

from edgeml import Agent, AgentConfig, _memory
from edgeml.buffer import TelemetryBuffer

glibc = pytest.mark.skipif(ctypes.util.find_library("c") is None or not hasattr(ctypes.CDLL(None), "malloc_trim"),
                           reason="glibc only")


@glibc
def test_release_and_tune_work_on_glibc(monkeypatch: pytest.MonkeyPatch) -> None:
    assert _memory.release() is True
    monkeypatch.setattr(_memory, "_tuned", False)
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    assert _memory.tune() is True and _memory._tuned is True
    assert _memory.tune() is True  # once per process


def test_tune_leaves_an_operators_choice_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    monkeypatch.setattr(_memory, "_tuned", False)
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    monkeypatch.setattr(ctypes, "CDLL", lambda *a: calls.append(a))  # would fail if reached
    assert _memory.tune() is True and calls == []


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


def test_the_agent_tunes_malloc_unless_told_not_to(tmp_path: Path, models: dict[str, Path],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    monkeypatch.setattr(_memory, "tune", lambda: calls.append(1) or True)
    quiet = {"browse": False, "announce": False}
    with Agent(AgentConfig(device_id="d1", data_dir=tmp_path / "a", discovery=quiet)):
        pass
    with Agent(AgentConfig(device_id="d1", data_dir=tmp_path / "b", discovery=quiet, runtime={"tune_malloc": False})):
        pass
    assert calls == [1]
