"""The SSH target: the agent on a real board, driven with ``ssh`` and ``scp``.

    edgeml hil run broker-restart --target ssh://pi@raspberrypi.local

``prepare()`` builds the wheel of this checkout (``pip wheel --no-deps``), copies it to
``~/.edgeml-hil/`` on the board and installs it in a virtual environment there
(``python3 -m venv``; the board needs Python 3.11 and either network access to a package
index or the dependencies installed). One long-lived ``ssh -N`` carries the tunnels: the
rig's broker (through the fault proxy) and coordinator are forwarded *to* the board on the
same port numbers (``-R``), so the agent there dials ``127.0.0.1`` exactly as a local one
does and the artifact URLs of desired states resolve; the agent's local API is forwarded
back (``-L``) for the replay. The agent runs under ``nohup``; a kill -9 is ``kill -9 PID``
over ssh.

Faults that act on the rig's side (network, broker, corrupt artifact) and on the process
(kill -9, power cut during an update) work the same; ``full_disk`` needs a filesystem the
rig mounts and is skipped; ``clock_skew`` needs ``faketime`` on the board.

Not tried against a real board yet: the tests check the commands built, and run against
``ssh://root@127.0.0.1`` only where an sshd is available.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from ._exceptions import TargetError
from ._targets import REPO

Runner = Callable[[Sequence[str]], "subprocess.CompletedProcess[str]"]
_URL = re.compile(r"^ssh://(?:(?P<user>[A-Za-z0-9._-]+)@)?(?P<host>[A-Za-z0-9.\-]+|\[[0-9a-fA-F:]+\])(?::(?P<port>\d+))?/?$")
REMOTE_DIR = ".edgeml-hil"
SSH_OPTIONS = ["-o", "BatchMode=yes", "-o", "ConnectTimeout=10", "-o", "ServerAliveInterval=5",
               "-o", "StrictHostKeyChecking=accept-new"]
#: Settings that name files on the rig: copied to the board, the value replaced by the copy.
FILE_SETTINGS = ("EDGEML_FLEET_PUBKEY", "EDGEML_MQTT__CA_FILE", "EDGEML_MQTT__CERT_FILE", "EDGEML_MQTT__KEY_FILE")


def _run(argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=600, check=False)


class SshTarget:
    supports_local_faults = False

    def __init__(self, url: str, runner: Runner = _run, popen: Callable[..., subprocess.Popen[bytes]] = subprocess.Popen) -> None:
        m = _URL.match(url)
        if not m:
            raise TargetError(f"bad target {url!r}: expected ssh://user@host[:port]")
        self.url = url
        self.user, self.host = m["user"], m["host"].strip("[]")
        self.port = int(m["port"]) if m["port"] else None
        self.name = url
        self._runner = runner
        self._popen = popen
        self.pid: int | None = None
        self.tunnel: subprocess.Popen[bytes] | None = None
        self.reverse_ports: list[int] = []
        self.local_ports: list[int] = []
        self.wheel: Path | None = None

    # ------------------------------------------------------------------ commands
    @property
    def destination(self) -> str:
        return f"{self.user}@{self.host}" if self.user else self.host

    def ssh_argv(self, command: str) -> list[str]:
        port = ["-p", str(self.port)] if self.port else []
        return ["ssh", *SSH_OPTIONS, *port, self.destination, command]

    def scp_argv(self, local: Path, remote: str) -> list[str]:
        port = ["-P", str(self.port)] if self.port else []
        host = f"[{self.host}]" if ":" in self.host else self.host
        dest = f"{self.user}@{host}" if self.user else host
        return ["scp", *SSH_OPTIONS, *port, str(local), f"{dest}:{remote}"]

    def tunnel_argv(self) -> list[str]:
        port = ["-p", str(self.port)] if self.port else []
        forwards: list[str] = []
        for p in self.reverse_ports:
            forwards += ["-R", f"{p}:127.0.0.1:{p}"]
        for p in self.local_ports:
            forwards += ["-L", f"{p}:127.0.0.1:{p}"]
        return ["ssh", *SSH_OPTIONS, "-N", "-o", "ExitOnForwardFailure=yes", *port, *forwards, self.destination]

    def start_command(self, env: dict[str, str], wrapper: Sequence[str] = ()) -> str:
        assigns = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(env.items()))
        cmd = " ".join(shlex.quote(a) for a in [*wrapper, f"{REMOTE_DIR}/venv/bin/edgeml", "agent", "run"])
        return f"cd ~ && env {assigns} nohup {cmd} >> {REMOTE_DIR}/agent.log 2>&1 < /dev/null & echo $!"

    def install_command(self, wheel_name: str) -> str:
        d = REMOTE_DIR
        return (f"python3 -m venv {d}/venv && {d}/venv/bin/pip install --quiet --upgrade "
                f"{d}/{shlex.quote(wheel_name)}")

    def _ssh(self, command: str) -> str:
        r = self._runner(self.ssh_argv(command))
        if r.returncode != 0:
            raise TargetError(f"ssh {self.destination} {command!r} failed ({r.returncode}): {r.stderr.strip()[:500]}")
        return r.stdout

    def _scp(self, local: Path, remote: str) -> None:
        r = self._runner(self.scp_argv(local, remote))
        if r.returncode != 0:
            raise TargetError(f"scp {local} to {self.destination}:{remote} failed: {r.stderr.strip()[:500]}")

    # ------------------------------------------------------------------ Target
    def prepare(self, workdir: Path) -> None:
        self.wheel = build_wheel(workdir / "dist", self._runner)
        self._ssh(f"mkdir -p {REMOTE_DIR}/files")
        self._scp(self.wheel, f"{REMOTE_DIR}/{self.wheel.name}")
        self._ssh(self.install_command(self.wheel.name))

    def set_tunnels(self, reverse: list[int], local: list[int]) -> None:
        self.reverse_ports, self.local_ports = reverse, local

    def _ensure_tunnel(self) -> None:
        if self.tunnel is not None and self.tunnel.poll() is None:
            return
        self.tunnel = self._popen(self.tunnel_argv(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1.0)
        if self.tunnel.poll() is not None:
            raise TargetError(f"the ssh tunnel to {self.destination} exited ({self.tunnel.returncode})")

    def remote_env(self, env: dict[str, str]) -> dict[str, str]:
        """The agent's settings as the board sees them: files copied, data dir in the home."""
        out = dict(env)
        for key in FILE_SETTINGS:
            if out.get(key):
                local = Path(out[key])
                remote = f"{REMOTE_DIR}/files/{local.name}"
                self._scp(local, remote)
                out[key] = remote
        out["EDGEML_DATA_DIR"] = f"{REMOTE_DIR}/data"
        return out

    def start(self, env: dict[str, str], wrapper: list[str] | None = None) -> None:
        self._ensure_tunnel()
        out = self._ssh(self.start_command(self.remote_env(env), wrapper or ()))
        try:
            self.pid = int(out.strip().splitlines()[-1])
        except (ValueError, IndexError):
            raise TargetError(f"could not start the agent on {self.destination}: {out[:300]!r}") from None

    def _signal(self, sig: str) -> None:
        if self.pid is not None:
            self._runner(self.ssh_argv(f"kill -{sig} {self.pid}"))

    def kill(self) -> None:
        self._signal("9")
        self.pid = None

    def stop(self) -> None:
        if self.pid is None:
            return
        self._ssh(f"kill -TERM {self.pid}; for i in $(seq 100); do kill -0 {self.pid} 2>/dev/null || exit 0; "
                  f"sleep 0.2; done; kill -9 {self.pid}")
        self.pid = None

    def alive(self) -> bool:
        return self.pid is not None and self._runner(self.ssh_argv(f"kill -0 {self.pid}")).returncode == 0

    def forget(self) -> None:
        self.pid = None

    def local_port(self, remote_port: int) -> int:
        return remote_port

    def log_tail(self, chars: int = 3000) -> str:
        r = self._runner(self.ssh_argv(f"tail -c {chars} {REMOTE_DIR}/agent.log"))
        return r.stdout if r.returncode == 0 else ""

    def close(self) -> None:
        self.kill()
        if self.tunnel is not None:
            self.tunnel.terminate()
            self.tunnel.wait(10)
            self.tunnel = None


def build_wheel(out: Path, runner: Runner = _run) -> Path:
    """``pip wheel --no-deps`` of this checkout; the path of the wheel."""
    out.mkdir(parents=True, exist_ok=True)
    r = runner([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(REPO)])
    if r.returncode != 0:
        raise TargetError(f"building the wheel failed: {r.stderr.strip()[-500:]}")
    wheels = sorted(out.glob("edgeml-*.whl"))
    if not wheels:
        raise TargetError(f"no wheel in {out}")
    return wheels[-1]
