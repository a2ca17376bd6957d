"""The rig's parts on their own: scenario validation, the fault proxy over real sockets,
the recorded set and its models, the SSH target's commands."""

from __future__ import annotations

import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from hil import ScenarioError, TargetError, load_scenario, parse_scenario, shipped_scenarios
from hil._data import build_model, load_set
from hil._proxy import FaultProxy
from hil._runner import parse_offset
from hil._scenario import DATA, ModelSpec
from hil._ssh import REMOTE_DIR, SshTarget
from hil._targets import LocalTarget, make_target


# --------------------------------------------------------------------------- scenarios
def test_shipped_scenarios_load_and_cover_every_fault() -> None:
    kinds = {s.fault.kind for name in shipped_scenarios() for s in load_scenario(name).steps if s.fault}
    assert len(shipped_scenarios()) >= 10
    assert kinds == {"partition", "drop_connections", "delay", "throttle", "packet_loss", "broker_restart",
                     "kill_agent", "power_cut_update", "full_disk", "corrupt_artifact", "clock_skew"}


@pytest.mark.parametrize(("doc", "key"), [
    ({"steps": [{"replay": {"seconds": 1}}]}, "name"),
    ({"name": "x", "steps": []}, "steps"),
    ({"name": "x", "steps": [{"replay": {"seconds": 0}}]}, "steps.0.replay.seconds"),
    ({"name": "x", "steps": [{"fault": {"kind": "meteor"}}]}, "steps.0.fault.kind"),
    ({"name": "x", "steps": [{"fault": {"kind": "corrupt_artifact"}}]}, "steps.0.fault"),
    ({"name": "x", "budgets": {"accuracy": 2}, "steps": [{"replay": {"seconds": 1}}]}, "budgets.accuracy"),
    ({"name": "x", "steps": [{"replay": {"seconds": 1}, "deploy": {"model": {}}}]}, "steps.0"),
    ({"name": "x", "colour": "red", "steps": [{"replay": {"seconds": 1}}]}, "colour"),
])
def test_a_bad_scenario_names_the_key(doc: dict, key: str) -> None:
    with pytest.raises(ScenarioError) as err:
        parse_scenario(doc, "f.yaml")
    assert str(err.value).startswith(f"f.yaml: {key}:"), str(err.value)


def test_unknown_scenario_lists_the_shipped_ones(tmp_path: Path) -> None:
    with pytest.raises(ScenarioError, match="broker-restart"):
        load_scenario("no-such-scenario")
    (tmp_path / "s.yaml").write_text("name: [unclosed\n")
    with pytest.raises(ScenarioError, match="not valid YAML"):
        load_scenario(tmp_path / "s.yaml")


def test_clock_offsets() -> None:
    assert parse_offset("+6h") == 21600 and parse_offset("-90m") == -5400 and parse_offset("30") == 30
    with pytest.raises(Exception, match="bad clock offset"):
        parse_offset("tomorrow")


