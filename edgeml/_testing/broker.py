"""A private Mosquitto on a free port, for tests, benchmarks and the demo."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

from .._exceptions import EdgemlError

#: Ports handed out by this process. A port asked for is only reserved once its user binds
#: it; until then the OS may hand the same port to the next caller (a rig takes one for the
#: agent, then its broker, proxy and coordinator take theirs): never give one out twice.
_given: set[int] = set()
_given_lock = threading.Lock()


def free_port() -> int:
    """A loopback TCP port nobody listens on now, and not given out before by this process."""
    with _given_lock:
        while True:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            if port not in _given:
                _given.add(port)
                return port


class MosquittoBroker:
    """Persistent (survives its own restarts), no queue limits, loopback only.

    Mosquitto's default ``max_queued_messages 1000`` silently drops messages for slow
    subscribers; this configuration lifts it.
    """

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        if shutil.which("mosquitto") is None:
            raise EdgemlError("Mosquitto is not on the PATH (apt install mosquitto)")
        self.port = port or free_port()
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.conf = self.dir / "mosquitto.conf"
        self.conf.write_text(
            f"listener {self.port} 127.0.0.1\n"
            "allow_anonymous true\n"
            "persistence true\n"
            f"persistence_location {self.dir}/\n"
            "max_queued_messages 0\n"
            "max_queued_bytes 0\n"
            "max_inflight_messages 0\n"
            "log_dest stderr\n"
            "log_type error\n"
            # as root, Mosquitto switches to the 'mosquitto' user, which cannot write the
            # persistence file into our private directory: sessions would silently not
            # survive a broker restart. Stay root (the setting is ignored for other users).
            + ("user root\n" if os.geteuid() == 0 else "")
        )
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> MosquittoBroker:
        self.proc = subprocess.Popen(
            ["mosquitto", "-c", str(self.conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return self
            except OSError:
                time.sleep(0.05)
        raise EdgemlError(f"mosquitto did not listen on port {self.port}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None:
            self.proc.send_signal(sig)
            self.proc.wait(10)
            self.proc = None


class EmbeddedBroker:
    """A Python MQTT 3.1.1 broker (amqtt) in a child process, for machines without
    Mosquitto: the demo falls back to it. Same interface as :class:`MosquittoBroker`; no
    persistence (a restart loses sessions), loopback only. A child process, not a thread:
    in the demo's process it would share the GIL with twenty agents and the coordinator."""

    def __init__(self, workdir: Path | None = None, port: int | None = None) -> None:
        import importlib.util

        if importlib.util.find_spec("amqtt") is None:
            raise EdgemlError("no MQTT broker: install Mosquitto (apt install mosquitto) "
                              "or the amqtt package (pip install amqtt)")
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> EmbeddedBroker:
        import sys

        self.proc = subprocess.Popen([sys.executable, "-c", _AMQTT_MAIN, str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return self
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise EdgemlError(f"the embedded MQTT broker (amqtt) did not listen on port {self.port}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
            self.proc = None


_AMQTT_MAIN = """
import asyncio, logging, signal, sys
from amqtt.broker import Broker
logging.basicConfig(level=logging.ERROR)
async def main():
    broker = Broker({"listeners": {"default": {"type": "tcp", "bind": "127.0.0.1:" + sys.argv[1]}},
                     "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}}})
    await broker.start()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await broker.shutdown()
asyncio.run(main())
"""


def start_broker(workdir: Path) -> MosquittoBroker | EmbeddedBroker:
    """Mosquitto when it is on the PATH, else the embedded broker."""
    if shutil.which("mosquitto") is not None:
        return MosquittoBroker(workdir).start()
    return EmbeddedBroker(workdir).start()
