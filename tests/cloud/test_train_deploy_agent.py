"""Train → quantize → register → deploy to a real agent: the agent's predictions on the
held-out set equal the cloud's evaluation (the float exactly, the int8 within the
quantization tolerance).

A real coordinator (SQLite, fleet signing key, Mosquitto) trains the small digits recipe,
registers the gated artifacts, and deploys each one by a signed desired state to a real
:class:`edgeml.Agent`, which downloads, verifies, health-checks and swaps it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnx
import pytest

pytest.importorskip("torch")
pytest.importorskip("sklearn")

from cloud._config import CloudConfig  # noqa: E402
from cloud.coordinator import Coordinator  # noqa: E402
from cloud.keys import generate_keys  # noqa: E402
from cloud.training import build_snapshot, split, train  # noqa: E402
from cloud.training._quantize import probabilities  # noqa: E402
from edgeml import Agent, load_config  # noqa: E402
from edgeml.updates import SAMPLES_KEY  # noqa: E402

from .._stores import cloud_db  # noqa: E402
from ..conftest import Broker, agent_env, wait_until  # noqa: E402
from .test_training import small_recipe  # noqa: E402


def test_the_agent_serves_what_the_cloud_evaluated(broker: Broker, tmp_path: Path) -> None:
    generate_keys(tmp_path / "keys")
    config = CloudConfig(broker_url=broker.url, db=cloud_db(tmp_path), http_addr="127.0.0.1:0",
                         artifact_dir=tmp_path / "artifacts", signing_key=tmp_path / "keys" / "fleet.key")
    recipe = small_recipe()
    snap = build_snapshot(recipe.data.sources)
    _, test_idx = split(snap, recipe.data.test_fraction, recipe.training.seed)
    x_te, y_te = snap.x[test_idx].astype(np.float32), snap.y[test_idx]
    with Coordinator(config) as coordinator, httpx.Client(base_url=coordinator.url, timeout=30) as http:
        result = train(recipe, store=coordinator.store, registry=coordinator.registry,
                       workdir=tmp_path / "artifacts" / "training")
        float_ref = result["registered"][0]
        env = agent_env(EDGEML_DATA_DIR=tmp_path / "agent", EDGEML_BROKER_URL=broker.url, EDGEML_DEVICE_ID="dev-1",
                        EDGEML_FLEET="plant", EDGEML_FLEET_PUBKEY=tmp_path / "keys" / "fleet.pub",
                        EDGEML_API_ADDR="off", EDGEML_UPDATES__PROBATION_S=0.2,
                        EDGEML_UPDATES__PROBATION_MIN_PREDICTIONS=0)
        with Agent(load_config(env=env)) as agent:
            wait_until(lambda: http.get("/v1/devices/plant/dev-1").status_code == 200, 20, what="registration")

            def serve(ref: str) -> np.ndarray:
                r = http.put("/v1/devices/plant/dev-1/desired", json={"model": ref})
                assert r.status_code == 200, r.text
                version = ref.partition("@")[2]
                wait_until(lambda: agent.model is not None and agent.model.version == version
                           and agent.status()["update"]["state"] == "idle", 60, what=f"the agent on {ref}")
                assert agent.status()["update"]["result"] == "success"
                out: dict[str, Any] = agent.predict({"input": x_te}).outputs
                return np.asarray(out["probs"])

            on_agent = serve(float_ref)
            # the export shipped held-out rows and its own outputs for them: the agent checked them
            props = {p.key: p.value for p in onnx.load(result["artifacts"]["onnx_float"]).metadata_props}
            samples = json.loads(props[SAMPLES_KEY])
            assert len(samples["inputs"]) == len(samples["outputs"]) == 8

            def health_reports() -> list[dict[str, Any]]:
                rows = http.get("/v1/events", params={"fleet": "plant", "limit": 1000}).json()
                return [r["body"]["data"] for r in rows if r["body"].get("name") == "update_health"]

            reports = wait_until(health_reports, 20, what="the health report at the coordinator")
            assert reports[0]["expected_checked"] is True and reports[0]["samples"] == 8
            cloud = probabilities(Path(result["artifacts"]["onnx_float"]), x_te)
            assert np.abs(on_agent - cloud).max() < 1e-5  # the same graph, preprocessing included
            assert (on_agent.argmax(1) == y_te).mean() == pytest.approx(result["float"]["accuracy"], abs=1e-12)

            if result["int8"] is not None:  # the gate accepted one: it serves its evaluated accuracy
                int8_ref = result["registered"][1]
                on_agent8 = serve(int8_ref)
                assert (on_agent8.argmax(1) == y_te).mean() == pytest.approx(result["int8"]["accuracy"], abs=1e-12)
                assert np.abs(on_agent8 - on_agent).mean() < 0.02  # the quantization tolerance of the run's gate
