"""Giving heap memory back after bursts (glibc's malloc_trim)."""

from __future__ import annotations

import ctypes.util
import os
import subprocess
import sys
import textwrap
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


def test_the_tail_of_a_burst_is_trimmed_when_it_ends_but_a_trickle_is_not(monkeypatch: pytest.MonkeyPatch) -> None:
    trims = []
    monkeypatch.setattr(_memory, "release", lambda: trims.append(1) or True)
    trimmer = _memory.Trimmer()
    trimmer.pending = _memory.TRIM_AFTER_RECORDS
    assert trimmer.idle(burst_s=2.0) is True  # mid-burst: enough records
    trimmer.pending, trimmer.last = 300, time.monotonic()  # the burst's last records, right after that trim
    assert trimmer.idle(burst_s=2.0) is True and trims == [1, 1]
    assert trimmer.idle(burst_s=2.0) is False  # nothing new since
    trimmer.pending, trimmer.last = 5, time.monotonic() - 10  # a trickle, long after the burst
    assert trimmer.idle(burst_s=2.0) is False and trimmer.idle() is False and trims == [1, 1]


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


#: Counts the C allocator's arenas (glibc's malloc_info) while six threads that each
#: allocated are alive; argv[1] says what caps them first.
_ARENAS = textwrap.dedent("""
    import ctypes, os, sys, tempfile, threading

    from edgeml import _memory

    how = sys.argv[1]
    if how == "limit":
        print("set", _memory.limit_arenas(2))
    elif how.startswith("agent"):
        from edgeml import Agent, AgentConfig

        arenas = int(how.removeprefix("agent"))
        Agent(AgentConfig(device_id="arenas", data_dir=sys.argv[2], api_addr="127.0.0.1:0",
                          runtime={"malloc_arenas": arenas},
                          discovery={"browse": False, "announce": False})).start()
    barrier, done = threading.Barrier(7), threading.Event()

    def work():
        keep = [bytes(bytearray(4000)) for _ in range(50)]  # over pymalloc's 512 bytes: malloc
        barrier.wait()
        done.wait()

    threads = [threading.Thread(target=work) for _ in range(6)]
    for t in threads:
        t.start()
    barrier.wait()
    libc = ctypes.CDLL(None)
    libc.fopen.restype = ctypes.c_void_p
    libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
    libc.fclose.argtypes = [ctypes.c_void_p]
    fd, path = tempfile.mkstemp()
    os.close(fd)
    out = libc.fopen(path.encode(), b"w")
    libc.malloc_info(0, out)
    libc.fclose(out)
    print("heaps", open(path).read().count("<heap nr="))
    os.unlink(path)
    done.set()
    os._exit(0)  # the agent's threads are daemons; nothing to flush
""")


def _arenas(how: str, tmp_path: Path, **env: str) -> dict[str, str]:
    run = subprocess.run([sys.executable, "-c", _ARENAS, how, str(tmp_path / how)], capture_output=True, text=True,
                         timeout=120, env={k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"} | env)
    assert run.returncode == 0, run.stderr
    return dict(line.split() for line in run.stdout.splitlines())


@glibc
def test_limit_arenas_caps_the_arenas_of_threads(tmp_path: Path) -> None:
    assert int(_arenas("none", tmp_path)["heaps"]) > 2  # glibc's default: an arena per new thread
    capped = _arenas("limit", tmp_path)
    assert capped["set"] == "True" and int(capped["heaps"]) <= 2


@glibc
def test_the_agent_caps_arenas_as_configured(tmp_path: Path) -> None:
    assert int(_arenas("agent1", tmp_path)["heaps"]) == 1
    assert int(_arenas("agent0", tmp_path)["heaps"]) > 2  # 0: glibc's default


def test_the_environment_and_zero_leave_glibc_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    assert _memory.limit_arenas(0) is False
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert _memory.limit_arenas(2) is False


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