def test_edgeml_hil_list(capsys: pytest.CaptureFixture[str]) -> None:
    from edgeml.cli import main

    assert main(["hil", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == shipped_scenarios()


# --------------------------------------------------------------------------- data
def test_recorded_set_and_models(tmp_path: Path) -> None:
    recorded = load_set(DATA / "iris.npz")
    assert recorded.inputs.shape == (60, 4) and set(recorded.labels.tolist()) == {0, 1, 2}
    accuracy = {}
    for variant in ("good", "broken"):
        path = build_model(recorded, ModelSpec(variant=variant), tmp_path)
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        probs = session.run(None, {"input": recorded.inputs})[0]
        accuracy[variant] = float((probs.argmax(1) == recorded.labels).mean())
        assert np.allclose(probs.sum(1), 1, atol=1e-5)
    assert accuracy["good"] >= 0.95 and accuracy["broken"] <= 0.1


# --------------------------------------------------------------------------- proxy
class Echo:
    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    @staticmethod
    def _echo(conn: socket.socket) -> None:
        with conn:
            try:
                while data := conn.recv(4096):
                    conn.sendall(data)
            except OSError:
                pass


@pytest.fixture
def proxy() -> Iterator[FaultProxy]:
    echo = Echo()
    p = FaultProxy(("127.0.0.1", echo.port)).start()
    yield p
    p.stop()
    echo.server.close()


def roundtrip(port: int, data: bytes = b"ping", timeout: float = 2.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        return s.recv(100)


def test_proxy_passes_and_blackholes_then_heals(proxy: FaultProxy) -> None:
    assert roundtrip(proxy.port) == b"ping"
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as s:
        proxy.set_fault("blackhole")
        s.sendall(b"held")
        s.settimeout(0.5)
        with pytest.raises(TimeoutError):
            s.recv(10)  # nothing flows
        proxy.clear()
        s.settimeout(5)
        assert s.recv(10) == b"held"  # the bytes were held, not lost


def test_proxy_drop_resets_and_refuses(proxy: FaultProxy) -> None:
    s = socket.create_connection(("127.0.0.1", proxy.port), timeout=2)
    s.sendall(b"a")
    assert s.recv(10) == b"a"
    proxy.set_fault("drop")
    with pytest.raises((ConnectionResetError, ConnectionAbortedError, BrokenPipeError)):
        s.sendall(b"b")
        time.sleep(0.1)
        s.sendall(b"b")
        assert s.recv(10) == b""
        raise ConnectionResetError  # an orderly close counts as a drop too
    s.close()
    with pytest.raises((ConnectionResetError, ConnectionAbortedError, OSError)):
        assert roundtrip(proxy.port) == b""
        raise ConnectionResetError
    assert proxy.stats()["refused"] >= 1
    proxy.clear()
    assert roundtrip(proxy.port) == b"ping"


def test_proxy_delay_throttle_and_loss(proxy: FaultProxy) -> None:
    proxy.set_fault("delay", delay_ms=300)
    t = time.monotonic()
    assert roundtrip(proxy.port) == b"ping"
    assert time.monotonic() - t >= 0.55  # both directions delayed
    proxy.set_fault("throttle", bytes_per_s=100)
    t = time.monotonic()
    assert roundtrip(proxy.port, b"x" * 50) == b"x" * 50
    assert time.monotonic() - t >= 0.9  # 50 bytes each way at 100 B/s
    proxy.set_fault("loss", loss=1.0)
    with pytest.raises((ConnectionResetError, OSError)):
        assert roundtrip(proxy.port) == b""
        raise ConnectionResetError
    assert proxy.stats()["reset"] >= 1


# --------------------------------------------------------------------------- targets
class Recorder:
    def __init__(self, outputs: dict[str, str] | None = None) -> None:
        self.calls: list[list[str]] = []
        self.outputs = outputs or {}

    def __call__(self, argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
        self.calls.append(list(argv))
        out = next((v for k, v in self.outputs.items() if k in argv[-1]), "")
        return subprocess.CompletedProcess(list(argv), 0, out, "")


def test_target_urls() -> None:
    assert isinstance(make_target("local"), LocalTarget)
    t = SshTarget("ssh://pi@raspberrypi.local:2222")
    assert (t.user, t.host, t.port) == ("pi", "raspberrypi.local", 2222)
    for bad in ("ftp://x", "ssh://", "ssh://a b@host", "usb://board"):
        with pytest.raises(TargetError):
            make_target(bad)


def test_ssh_commands_are_built_for_the_board(tmp_path: Path) -> None:
    rec = Recorder({"echo $!": "4242\n"})
    t = SshTarget("ssh://pi@board:2222", runner=rec)
    pub = tmp_path / "fleet.pub"
    pub.write_text("key")
    t.set_tunnels([18830, 18480], [18470])
    argv = t.tunnel_argv()
    assert argv[:1] == ["ssh"] and "-N" in argv and argv[argv.index("-p"):argv.index("-p") + 2] == ["-p", "2222"]
    assert "18830:127.0.0.1:18830" in argv and "18480:127.0.0.1:18480" in argv and "18470:127.0.0.1:18470" in argv
    assert argv[argv.index("18830:127.0.0.1:18830") - 1] == "-R" and argv[argv.index("18470:127.0.0.1:18470") - 1] == "-L"
    t.tunnel = subprocess.Popen(["sleep", "30"])  # the tunnel process itself is ssh; not run here
    try:
        t.start({"EDGEML_FLEET_PUBKEY": str(pub), "EDGEML_DATA_DIR": "/tmp/local", "EDGEML_DEVICE_ID": "dut 1"})
    finally:
        t.tunnel.kill()
        t.tunnel.wait()
    scp, start = rec.calls
    assert scp[0] == "scp" and scp[-2:] == [str(pub), f"pi@board:{REMOTE_DIR}/files/fleet.pub"] and "-P" in scp
    assert start[0] == "ssh" and start[-2] == "pi@board"
    command = start[-1]
    assert f"EDGEML_FLEET_PUBKEY={REMOTE_DIR}/files/fleet.pub" in command
    assert f"EDGEML_DATA_DIR={REMOTE_DIR}/data" in command and "EDGEML_DEVICE_ID='dut 1'" in command
    assert f"nohup {REMOTE_DIR}/venv/bin/edgeml agent run" in command and command.endswith("& echo $!")
    assert t.pid == 4242
    t.kill()
    assert rec.calls[-1][-1] == "kill -9 4242" and t.pid is None
    assert "python3 -m venv" in t.install_command("edgeml-0.1.0-py3-none-any.whl")


@pytest.mark.skipif(shutil.which("sshd") is None, reason="no sshd on this machine: the SSH target is not tried here")
def test_ssh_target_against_localhost(tmp_path: Path) -> None:  # pragma: no cover - needs an sshd
    t = SshTarget("ssh://root@127.0.0.1")
    r = subprocess.run(t.ssh_argv("true"), capture_output=True, timeout=20, check=False)
    if r.returncode != 0:
        pytest.skip(f"sshd present but root@127.0.0.1 is not reachable with keys: {r.stderr[:200]!r}")
    assert t.alive() is False


def test_the_wheel_for_a_board_carries_the_scenarios_and_the_recorded_set(tmp_path: Path) -> None:
    import zipfile

    from hil._ssh import build_wheel

    wheel = build_wheel(tmp_path / "dist")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"hil/data/iris.npz", "hil/cli.py", "edgeml/agent.py"} <= names
    assert {f"hil/scenarios/{n}.yaml" for n in shipped_scenarios()} <= names
