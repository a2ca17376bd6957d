"""A TCP fault proxy between the agent and the broker.

    proxy = FaultProxy(("127.0.0.1", broker_port)).start()   # the agent dials proxy.port
    proxy.set_fault("blackhole")      # partition: bytes stop flowing both ways
    proxy.set_fault("drop")           # every connection reset, new ones refused
    proxy.set_fault("delay", delay_ms=300)
    proxy.set_fault("throttle", bytes_per_s=2048)
    proxy.set_fault("loss", loss=0.1) # a forwarded chunk resets its connection with p=0.1
    proxy.clear()

It works on the byte stream, not on packets: TCP hides lost segments behind
retransmission, so what an MQTT session sees of a lossy link is stalls and resets.
``loss`` models the resets (the session must reconnect and resend unacknowledged
messages); ``delay`` and ``blackhole`` model the stalls. Each connection is two pump
threads; counters tell what the proxy did (``stats()``).
"""

from __future__ import annotations

import contextlib
import random
import socket
import struct
import threading
import time
from typing import Any

from ._exceptions import RigError

MODES = ("pass", "blackhole", "drop", "delay", "throttle", "loss")
_CHUNK = 16384


class FaultProxy:
    def __init__(self, upstream: tuple[str, int], host: str = "127.0.0.1", port: int = 0, seed: int = 0) -> None:
        self.upstream = upstream
        self._listener = socket.create_server((host, port), reuse_port=False)
        self._listener.settimeout(0.2)
        self.host, self.port = self._listener.getsockname()[:2]
        self._lock = threading.Lock()
        self._conns: set[tuple[socket.socket, socket.socket]] = set()
        self._flowing = threading.Event()
        self._flowing.set()
        self._stop = threading.Event()
        self._rng = random.Random(seed)
        self.mode = "pass"
        self.params: dict[str, float] = {}
        self.counters = {"accepted": 0, "refused": 0, "reset": 0, "bytes": 0}
        self._thread = threading.Thread(target=self._accept_loop, name="hil-proxy", daemon=True)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> FaultProxy:
        self._thread.start()
        return self

    def set_fault(self, mode: str, **params: float) -> None:
        if mode not in MODES:
            raise RigError(f"unknown proxy fault {mode!r} (one of {', '.join(MODES)})")
        with self._lock:
            self.mode, self.params = mode, dict(params)
        if mode == "blackhole":
            self._flowing.clear()
        else:
            self._flowing.set()
        if mode == "drop":
            self.reset_all()

    def clear(self) -> None:
        self.set_fault("pass")

    def reset_all(self) -> None:
        with self._lock:
            conns = list(self._conns)
        for pair in conns:
            self._reset(pair)

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {**self.counters, "open": len(self._conns), "mode": self.mode}

    def stop(self) -> None:
        self._stop.set()
        self._flowing.set()
        self._thread.join(5)
        self.reset_all()
        self._listener.close()

    # ------------------------------------------------------------------ threads
    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except (TimeoutError, OSError):
                continue
            if self.mode == "drop":
                self._count("refused")
                _abort(client)
                continue
            try:
                server = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                self._count("refused")
                _abort(client)
                continue
            for s in (client, server):
                s.settimeout(None)
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            pair = (client, server)
            with self._lock:
                self._conns.add(pair)
                self.counters["accepted"] += 1
            for src, dst in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(pair, src, dst), name="hil-proxy-pump", daemon=True).start()

    def _pump(self, pair: tuple[socket.socket, socket.socket], src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(_CHUNK)
                if not data:
                    break
                if not self._shape(pair, data):
                    return
                dst.sendall(data)
                self._count("bytes", len(data))
        except OSError:
            pass
        self._reset(pair)

    def _shape(self, pair: tuple[socket.socket, socket.socket], data: bytes) -> bool:
        """Apply the current fault to one chunk; False when the connection was reset."""
        while not self._flowing.wait(0.1):  # blackhole: hold the bytes until it heals
            if self._stop.is_set() or pair not in self._conns:
                return False
        mode, params = self.mode, self.params
        if mode == "delay":
            time.sleep(params.get("delay_ms", 0) / 1000)
        elif mode == "throttle":
            time.sleep(len(data) / max(params.get("bytes_per_s", 1024), 1))
        elif mode == "loss" and self._rng.random() < params.get("loss", 0):
            self._count("reset")
            self._reset(pair)
            return False
        return pair in self._conns

    def _reset(self, pair: tuple[socket.socket, socket.socket]) -> None:
        with self._lock:
            if pair not in self._conns:
                return
            self._conns.discard(pair)
        for s in pair:
            _abort(s)

    def _count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self.counters[key] += n


def _abort(sock: socket.socket) -> None:
    """Close with RST (SO_LINGER 0), as a dead link looks to the peer."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()
