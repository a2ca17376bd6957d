"""firmware/: the device installer and the agent's self-upgrade, run into scratch roots.

No systemd runs here: the installer writes into a DESTDIR; the upgrade gets a fake
SYSTEMCTL (a script logging its arguments) and a fake HEALTH_CMD. The venv tests build a
real wheel of this checkout and install it with PIP_NO_DEPS=1; the agent's dependencies
come from the test's own environment through PYTHONPATH.
"""

from __future__ import annotations

import os
import pwd
import shutil
import sqlite3
import stat
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from edgeml._testing.broker import free_port
from edgeml.buffer import TelemetryBuffer, iter_records

REPO = Path(__file__).resolve().parent.parent
INSTALL = REPO / "firmware" / "install.sh"
UPGRADE = REPO / "firmware" / "upgrade.sh"
UNIT_REL = "lib/systemd/system/edgeml-agent.service"
BASE_PYTHON = str(
    Path(sys._base_executable).resolve()
)  # a venv's own python cannot seed venvs portably
SITE = sysconfig.get_paths()["purelib"]

pytestmark = pytest.mark.skipif(
    sys.platform != "linux", reason="the installer targets Debian-based Linux"
)


def run(
    script: Path, root: Path, *args: str, env: dict[str, str] | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    full = {**os.environ, "DESTDIR": str(root), **(env or {})}
    proc = subprocess.run(
        ["sh", str(script), *args], env=full, capture_output=True, text=True, timeout=120
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{script.name} {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
        )
    return proc


def account(root: Path, name: str, file: str) -> list[str] | None:
    for line in (root / "etc" / file).read_text().splitlines():
        if line.split(":")[0] == name:
            return line.split(":")
    return None


def unit_settings(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("#", "[")) and "=" in line:
            key, value = line.split("=", 1)
            out.setdefault(key, []).append(value)
    return out


# ---- layout ------------------------------------------------------------------------------


def test_install_layout_permissions_and_unit(tmp_path: Path) -> None:
    root = tmp_path / "root"
    run(INSTALL, root, "--no-venv", "--profile", "rpi4")

    user, group = account(root, "edgeml", "passwd"), account(root, "edgeml", "group")
    assert user and group, "service user and group in DESTDIR/etc"
    uid, gid = int(user[2]), int(group[2])
    assert 100 <= uid < 1000 and int(user[3]) == gid
    assert user[5] == "/var/lib/edgeml" and user[6] == "/usr/sbin/nologin"

    data = root / "var/lib/edgeml"
    st = data.stat()
    assert stat.S_IMODE(st.st_mode) == 0o750
    if os.geteuid() == 0:
        assert (st.st_uid, st.st_gid) == (uid, gid)

    etc = root / "etc/edgeml"
    config = etc / "agent.yaml"
    assert stat.S_IMODE(etc.stat().st_mode) == 0o750
    assert stat.S_IMODE(config.stat().st_mode) == 0o640
    if os.geteuid() == 0:
        assert (config.stat().st_uid, config.stat().st_gid) == (0, gid)
    text = config.read_text()
    assert "data_dir: /var/lib/edgeml" in text.splitlines()
    assert "hardware_profile: rpi4" in text.splitlines()
    # the shipped example device id and broker are not this device's
    assert not any(line.startswith(("device_id:", "broker_url:")) for line in text.splitlines())
    from edgeml import load_config

    cfg = load_config(config)
    assert cfg.hardware_profile == "rpi4" and str(cfg.data_dir) == "/var/lib/edgeml"

    unit = root / UNIT_REL
    assert stat.S_IMODE(unit.stat().st_mode) == 0o644
    s = unit_settings(unit.read_text())
    expect = {
        "Type": "notify",
        "WatchdogSec": "30",
        "Restart": "on-failure",
        "RestartSec": "5",
        "User": "edgeml",
        "Group": "edgeml",
        "ProtectSystem": "strict",
        "ReadWritePaths": "/var/lib/edgeml",
        "NoNewPrivileges": "true",
        "PrivateTmp": "true",
        "StartLimitIntervalSec": "300",
        "StartLimitBurst": "10",
        "RestartPreventExitStatus": "2",
        "ExecStart": "/opt/edgeml/current/bin/edgeml agent run --config /etc/edgeml/agent.yaml",
        "WantedBy": "multi-user.target",
    }
    for key, value in expect.items():
        assert s.get(key) == [value], (key, s.get(key))
    assert (
        "MALLOC_ARENA_MAX=2" in s["Environment"]
        and "EDGEML_DATA_DIR=/var/lib/edgeml" in s["Environment"]
    )

    wants = root / "etc/systemd/system/multi-user.target.wants/edgeml-agent.service"
    assert wants.is_symlink() and os.readlink(wants) == "/lib/systemd/system/edgeml-agent.service"
    assert os.access(root / "usr/local/sbin/edgeml-upgrade", os.X_OK)
    assert not (root / "etc/logrotate.d/edgeml").exists()  # logs go to the journal


def test_reinstall_keeps_config_and_user(tmp_path: Path) -> None:
    root = tmp_path / "root"
    run(INSTALL, root, "--no-venv")
    config = root / "etc/edgeml/agent.yaml"
    config.write_text("device_id: kiosk-7\n")
    passwd = (root / "etc/passwd").read_text()
    out = run(INSTALL, root, "--no-venv", "--profile", "rpi4").stdout
    assert config.read_text() == "device_id: kiosk-7\n"
    assert "keeping existing" in out
    assert (root / "etc/passwd").read_text() == passwd  # no second edgeml entry


def test_install_with_own_config_and_bad_profile(tmp_path: Path) -> None:
    mine = tmp_path / "mine.yaml"
    mine.write_text("device_id: line-3\nfleet: plant\n")
    run(INSTALL, tmp_path / "a", "--no-venv", "--config", str(mine))
    assert (tmp_path / "a/etc/edgeml/agent.yaml").read_text() == mine.read_text()
    bad = run(INSTALL, tmp_path / "b", "--no-venv", "--profile", "toaster", check=False)
    assert bad.returncode != 0 and "unknown hardware profile 'toaster'" in bad.stderr
    assert "rpi4" in bad.stderr


def test_existing_system_accounts_are_respected(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc/passwd").write_text(
        "root:x:0:0:root:/root:/bin/bash\nsvc:x:999:999::/:/usr/sbin/nologin\n"
    )
    (root / "etc/group").write_text("root:x:0:\nsvc:x:999:\n")
    (root / "etc/shadow").write_text("root:*:19000:0:99999:7:::\n")
    run(INSTALL, root, "--no-venv")
    user = account(root, "edgeml", "passwd")
    assert user and user[2] != "999" and user[3] != "999"
    shadow = account(root, "edgeml", "shadow")
    assert shadow and shadow[1] == "!*"


def test_uninstall_keeps_data_and_config_purge_removes_all(tmp_path: Path) -> None:
    root = tmp_path / "root"
    run(INSTALL, root, "--no-venv")
    (root / "opt/edgeml/venv-a/bin").mkdir(parents=True)
    (root / "opt/edgeml/current").symlink_to("venv-a")
    (root / "var/lib/edgeml/telemetry.db").write_bytes(b"records")
    (root / "etc/logrotate.d").mkdir(parents=True)
    (root / "etc/logrotate.d/edgeml").write_text("# from an older install\n")

    run(INSTALL, root, "--uninstall")
    assert not (root / UNIT_REL).exists()
    assert not (
        root / "etc/systemd/system/multi-user.target.wants/edgeml-agent.service"
    ).is_symlink()
    assert not (root / "opt/edgeml").exists()
    assert not (root / "usr/local/sbin/edgeml-upgrade").exists()
    assert not (root / "etc/logrotate.d/edgeml").exists()
    assert (root / "var/lib/edgeml/telemetry.db").read_bytes() == b"records"
    assert (root / "etc/edgeml/agent.yaml").exists()
    assert account(root, "edgeml", "passwd")

    run(INSTALL, root, "--uninstall", "--purge")
    assert not (root / "var/lib/edgeml").exists()
    assert not (root / "etc/edgeml").exists()
    assert account(root, "edgeml", "passwd") is None and account(root, "edgeml", "group") is None

    bad = run(INSTALL, root, "--purge", check=False)
    assert bad.returncode != 0 and "--purge goes with --uninstall" in bad.stderr


def test_scripts_are_shellcheck_clean() -> None:
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (apt-get install shellcheck)")
    proc = subprocess.run(
        ["shellcheck", str(INSTALL), str(UPGRADE)], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout


# ---- a real venv from a wheel of this checkout -----------------------------------------------


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A wheel of this checkout, built from a copy (no build/ or egg-info in the tree)."""
    work = tmp_path_factory.mktemp("wheel")
    src = work / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for pkg in ("edgeml", "cloud"):
        shutil.copytree(REPO / pkg, src / pkg, ignore=ignore)
    dist = work / "dist"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(dist),
            str(src),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    (whl,) = dist.glob("edgeml-*.whl")
    return whl


# Offline and without the dependencies' wheels: the agent's dependencies come from this
# test's environment. --ignore-installed in the scripts keeps pip installing into the venv.
VENV_ENV = {"PYTHON": BASE_PYTHON, "PIP_NO_DEPS": "1", "PIP_NO_INDEX": "1", "PYTHONPATH": SITE}


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory, wheel: Path) -> Path:
    root = tmp_path_factory.mktemp("device")
    run(INSTALL, root, "--wheel", str(wheel), "--profile", "x86-gateway", env=VENV_ENV)
    return root


def test_venv_install_from_wheel(installed: Path) -> None:
    opt = installed / "opt/edgeml"
    assert os.readlink(opt / "current") == "venv-a"  # relative: valid inside the image
    script = opt / "current/bin/edgeml"
    assert script.is_file() and os.access(script, os.X_OK)
    # the image's scripts name the device's paths, not the build host's DESTDIR
    assert script.read_text().splitlines()[0] == "#!/opt/edgeml/venv-a/bin/python"
    assert str(installed) not in (opt / "venv-a/pyvenv.cfg").read_text()


def test_systemd_analyze_verify(installed: Path, tmp_path: Path) -> None:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed (Debian package systemd)")
    # verify resolves ExecStart on this host: point it at the DESTDIR's agent, the rest as shipped
    unit = tmp_path / "edgeml-agent.service"
    text = (installed / UNIT_REL).read_text()
    unit.write_text(text.replace("ExecStart=/opt/edgeml/", f"ExecStart={installed}/opt/edgeml/"))
    proc = subprocess.run([tool, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stderr.strip() == "", proc.stderr


def test_agent_starts_from_the_installed_venv(installed: Path, tmp_path: Path) -> None:
    """The unit's command line, run with the installed venv's interpreter and config."""
    port = free_port()
    venv_python = installed / "opt/edgeml/current/bin/python"
    cmd = (installed / UNIT_REL).read_text().split("ExecStart=", 1)[1].splitlines()[0].split()
    argv = [str(venv_python), str(installed / cmd[0].lstrip("/"))] + [
        str(installed / a.lstrip("/")) if a.startswith("/etc/") else a for a in cmd[1:]
    ]
    env = {
        **os.environ,
        "PYTHONPATH": SITE,
        "EDGEML_DATA_DIR": str(tmp_path / "data"),
        "EDGEML_API_ADDR": f"127.0.0.1:{port}",
        "EDGEML_DISCOVERY__BROWSE": "false",
        "EDGEML_DISCOVERY__ANNOUNCE": "false",
        "MALLOC_ARENA_MAX": "2",
    }
    proc = subprocess.Popen(
        argv, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 30
        code = None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/health", timeout=2) as r:
                    code = r.status
            except urllib.error.HTTPError as exc:
                code = exc.code
            except OSError:
                time.sleep(0.2)
                continue
            break
        assert code == 503, (code, proc.poll())  # serving, no model yet
        out = subprocess.run(
            [str(venv_python), "-c", "import edgeml, sys; print(edgeml.__file__)"],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        # the venv's agent, not the tree's
        assert str(Path(out.strip()).resolve()).startswith(str(installed / "opt/edgeml/venv-a")), (
            out
        )
    finally:
        proc.terminate()
        try:
            _, err = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
    assert proc.returncode == 0, err
    assert "running: API" in err


# ---- self-upgrade with rollback --------------------------------------------------------------


def fake_systemctl(tmp_path: Path) -> tuple[Path, Path]:
    log = tmp_path / "systemctl.log"
    script = tmp_path / "systemctl"
    script.write_text(f'#!/bin/sh\necho "$*" >> "{log}"\n')
    script.chmod(0o755)
    return script, log


@pytest.mark.parametrize("new_is_healthy", [True, False], ids=["healthy", "unhealthy"])
def test_upgrade_switches_or_rolls_back(
    installed: Path, wheel: Path, tmp_path: Path, new_is_healthy: bool
) -> None:
    root = tmp_path / "root"
    shutil.copytree(installed, root, symlinks=True)
    opt = root / "opt/edgeml"
    old = os.readlink(opt / "current")
    new = "venv-b" if old == "venv-a" else "venv-a"
    systemctl, log = fake_systemctl(tmp_path)
    # healthy whenever the old agent is current; the new one only when the case says so
    health = f'[ "$(readlink {opt}/current)" = {old} ]'
    if new_is_healthy:
        health = "true"
    # the new agent's buffer holds packed records, which the old agent would not read
    data = tmp_path / "agent-data"
    with TelemetryBuffer(data / "telemetry.db") as buf:
        for i in range(30):
            buf.append_prediction("mlp", "2.0.0", 3.0, "probs", np.array([[0.1, 0.7 + i, 0.2]], np.float32))
        buf.flush()
    env = {
        **VENV_ENV,
        "SYSTEMCTL": str(systemctl),
        "HEALTH_CMD": health,
        "HEALTH_TIMEOUT": "1",
        "HEALTH_INTERVAL": "1",
        "EDGEML_DATA_DIR": str(data),
    }
    proc = run(UPGRADE, root, str(wheel), env=env, check=False)

    restarts = [line for line in log.read_text().splitlines() if line.startswith("restart")]
    assert (opt / new / "bin/edgeml").is_file()  # the new slot was built either way
    assert not (opt / ".upgrade.lock").exists()
    if new_is_healthy:
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert os.readlink(opt / "current") == new
        assert restarts == ["restart edgeml-agent.service"]
        assert "healthy on " + new in (opt / "upgrade.log").read_text()
        assert "downgrade" not in proc.stdout and "stop edgeml-agent.service" not in log.read_text()
    else:
        assert proc.returncode == 1, proc.stdout + proc.stderr
        assert os.readlink(opt / "current") == old
        assert restarts == ["restart edgeml-agent.service"] * 2
        assert "reset-failed edgeml-agent.service" in log.read_text()
        assert f"rollback {new} -> {old}" in (opt / "upgrade.log").read_text()
        assert "rolled back" in proc.stderr
        # stopped, buffer rewritten as JSON by the new agent, then the old one started
        calls = log.read_text().splitlines()
        assert calls.index("stop edgeml-agent.service") < len(calls) - 1 - calls[::-1].index("restart edgeml-agent.service")
        assert "30 packed records rewritten as JSON" in proc.stdout, proc.stdout + proc.stderr
        with sqlite3.connect(data / "telemetry.db") as db:
            bodies = [row[0] for row in db.execute("SELECT body FROM segments")]
            schema = db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()[0]
        assert schema == "2" and bodies and all(b[:1] == b"{" for b in bodies)
        assert [r["seq"] for r in iter_records(bodies)] == list(range(1, 31))


def test_upgrade_with_a_broken_wheel_touches_nothing(installed: Path, tmp_path: Path) -> None:
    root = tmp_path / "root"
    shutil.copytree(installed, root, symlinks=True)
    opt = root / "opt/edgeml"
    old = os.readlink(opt / "current")
    broken = tmp_path / "edgeml-9.9.9-py3-none-any.whl"
    broken.write_bytes(b"not a zip")
    systemctl, log = fake_systemctl(tmp_path)
    env = {**VENV_ENV, "SYSTEMCTL": str(systemctl), "HEALTH_CMD": "true"}
    proc = run(UPGRADE, root, str(broken), env=env, check=False)
    assert proc.returncode == 2 and "the agent was not touched" in proc.stderr
    assert os.readlink(opt / "current") == old
    assert not log.exists()  # never restarted
    assert not (opt / ".upgrade.lock").exists()


def test_running_user_is_not_required(tmp_path: Path) -> None:
    """pwd lookups of the host are never used for a DESTDIR: the host has no edgeml user."""
    run(INSTALL, tmp_path / "root", "--no-venv")
    with pytest.raises(KeyError):
        pwd.getpwnam("edgeml")
