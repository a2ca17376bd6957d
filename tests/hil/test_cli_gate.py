"""``edgeml hil run`` from the shell with a broken model: the suite fails, the JUnit XML
says so, and ``--report`` stores the run on a coordinator whose gate then says no."""

from __future__ import annotations

import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import httpx
import pytest

from cloud._config import CloudConfig
from cloud.coordinator import Coordinator
from cloud.hil import HilRunIn, hil_passed, list_runs, record_run
from cloud.keys import generate_keys
from tests._stores import cloud_db
from tests.cloud.conftest import make_store, store, store_url  # noqa: F401 - fixtures
from tests.conftest import REPO, Broker

BROKEN = Path(__file__).parent / "scenarios" / "broken-model.yaml"


def test_cli_broken_model_fails_and_blocks_the_gate(broker: Broker, tmp_path: Path) -> None:
    generate_keys(tmp_path / "keys")
    config = CloudConfig(broker_url=broker.url, db=cloud_db(tmp_path, "gate.db"), http_addr="127.0.0.1:0",
                         artifact_dir=tmp_path / "artifacts", signing_key=tmp_path / "keys" / "fleet.key")
    with Coordinator(config) as coordinator:
        proc = subprocess.run(
            [sys.executable, "-m", "edgeml.cli", "hil", "run", str(BROKEN), "--target", "local",
             "--junit", str(tmp_path / "hil.xml"), "--html", str(tmp_path / "hil.html"), "--report", coordinator.url],
            capture_output=True, text=True, cwd=REPO, timeout=120,
        )
        assert proc.returncode == 1, proc.stderr
        assert "broken-model: FAILED" in proc.stderr and "accuracy" in proc.stderr
        root = ET.parse(tmp_path / "hil.xml").getroot()
        assert root.get("failures") == "1" and root.get("errors") == "0"
        assert "<svg" in (tmp_path / "hil.html").read_text()
        runs = httpx.get(f"{coordinator.url}/v1/hil/runs", params={"model": "iris-mlp@9.0.0"}).json()
        assert len(runs) == 1 and runs[0]["passed"] is False and runs[0]["scenario"] == "broken-model"
        assert runs[0]["junit"] == {"tests": 3, "failures": 1, "errors": 0, "skipped": 0}
        gate = httpx.get(f"{coordinator.url}/v1/models/iris-mlp@9.0.0/hil").json()
        assert gate["passed"] is False and gate["suites"] == [
            {"scenario": "broken-model", "hardware_profile": "x86-gateway", "passed": False}]
        assert hil_passed(coordinator.store, "iris-mlp", "9.0.0") is False
        assert hil_passed(coordinator.store, "iris-mlp", "1.0.0") is None


def test_run_with_a_bad_scenario_file_names_the_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\nsteps:\n  - fault: {kind: power_cut_update, at: nowhere, candidate: {version: 2.0.0}}\n")
    proc = subprocess.run([sys.executable, "-m", "edgeml.cli", "hil", "run", str(bad)], capture_output=True, text=True,
                          cwd=REPO, timeout=60)
    assert proc.returncode == 2
    assert "steps.0.fault" in proc.stderr and "at must be one of" in proc.stderr


def run(model: str, scenario: str, profile: str, passed: bool) -> HilRunIn:
    counts = {"tests": 3, "failures": 0 if passed else 1, "errors": 0, "skipped": 0}
    return HilRunIn(model=model, scenario=scenario, hardware_profile=profile, passed=passed, counts=counts, junit=counts)


def test_hil_passed_latest_run_per_scenario_and_profile(store) -> None:  # noqa: F811 - fixture
    assert hil_passed(store, "m", "1.0.0") is None
    record_run(store, run("m@1.0.0", "broker-restart", "rpi4", False))
    assert hil_passed(store, "m", "1.0.0") is False
    record_run(store, run("m@1.0.0", "broker-restart", "rpi4", True))  # a rerun passes
    record_run(store, run("m@1.0.0", "full-disk", "rpi4", True))
    assert hil_passed(store, "m", "1.0.0") is True
    assert hil_passed(store, "m", "1.0.0", hardware_profiles=["rpi4", "x86-gateway"]) is False  # no x86 run
    assert hil_passed(store, "m", "1.0.0", scenarios=["full-disk"], hardware_profiles=["rpi4"]) is True
    assert hil_passed(store, "m", "1.0.0", scenarios=["clock-skew"]) is None
    record_run(store, run("m@1.0.0", "full-disk", "x86-gateway", False))
    assert hil_passed(store, "m", "1.0.0") is False
    assert hil_passed(store, "m", "2.0.0") is None
    runs = list_runs(store, "m", "1.0.0")
    assert [r["scenario"] for r in runs] == ["full-disk", "full-disk", "broker-restart", "broker-restart"]
    assert runs[0]["counts"]["failures"] == 1 and runs[0]["model"] == "m@1.0.0"


def test_bad_model_ref_is_refused(store) -> None:  # noqa: F811 - fixture
    from cloud._exceptions import InvalidInput

    with pytest.raises(InvalidInput):
        record_run(store, run("no-version", "s", "rpi4", True))
