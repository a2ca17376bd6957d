"""Health checks of a candidate by the samples its model file carries (``edgeml.samples``):
expected outputs, output shapes of every dtype, the latency budget, malformed metadata;
and, on a real agent, what a rejection leaves behind."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edgeml._models import LoadedModel, ModelStore
from edgeml._testing import models as modelgen
from edgeml.updates import SAMPLES_KEY, UpdateRejected, encode_samples
from edgeml.updates._health import health_check

from .conftest import Broker, Collector, wait_until
from .test_updates import Fleet, X, finished, make_agent
from .test_updates import fleet as fleet  # noqa: F401 - the coordinator fixture

SEED_V2 = 7
INPUTS = [{"input": x} for x in np.random.default_rng(21).standard_normal((4, 2, 4)).astype(np.float32)]


def truth(seed: int) -> list[dict[str, np.ndarray]]:
    """What the MLP of ``seed`` answers for INPUTS, computed in numpy (not by the engine)."""
    weights = modelgen.mlp_weights(seed=seed)
    return [{"probs": modelgen.reference_forward(s["input"], weights)} for s in INPUTS]


@pytest.fixture
def store(tmp_path: Path) -> ModelStore:
    return ModelStore(tmp_path / "store", warmup_runs=0)


@pytest.fixture
def mlp(tmp_path: Path) -> Path:
    return modelgen.build_onnx_mlp(tmp_path / "v2.onnx", seed=SEED_V2, version="2.0.0")


def load(store: ModelStore, path: Path) -> LoadedModel:
    return store.load(path)


def rejection(model: LoadedModel, budget_ms: float | None = None) -> tuple[str, str]:
    with pytest.raises(UpdateRejected) as info:
        health_check(model, latency_budget_ms=budget_ms)
    return info.value.reason, str(info.value)


def test_samples_that_agree_pass_and_are_checked(store: ModelStore, mlp: Path, tmp_path: Path) -> None:
    model = load(store, modelgen.embed_samples(mlp, INPUTS, truth(SEED_V2), atol=1e-5, dst=tmp_path / "ok.onnx"))
    assert json.loads(model.runtime.metadata[SAMPLES_KEY])["atol"] == 1e-5
    report = health_check(model, latency_budget_ms=None)
    assert report["samples"] == len(INPUTS) and report["expected_checked"] is True


def test_expected_outputs_that_disagree_are_unhealthy(store: ModelStore, mlp: Path, tmp_path: Path) -> None:
    # the samples of another network (seed 0): the file carries outputs its model does not give
    model = load(store, modelgen.embed_samples(mlp, INPUTS, truth(0), atol=1e-5, dst=tmp_path / "other.onnx"))
    reason, message = rejection(model)
    assert reason == "unhealthy" and "disagrees with the expected values" in message
    # one sample off by more than atol is enough; within atol passes
    near = [{"probs": y["probs"] + 5e-4} for y in truth(SEED_V2)]
    assert health_check(load(store, modelgen.embed_samples(mlp, INPUTS, near, atol=1e-3, dst=tmp_path / "n.onnx")),
                        latency_budget_ms=None)["expected_checked"]
    off = truth(SEED_V2)
    off[2] = {"probs": off[2]["probs"] + 2e-3}
    reason, message = rejection(load(store, modelgen.embed_samples(mlp, INPUTS, off, atol=1e-3,
                                                                   dst=tmp_path / "off.onnx")))
    assert reason == "unhealthy" and message.startswith("sample 2:")


def test_mean_latency_over_the_budget_is_unhealthy(store: ModelStore, mlp: Path, tmp_path: Path) -> None:
    model = load(store, modelgen.embed_samples(mlp, INPUTS, truth(SEED_V2), atol=1e-5, dst=tmp_path / "s.onnx"))
    reason, message = rejection(model, budget_ms=1e-6)  # a budget no model can meet
    assert reason == "unhealthy" and "exceeds the budget of 1e-06 ms" in message
    assert health_check(model, latency_budget_ms=1e6)["mean_latency_ms"] > 0  # a budget every model meets


@pytest.mark.parametrize(
    ("raw", "says"),
    [
        ("{not json", "not JSON"),
        ("[1, 2]", "not a JSON object"),
        ('{"outputs": []}', '"inputs" must be'),
        ('{"inputs": []}', '"inputs" must be'),
        ('{"inputs": [[0.1, 0.2, 0.3, 0.4]]}', '"inputs" must be'),
        ('{"inputs": [{"input": [[0, 0, 0, 0]]}], "outputs": [{"probs": [[1, 0, 0]]}, {"probs": [[1, 0, 0]]}]}',
         '"outputs" must be'),
        ('{"inputs": [{"input": [[0, 0, 0, 0]]}], "outputs": [{"label": [1]}]}', "expects output 'label'"),
        ('{"inputs": [{"input": [[0, 0, 0, 0]]}], "outputs": [{"probs": [[1, 0], [0]]}]}', "not a numeric array"),
        ('{"inputs": [{"input": [[0, 0, 0, 0]]}], "atol": -1}', '"atol" must be'),
        ('{"inputs": [{"input": [[0, 0, 0, 0]]}], "atol": "x"}', '"atol" must be'),
        ('{"inputs": [{"pixels": [[0, 0, 0, 0]]}]}', "missing input 'input'"),
        ('{"inputs": [{"input": [[0, 0, 0]]}]}', "expected shape"),
    ],
)
def test_malformed_samples_metadata_is_bad_metadata(
    raw: str, says: str, store: ModelStore, mlp: Path, tmp_path: Path
) -> None:
    model = load(store, modelgen.embed_samples(mlp, [], raw=raw, dst=tmp_path / "bad.onnx"))
    reason, message = rejection(model)
    assert reason == "bad_metadata" and says in message, message


def test_output_shapes_are_checked_for_int_outputs_too(store: ModelStore, tmp_path: Path) -> None:
    honest = load(store, modelgen.build_onnx_argmax(tmp_path / "honest.onnx", declared=("N", 1)))
    assert honest.runtime.outputs[0].dtype == np.int64
    assert health_check(honest, latency_budget_ms=None)["samples"] == 3
    # the file declares [N, 2] int64 and answers [N, 1]
    lying = load(store, modelgen.build_onnx_argmax(tmp_path / "lying.onnx", declared=("N", 2)))
    assert lying.runtime.outputs[0].shape == (None, 2)
    reason, message = rejection(lying)
    assert reason == "unhealthy" and "output 'label' has shape [1, 1], the model declares ['N', 2]" in message
    # a declared rank that the graph contradicts: ONNX Runtime drops the declaration (it says
    # [], as for an undeclared rank), so there is no rank left to hold the output to
    flat = load(store, modelgen.build_onnx_argmax(tmp_path / "flat.onnx", declared=("N",)))
    assert flat.runtime.outputs[0].rank_known is False
    assert health_check(flat, latency_budget_ms=None)["samples"] == 3


def test_encode_samples_refuses_what_the_check_would_reject() -> None:
    with pytest.raises(ValueError):
        encode_samples([])
    with pytest.raises(ValueError):
        encode_samples(INPUTS, truth(SEED_V2)[:1])
    doc = json.loads(encode_samples(INPUTS[:1], truth(SEED_V2)[:1]))
    assert set(doc) == {"inputs", "outputs"} and np.asarray(doc["inputs"][0]["input"]).shape == (2, 4)


def test_the_agent_rejects_a_candidate_by_its_own_samples_and_keeps_serving(
    broker: Broker, collector: Collector, fleet: Fleet, models: dict[str, Path], tmp_path: Path
) -> None:
    fleet.register(models["onnx_float"], "1.0.0")
    base = modelgen.build_onnx_mlp(tmp_path / "v2.onnx", seed=SEED_V2, version="2.0.0")
    wrong = fleet.register(modelgen.embed_samples(base, INPUTS, truth(0), atol=1e-5, dst=tmp_path / "a.onnx"), "2.0.1")
    broken = fleet.register(modelgen.embed_samples(base, [], raw='{"inputs": 3}', dst=tmp_path / "b.onnx"), "2.0.2")
    right = fleet.register(modelgen.embed_samples(base, INPUTS, truth(SEED_V2), atol=1e-5, dst=tmp_path / "c.onnx"),
                           "2.0.3")
    store = tmp_path / "agent" / "models"
    with make_agent(tmp_path, broker, fleet, models["onnx_float"]) as agent:
        active = agent.model.info.sha256  # type: ignore[union-attr]
        for version, meta, reason in (("2.0.1", wrong, "unhealthy"), ("2.0.2", broken, "bad_metadata")):
            doc = fleet.deploy(f"mlp@{version}")
            status = wait_until(lambda doc=doc: finished(agent, doc["revision"]), 30, what=f"update to {version}")
            assert (status["update"]["result"], status["update"]["reason"]) == ("rejected", reason)
            assert agent.model is not None and agent.model.info.sha256 == active
            assert agent.predict({"input": X}).version == "1.0.0"
            assert not list(store.glob(f"{meta['sha256']}.*"))  # the rejected candidate is not kept
        doc = fleet.deploy("mlp@2.0.3")
        status = wait_until(lambda: finished(agent, doc["revision"]), 30, what="update to 2.0.3")
        assert status["update"]["result"] == "success"
        assert agent.model is not None and agent.model.info.sha256 == right["sha256"]
        wait_until(lambda: any(r.get("name") == "update_health" and r["data"]["revision"] == doc["revision"]
                               for r in collector.records()), 10, what="the health report")
    health = [r["data"] for r in collector.records() if r.get("name") == "update_health"]
    assert health[-1]["expected_checked"] is True and health[-1]["samples"] == len(INPUTS)
    failed = {r["data"]["reason"] for r in collector.records() if r.get("name") == "update_failed"}
    assert failed == {"unhealthy", "bad_metadata"}


def test_an_output_of_undeclared_rank_is_not_held_to_a_shape(store: ModelStore, tmp_path: Path) -> None:
    """ONNX Runtime describes an output whose rank depends on the data as ``[]``: the health
    check runs the samples but does not hold the output to a rank the model never declared."""
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("total", TensorProto.FLOAT, None)
    nodes = [  # total = sum(x) expanded to a rank equal to the number of non-zero inputs
        helper.make_node("NonZero", ["input"], ["nz"]),
        helper.make_node("Shape", ["nz"], ["nz_shape"]),
        helper.make_node("Slice", ["nz_shape", "one", "two"], ["count"]),
        helper.make_node("ConstantOfShape", ["count"], ["ones"], value=helper.make_tensor("v", TensorProto.INT64, [1], [1])),
        helper.make_node("ReduceSum", ["input"], ["sum"], keepdims=0),
        helper.make_node("Expand", ["sum", "ones"], ["total"]),
    ]
    init = [helper.make_tensor("one", TensorProto.INT64, [1], [1]), helper.make_tensor("two", TensorProto.INT64, [1], [2])]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y], initializer=init),
                              opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    path = tmp_path / "rank.onnx"
    onnx.save(model, str(path))
    samples = [{"input": np.array([[1, 0, 2, 0]], np.float32)}, {"input": np.ones((1, 4), np.float32)}]
    expected = [{"total": np.full((1, 1), 3.0, np.float32)}, {"total": np.full((1, 1, 1, 1), 4.0, np.float32)}]
    model = store.load(modelgen.embed_samples(path, samples, expected, dst=tmp_path / "rank-ok.onnx"))
    assert model.runtime.outputs[0].rank_known is False
    assert health_check(model, latency_budget_ms=None)["expected_checked"] is True
    # the values are still held to what the file expects
    wrong = [{"total": np.full((1, 1), 9.0, np.float32)}, expected[1]]
    model = store.load(modelgen.embed_samples(path, samples, wrong, dst=tmp_path / "rank-bad.onnx"))
    assert rejection(model)[0] == "unhealthy"


def tflite_with_samples(path: Path, expected: list[dict[str, np.ndarray]], *, seed: int = SEED_V2) -> Path:
    samples = encode_samples(INPUTS, expected, atol=1e-5)
    return modelgen.build_tflite_mlp(path, seed=seed, metadata={"edgeml.name": "mlp", SAMPLES_KEY: samples})


def test_a_tflite_file_carries_its_samples_too(store: ModelStore, tmp_path: Path) -> None:
    """TFLite keeps text metadata in ``Model.metadata`` buffers: the agent reads them (without
    LiteRT's schema) and holds a TFLite candidate to its own samples like an ONNX one."""
    from ai_edge_litert import schema_py_generated as schema

    path = tflite_with_samples(tmp_path / "ok.tflite", truth(SEED_V2))
    model = load(store, path)
    assert model.runtime.engine == "litert"
    # what the reader found is what LiteRT's own flatbuffer schema finds
    root = schema.Model.GetRootAs(path.read_bytes(), 0)
    entries = {root.Metadata(i).Name().decode(): root.Buffers(root.Metadata(i).Buffer()).DataAsNumpy().tobytes().decode()
               for i in range(root.MetadataLength())}
    assert model.runtime.metadata == entries and json.loads(entries[SAMPLES_KEY])["atol"] == 1e-5
    assert health_check(model, latency_budget_ms=None)["expected_checked"] is True
    wrong = load(store, tflite_with_samples(tmp_path / "wrong.tflite", truth(0)))
    assert rejection(wrong)[0] == "unhealthy"


def test_the_agent_updates_from_onnx_to_a_tflite_model_checked_by_its_samples(
    broker: Broker, collector: Collector, fleet: Fleet, models: dict[str, Path], tmp_path: Path
) -> None:
    fleet.register(models["onnx_float"], "1.0.0")
    wrong = fleet.register(tflite_with_samples(tmp_path / "wrong.tflite", truth(0)), "3.0.0")
    right = fleet.register(tflite_with_samples(tmp_path / "right.tflite", truth(SEED_V2)), "3.0.1")
    with make_agent(tmp_path, broker, fleet, models["onnx_float"]) as agent:
        doc = fleet.deploy("mlp@3.0.0")
        status = wait_until(lambda: finished(agent, doc["revision"]), 30, what="update to 3.0.0")
        assert (status["update"]["result"], status["update"]["reason"]) == ("rejected", "unhealthy")
        assert agent.model is not None and agent.model.info.engine == "onnx"
        assert not list((tmp_path / "agent" / "models").glob(f"{wrong['sha256']}.*"))
        doc = fleet.deploy("mlp@3.0.1")
        status = wait_until(lambda: finished(agent, doc["revision"]), 30, what="update to 3.0.1")
        assert status["update"]["result"] == "success"
        assert (agent.model.info.sha256, agent.model.info.engine) == (right["sha256"], "litert")
        x = INPUTS[0]["input"][:1]
        got = agent.predict({"input": x})
        assert got.version == "3.0.1"
        np.testing.assert_allclose(got.outputs["probs"], truth(SEED_V2)[0]["probs"][:1], atol=1e-5)
        wait_until(lambda: any(r.get("name") == "update_health" and r["data"]["revision"] == doc["revision"]
                               for r in collector.records()), 10, what="the health report")
    health = [r["data"] for r in collector.records() if r.get("name") == "update_health"]
    assert health[-1]["expected_checked"] is True and health[-1]["samples"] == len(INPUTS)
