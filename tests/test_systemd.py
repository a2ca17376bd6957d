"""The agent speaks sd_notify: READY, WATCHDOG while alive, STOPPING."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest

from edgeml._systemd import watchdog_interval

from .conftest import wait_until


def test_agent_notifies_systemd(models: dict[str, Path], tmp_path: Path, agent_process) -> None:
    address = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(address))
    sock.setblocking(False)
    messages: list[str] = []
    pings: list[float] = []  # when each WATCHDOG=1 was read, if it was the only one that read found

    def drain() -> list[str]:
        """What has arrived so far (the watchdog keeps sending: never wait for silence)."""
        new = []
        while True:
            try:
                new.append(sock.recv(4096).decode())
            except BlockingIOError:
                break
        messages.extend(new)
        if new.count("WATCHDOG=1") == 1:  # pings read together queued up unread: their gap says nothing
            pings.append(time.monotonic())
        elif new.count("WATCHDOG=1") > 1:
            pings.append(float("nan"))
        return messages

    try:
        agent = agent_process(EDGEML_MODEL_PATH=models["onnx_float"], NOTIFY_SOCKET=str(address),
                              WATCHDOG_USEC="200000").start()
        wait_until(lambda: "READY=1" in drain(), 20, what="READY=1")
        before = messages.count("WATCHDOG=1")
        # every 0.1 s while alive (half of WATCHDOG_USEC): read as it arrives, the closest two of ten
        # pings are well under the unit's 0.2 s; a busy machine lengthens gaps, not the shortest one
        pings.clear()
        wait_until(lambda: drain().count("WATCHDOG=1") >= before + 10, 20, interval=0.01, what="ten more WATCHDOG=1")
        gaps = [b - a for a, b in zip(pings, pings[1:], strict=False) if a == a and b == b]  # nan: a batch
        assert gaps and min(gaps) < 0.18, pings
        agent.stop()
        wait_until(lambda: "STOPPING=1" in drain(), 10, what="STOPPING=1")
    finally:
        sock.close()


def test_the_watchdog_pings_at_half_the_units_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    monkeypatch.setenv("WATCHDOG_USEC", "200000")
    assert watchdog_interval() == 0.1
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    assert watchdog_interval() == 15.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))  # meant for another process
    assert watchdog_interval() is None
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    monkeypatch.setenv("WATCHDOG_USEC", "soon")
    assert watchdog_interval() is None
    monkeypatch.delenv("WATCHDOG_USEC")
    assert watchdog_interval() is None
