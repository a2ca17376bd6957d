"""Devices under test: where the agent process runs.

A target starts ``edgeml agent run`` with settings in the environment, kills it with
SIGKILL (a power cut as the process sees it) and says which faults it can inject.

* :class:`LocalTarget` (``--target local``): a child process of the rig, on this machine.
* :class:`~hil._ssh.SshTarget` (``--target ssh://user@host[:port]``): the built wheel in a
  virtual environment on a board, reached with ``ssh``/``scp`` (see ``_ssh``).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Protocol

from ._exceptions import TargetError

REPO = Path(__file__).resolve().parent.parent


class Target(Protocol):
    name: str

    def prepare(self, workdir: Path) -> None:
        """Install what the agent needs (nothing locally; the wheel on a board)."""

    def start(self, env: dict[str, str], wrapper: list[str] | None = None) -> None:
        """Start the agent with these settings; ``wrapper`` prefixes the command (faketime)."""

    def kill(self) -> None:
        """SIGKILL the agent (no flush, no goodbye)."""

    def stop(self) -> None:
        """SIGTERM the agent and wait for it."""

    def alive(self) -> bool: ...

    def local_port(self, remote_port: int) -> int:
        """Where the rig reaches a port the agent listens on (the local API)."""

    def close(self) -> None: ...


class LocalTarget:
    """The agent as a child process of the rig (``python -m edgeml.cli agent run``)."""

    name = "local"
    #: Faults that need the agent's data directory or process on this machine.
    supports_local_faults = True

    def __init__(self) -> None:
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path: Path | None = None

    def prepare(self, workdir: Path) -> None:
        self.log_path = workdir / "agent.log"

    def start(self, env: dict[str, str], wrapper: list[str] | None = None) -> None:
        if self.alive():
            raise TargetError("the agent is already running")
        assert self.log_path is not None, "prepare() first"
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [*(wrapper or []), sys.executable, "-m", "edgeml.cli", "agent", "run"],
                env={**os.environ, **env}, stdout=log, stderr=log, cwd=REPO,
                start_new_session=True,  # its own process group: a kill reaches a wrapper's children too
            )

    def kill(self) -> None:
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
            self.proc = None

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()
            self.proc = None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def exited(self) -> bool:
        """The process ended by itself (a crash point fired)."""
        return self.proc is not None and self.proc.poll() is not None

    def forget(self) -> None:
        if self.proc is not None:
            self.proc.wait(10)
        self.proc = None

    def local_port(self, remote_port: int) -> int:
        return remote_port

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path and self.log_path.exists() else ""

    def close(self) -> None:
        self.kill()


def make_target(spec: str) -> Target:
    if spec == "local":
        return LocalTarget()
    if spec.startswith("ssh://"):
        from ._ssh import SshTarget

        return SshTarget(spec)
    raise TargetError(f"unknown target {spec!r}: use local or ssh://user@host[:port]")
