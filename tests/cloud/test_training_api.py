"""The training REST API on a real coordinator (SQLite, Mosquitto): runs start in the
background (202, one at a time), are listed and shown with their figures; drift
measurements are readable, with "no reference" for versions trained before references
existed; errors are the cloud's own (400/404/409). And the CLI still trains."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import yaml

pytest.importorskip("torch")
pytest.importorskip("sklearn")

from cloud._config import CloudConfig  # noqa: E402
from cloud.coordinator import Coordinator  # noqa: E402
from cloud.keys import generate_keys  # noqa: E402
from edgeml._testing import models as modelgen  # noqa: E402
from edgeml._testing.sensor import SensorStream  # noqa: E402
from edgeml.cli import main  # noqa: E402

from .._stores import cloud_db  # noqa: E402
from ..conftest import Broker, wait_until  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def small_sensor_recipe(name: str = "sensor-small", epochs: int = 4) -> dict[str, Any]:
    doc = yaml.safe_load((ROOT / "configs" / "recipes" / "sensor-mlp.yaml").read_text())
    doc.update(name=name)
    doc["training"]["epochs"] = epochs
    doc["data"]["sources"][0]["rows"] = 600
    doc["quantization"].update(latency_repeats=3, calibration_rows=64)
    return doc


@pytest.fixture
def api(broker: Broker, tmp_path: Path) -> Iterator[Any]:
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    (recipes / "small.yaml").write_text(yaml.safe_dump(small_sensor_recipe()))
    generate_keys(tmp_path / "keys")  # a signing key: the desired-state service, hence the leader election
    config = CloudConfig(broker_url=broker.url, db=cloud_db(tmp_path), http_addr="127.0.0.1:0",
                         artifact_dir=tmp_path / "artifacts", signing_key=tmp_path / "keys" / "fleet.key",
                         training={"recipes_dir": recipes})
    with Coordinator(config) as coordinator, httpx.Client(base_url=coordinator.url, timeout=30) as http:
        wait_until(lambda: coordinator.desired.is_leader, 10, what="leadership")  # PostgreSQL: an advisory lock
        yield coordinator, http


def _finished(http: httpx.Client, run_id: str) -> dict[str, Any]:
    return wait_until(lambda: (doc := http.get(f"/v1/training/runs/{run_id}").json())["status"] != "running" and doc,
                      120, interval=0.2, what=f"run {run_id}")


def test_runs_start_in_the_background_one_at_a_time(api: Any) -> None:
    coordinator, http = api
    r = http.post("/v1/training/runs", json={"recipe": "small.yaml"})
    assert r.status_code == 202, r.text
    run_id = r.json()["run_id"]
    assert r.json()["status"] == "running" and r.headers["location"] == f"/v1/training/runs/{run_id}"
    busy = http.post("/v1/training/runs", json={"recipe": small_sensor_recipe("other")})
    assert busy.status_code == 409 and busy.json()["error"] == "TrainingBusy" and run_id in busy.json()["detail"]

    run = _finished(http, run_id)
    assert run["status"] == "succeeded", run["error"]
    assert [e["epoch"] for e in run["epochs"]] == [1, 2, 3, 4]
    assert run["dataset_hash"].startswith("sha256:") and run["code_version"]["edgeml"]
    result = run["result"]
    assert result["registered"][0] == "sensor-small@1" and result["float"]["accuracy"] > 0.8
    assert len(result["int8_candidates"]) == 2 and all("gate" in c for c in result["int8_candidates"])
    reference = coordinator.registry.get("sensor-small", "1").params["drift_reference"]
    assert reference["inputs"]["features"] == 8 and sum(reference["predictions"]["counts"].values()) == result["split"]["train"]

    second = http.post("/v1/training/runs", json={"recipe": small_sensor_recipe(epochs=2), "dry_run": True,
                                                  "parent": "sensor-small@1"})
    assert second.status_code == 202
    done = _finished(http, second.json()["run_id"])
    assert done["status"] == "succeeded" and done["result"]["registered"] == []
    listed = http.get("/v1/training/runs").json()
    assert [r["run_id"] for r in listed] == [run_id, second.json()["run_id"]] and "epochs" not in listed[0]
    assert [r["run_id"] for r in http.get("/v1/training/runs", params={"name": "nothing"}).json()] == []


@pytest.mark.parametrize(("body", "status", "error", "says"), [
    ({"recipe": "missing.yaml"}, 404, "NotFound", "no recipe 'missing.yaml'"),
    ({"recipe": "../cloud.db"}, 400, "InvalidInput", "not a recipe file name"),
    ({"recipe": "/etc/hostname"}, 400, "InvalidInput", "not a recipe file name"),
    ({"recipe": {"name": "x", "training": {"epochs": 0}}}, 400, "InvalidInput", "training.epochs"),
    ({"recipe": {"name": "x", "data": {"sources": ["kaggle:mnist"]}}}, 400, "InvalidInput", "data.sources"),
    ({"recipe": "small.yaml", "colour": "red"}, 400, "RequestValidationError", "colour"),
])
def test_bad_requests_say_what_is_wrong(api: Any, body: dict[str, Any], status: int, error: str, says: str) -> None:
    _, http = api
    r = http.post("/v1/training/runs", json=body)
    assert r.status_code == status, r.text
    assert r.json()["error"] == error and says in r.json()["detail"]
    assert http.get("/v1/training/runs").json() == []  # nothing was started


def test_unknown_run_is_404(api: Any) -> None:
    _, http = api
    r = http.get("/v1/training/runs/run-nope")
    assert r.status_code == 404 and "run-nope" in r.json()["detail"]


def test_drift_over_the_api_with_and_without_a_reference(api: Any, tmp_path: Path) -> None:
    coordinator, http = api
    assert http.get("/v1/drift").json() == []
    run = _finished(http, http.post("/v1/training/runs", json={"recipe": "small.yaml"}).json()["run_id"])
    assert run["status"] == "succeeded"
    coordinator.registry.register(modelgen.build_onnx_mlp(tmp_path / "old.onnx", n_in=8), name="sensor-small",
                                  version="0")  # uploaded, never trained here: no reference
    stream, t0 = SensorStream(), time.time() - 30
    records: list[dict[str, Any]] = []
    for version, drift in (("1", 0.8), ("0", 0.0)):
        x, y = stream.sample(150, drift=drift, rng=3)
        for i, row in enumerate(x):
            base = {"ts": t0 + i * 0.1, "model": "sensor-small", "version": version}
            records.append({**base, "kind": "sample", "prediction_id": f"{version}-{i}", "inputs": {"input": [row.tolist()]},
                            "outputs": {"probs": [[0.2, 0.3, 0.5]]}})
            records.append({**base, "kind": "prediction", "latency_us": 50.0, "batch": 1,
                            "summary": {"output": "probs", "top1": int(y[i]), "score": 0.9, "mean": 0.33}})
    coordinator.store.insert_telemetry("default", "dev-1", "s", [{**r, "seq": i + 1} for i, r in enumerate(records)])

    measured = http.post("/v1/drift/measure", params={"model": "sensor-small"})
    assert measured.status_code == 200
    latest = {m["version"]: m for m in http.get("/v1/drift").json()}
    assert set(latest) == {"0", "1"} and {m["id"] for m in measured.json()} == {m["id"] for m in latest.values()}
    drifted = latest["1"]
    assert drifted["status"] == "drift" and drifted["samples"] == drifted["predictions"] == 150
    assert drifted["input_psi"] > 0.2 and len(drifted["feature_psi"]) == 8 and drifted["cohort"] == "*"
    assert drifted["devices"] == ["dev-1"] and drifted["threshold"] == 0.2
    assert latest["0"]["status"] == "no_reference" and "no training reference" in latest["0"]["reason"]
    assert http.get("/v1/drift", params={"model": "other"}).json() == []
    # no model is configured for continuous training: a check does nothing, and says so
    assert http.post("/v1/training/check").json() == [] and http.get("/v1/training/triggers").json() == []


def test_cli_trains_the_sensor_recipe(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "cloud.yaml"
    config.write_text(f"db: {cloud_db(tmp_path)}\nartifact_dir: {tmp_path}/art\n")
    recipe = tmp_path / "sensor.yaml"
    recipe.write_text(yaml.safe_dump(small_sensor_recipe(epochs=3)))
    code = main(["models", "train", "--recipe", str(recipe), "-c", str(config), "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    result = json.loads(out)
    assert "epoch 3/3" in err and result["registered"][0] == "sensor-small@1"
    assert result["dataset"]["sources"] == ["sensor:seed=0,drift=0,rows=600"]
    assert np.isclose(sum(result["drift_reference"]["inputs"]["counts"][0]), result["split"]["train"])


def test_cli_shows_drift(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "cloud.yaml"
    db = cloud_db(tmp_path)
    config.write_text(f"db: {db}\nartifact_dir: {tmp_path}/art\ntraining: {{min_samples: 20}}\n")
    recipe = tmp_path / "sensor.yaml"
    recipe.write_text(yaml.safe_dump(small_sensor_recipe(epochs=2)))
    assert main(["models", "train", "--recipe", str(recipe), "-c", str(config)]) == 0
    assert main(["models", "drift", "-c", str(config)]) == 0
    assert "no drift measurements" in capsys.readouterr().out
    from cloud import open_store

    x, _ = SensorStream().sample(40, drift=1.0, rng=1)
    with open_store(db) as store:
        store.insert_telemetry("default", "d", "s", [
            {"seq": i + 1, "ts": time.time() - 5, "kind": "sample", "model": "sensor-small", "version": "1",
             "inputs": {"input": [row.tolist()]}, "outputs": {}} for i, row in enumerate(x)])
    assert main(["models", "drift", "--measure", "-c", str(config)]) == 0
    out = capsys.readouterr().out
    assert "sensor-small@1" in out and "drift" in out.split("sensor-small@1")[1].split("\n")[0]
    assert main(["models", "drift", "--json", "--model", "sensor-small", "-c", str(config)]) == 0
    [doc] = json.loads(capsys.readouterr().out)
    assert doc["status"] == "drift" and doc["samples"] == 40 and doc["input_psi"] > 0.2
