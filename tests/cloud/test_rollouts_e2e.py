"""Rollouts end to end: a real coordinator (SQLite) + Mosquitto + six in-process agents.

A good model (the same network, a new version) is promoted step by step to 100 %
through the CLI; a bad one (other weights: its top1 distribution shifts) is rolled back
automatically in the canary step by the PSI gate, with the evidence stored.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from cloud._config import CloudConfig
from cloud.coordinator import Coordinator
from cloud.keys import generate_keys
from cloud.rollouts import bucket
from edgeml import Agent, load_config
from edgeml._testing import models as modelgen
from edgeml.cli import main

from .._stores import cloud_db
from ..conftest import Broker, agent_env, free_port, wait_until

DEVICES = [f"dev-{i}" for i in range(6)]
POLICY = """
min_dwell_s: 1
min_samples: 40
gates:
  - {metric: psi, threshold: 0.2}
  - {metric: health, threshold: 0}
"""


def _salt(steps: list[float]) -> str:
    """A salt whose first step draws 2 of the 6 devices and whose second draws 4 (reproducible)."""
    for i in range(10_000):
        salt = f"s{i}"
        sizes = [sum(bucket(d, salt) < p * 100 for d in DEVICES) for p in steps[:2]]
        if sizes == [2, 4][: len(sizes)]:
            return salt
    raise AssertionError("no salt")


class Site:
    def __init__(self, tmp: Path, broker: Broker, models: dict[str, Path]) -> None:
        keys = tmp / "keys"
        generate_keys(keys)
        config = CloudConfig(broker_url=broker.url, db=cloud_db(tmp), http_addr="127.0.0.1:0",
                             artifact_dir=tmp / "artifacts", signing_key=keys / "fleet.key")
        self.coordinator = Coordinator(config).start()
        wait_until(lambda: self.coordinator.desired.is_leader, 10, what="leadership")
        self.http = httpx.Client(base_url=self.coordinator.url, timeout=30)
        for version, path in models.items():
            with path.open("rb") as fh:
                r = self.http.post("/v1/models", data={"name": "mlp", "version": version}, files={"file": (path.name, fh)})
            assert r.status_code == 201, r.text
        for d in DEVICES:
            assert self.http.put(f"/v1/devices/plant/{d}", json={"tags": {"env": "lab"}}).status_code in (200, 201)
            assert self.http.put(f"/v1/devices/plant/{d}/desired", json={"model": "mlp@1.0.0"}).status_code == 200
        self.stop = threading.Event()
        self.failures: list[Exception] = []
        self.agents: list[Agent] = []
        self.threads: list[threading.Thread] = []
        for i, d in enumerate(DEVICES):
            env = agent_env(
                EDGEML_DATA_DIR=tmp / d, EDGEML_API_ADDR=f"127.0.0.1:{free_port()}", EDGEML_BROKER_URL=broker.url,
                EDGEML_MODEL_PATH=models["1.0.0"], EDGEML_DEVICE_ID=d, EDGEML_FLEET="plant",
                EDGEML_FLEET_PUBKEY=keys / "fleet.pub", EDGEML_UPDATES__PROBATION_S=0.2,
                EDGEML_UPDATES__PROBATION_MIN_PREDICTIONS=0, EDGEML_UPDATES__RETRY_BACKOFF_S=0.05,
                EDGEML_MQTT__RECONNECT_MAX_S=1,
            )
            agent = Agent(load_config(env=env)).start()
            self.agents.append(agent)
            self.threads.append(threading.Thread(target=self._app, args=(agent, i), daemon=True))
            self.threads[-1].start()

    def _app(self, agent: Agent, seed: int) -> None:
        rng = np.random.default_rng(seed)
        while not self.stop.is_set():
            try:
                agent.predict({"input": rng.standard_normal((1, 4)).astype(np.float32)})
            except Exception as exc:  # noqa: BLE001 - the test collects every failure
                self.failures.append(exc)
            time.sleep(0.004)

    def versions(self) -> dict[str, str | None]:
        return {d: (a.model.version if a.model else None) for d, a in zip(DEVICES, self.agents, strict=True)}

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(5)
        for a in self.agents:
            a.stop()
        self.http.close()
        self.coordinator.stop()


@pytest.fixture
def site(broker: Broker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Site]:
    monkeypatch.setenv("EDGEML_ROLLOUTS_TICK_S", "0.2")
    d = tmp_path / "models"
    models = {
        "1.0.0": modelgen.build_onnx_mlp(d / "v1.onnx"),
        "1.1.0": modelgen.build_onnx_mlp(d / "v11.onnx", version="1.1.0"),  # same network: a good release
        "2.0.0": modelgen.build_onnx_mlp(d / "v2.onnx", seed=7, version="2.0.0"),  # other answers: a bad one
    }
    s = Site(tmp_path / "cloud", broker, models)
    monkeypatch.setenv("EDGEML_CLOUD_URL", s.coordinator.url)
    yield s
    s.close()


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> dict[str, Any]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out)


def _state(site: Site, rid: str, *states: str) -> dict[str, Any] | None:
    doc = site.http.get(f"/v1/rollouts/{rid}").json()
    return doc if doc["state"] in states else None


def test_good_model_is_promoted_to_100_and_bad_one_rolled_back(
    site: Site, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    wait_until(lambda: set(site.versions().values()) == {"1.0.0"}, 20, what="agents on 1.0.0")
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    # the good release, through the REST API
    r = site.http.post("/v1/rollouts", json={"model": "mlp@1.1.0", "strategy": "canary", "target": "env=lab",
                                             "steps": [34, 67, 100], "policy": {"min_dwell_s": 1, "min_samples": 40,
                                             "gates": [{"metric": "psi", "threshold": 0.2},
                                                       {"metric": "health", "threshold": 0}]},
                                             "fleet": "plant", "actor": "ana", "salt": _salt([34, 67])})
    assert r.status_code == 201, r.text
    done = wait_until(lambda: _state(site, r.json()["id"], "completed", "rolled_back", "paused"), 60,
                      interval=0.2, what="good rollout")
    assert done["state"] == "completed", done["reason"]
    wait_until(lambda: set(site.versions().values()) == {"1.1.0"}, 30, what="every agent on 1.1.0")
    assert [a["action"] for a in done["audit"]].count("promote") == 2
    assert {v["verdict"] for v in done["verdicts"]} == {"pass"}

    # the bad release, started with the CLI: caught by the PSI gate in the first step
    first = _cli(capsys, "rollout", "start", "mlp@2.0.0", "--strategy", "canary", "--target", "env=lab",
                 "--steps", "34,67,100", "--policy", str(policy), "--fleet", "plant", "--actor", "bob",
                 "--salt", _salt([34, 67]), "--json")
    assert first["state"] in ("promoting", "running") and first["created_by"] == "bob"
    bad = wait_until(lambda: _state(site, first["id"], "completed", "rolled_back", "paused"), 60,
                     interval=0.2, what="bad rollout")
    assert bad["state"] == "rolled_back", bad["reason"]
    assert bad["step"] == 0 and bad["cohorts"]["canary"] == {"devices": 2, "applied": 2, "reverted": 2}
    psi = next(v for v in bad["verdicts"] if v["gate"] == "psi")
    assert psi["verdict"] == "fail" and psi["evidence"]["psi"] > 0.2
    assert min(psi["evidence"]["samples"].values()) >= 40
    wait_until(lambda: set(site.versions().values()) == {"1.1.0"}, 30, what="canary back on 1.1.0")
    listed = _cli(capsys, "rollout", "list", "--json")
    assert [x["state"] for x in listed] == ["completed", "rolled_back"]
    status = _cli(capsys, "rollout", "status", first["id"], "--json")
    assert [a["action"] for a in status["audit"]][-2:] == ["rollback", "rolled_back"]
    code = main(["rollout", "resume", first["id"], "--actor", "bob"])
    assert code == 1 and "cannot resume" in capsys.readouterr().err
    bad_policy = site.http.post("/v1/rollouts", json={"model": "mlp@2.0.0", "target": "env=lab", "fleet": "plant",
                                                      "actor": "bob", "policy": {"steps": [50, 5]}})
    assert bad_policy.status_code == 400 and "steps" in bad_policy.json()["detail"]
    assert site.http.get("/v1/rollouts/nope").status_code == 404
    assert not site.failures  # serving never stopped through two rollouts and a rollback
