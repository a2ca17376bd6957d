"""The agent speaks sd_notify: READY, WATCHDOG while alive, STOPPING."""

from __future__ import annotations

import socket
from pathlib import Path

from .conftest import wait_until


def test_agent_notifies_systemd(models: dict[str, Path], tmp_path: Path, agent_process) -> None:
    address = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(address))
    sock.setblocking(False)
    messages: list[str] = []

    def drain() -> list[str]:
        """What has arrived so far (the watchdog keeps sending: never wait for silence)."""
        while True:
            try:
                messages.append(sock.recv(4096).decode())
            except BlockingIOError:
                return messages

    try:
        agent = agent_process(EDGEML_MODEL_PATH=models["onnx_float"], NOTIFY_SOCKET=str(address),
                              WATCHDOG_USEC="200000").start()
        wait_until(lambda: "READY=1" in drain(), 20, what="READY=1")
        before = messages.count("WATCHDOG=1")
        # every 0.1 s while alive: two more soon (a fixed 0.6 s pause failed when the machine was busy)
        wait_until(lambda: drain().count("WATCHDOG=1") >= before + 2, 10, what="two more WATCHDOG=1")
        agent.stop()
        wait_until(lambda: "STOPPING=1" in drain(), 10, what="STOPPING=1")
    finally:
        sock.close()
