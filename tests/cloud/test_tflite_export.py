"""TFLite float and int8 through litert-torch: export, evaluation on the agent's LiteRT runtime,
the int8 gate, registration with lineage, and the agent's predictions against the cloud's.

Real torch, litert-torch, ai-edge-quantizer, ai-edge-litert, SQLite and artifact store. The
export tests need litert-torch (the ``tflite-export`` extra, not in the CI environment) and
are skipped without it; the skipped-path test runs everywhere, hiding litert-torch if present.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("sklearn")

from cloud import open_store  # noqa: E402
from cloud._exceptions import NotFound  # noqa: E402
from cloud.artifacts import ArtifactStore  # noqa: E402
from cloud.registry.models import ModelRegistry  # noqa: E402
from cloud.training import (  # noqa: E402
    Recipe,
    _tflite,
    build_snapshot,
    load_recipe,
    split,
    train,
)
from edgeml.runtime import load_runtime  # noqa: E402

HAVE_LITERT_TORCH = importlib.util.find_spec("litert_torch") is not None
needs_litert_torch = pytest.mark.skipif(
    not HAVE_LITERT_TORCH,
    reason="litert-torch is not installed (pip install 'edgeml[tflite-export]'): TFLite export cannot run here",
)


def recipe(name: str = "digits-tfl", **quantization: Any) -> Recipe:
    return load_recipe({
        "name": name,
        "model": {"hidden": [32]},
        "data": {"sources": ["sklearn:digits"], "test_fraction": 0.2},
        "training": {"epochs": 6, "batch_size": 64, "lr": 0.003, "seed": 7},
        # min_speedup is tiny so that an int8 candidate is accepted and registered whatever this
        # shared CPU measures; the speed refusal has its own test below
        "quantization": {"latency_repeats": 5, "calibration_rows": 128, "min_speedup": 1e-6, **quantization},
        "export": {"tflite": True},
    })


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Any:
    root = tmp_path_factory.mktemp("tflite")
    store = open_store(f"sqlite://{root}/cloud.db")
    artifacts = ArtifactStore(root / "artifacts")
    yield {"root": root, "store": store, "registry": ModelRegistry(store, artifacts), "artifacts": artifacts,
           "workdir": root / "artifacts" / "training"}
    store.close()


@pytest.fixture(scope="module")
def held_out() -> dict[str, np.ndarray]:
    r = recipe()
    snap = build_snapshot(r.data.sources)
    _, te = split(snap, r.data.test_fraction, r.training.seed)
    return {"x": snap.x[te].astype(np.float32), "y": snap.y[te]}


@pytest.fixture(scope="module")
def run(env: dict[str, Any]) -> dict[str, Any]:
    if not HAVE_LITERT_TORCH:
        pytest.skip("litert-torch is not installed")
    lines: list[str] = []
    result = train(recipe(), store=env["store"], registry=env["registry"], workdir=env["workdir"],
                   progress=lines.append)
    return {"result": result, "lines": lines}


# ------------------------------------------------------------------ without litert-torch (runs everywhere)


def test_without_litert_torch_the_run_says_tflite_was_skipped_and_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "litert_torch", None)  # what an uninstalled package looks like to import
    assert _tflite.unavailable() is not None
    store = open_store(f"sqlite://{tmp_path}/cloud.db")
    try:
        registry = ModelRegistry(store, ArtifactStore(tmp_path / "artifacts"))
        r = train(recipe("digits-notfl", enabled=False), store=store, registry=registry, workdir=tmp_path / "w")
        assert r["tflite"]["status"] == "skipped"
        assert "litert-torch is not installed" in r["tflite"]["reason"]
        assert "tflite-export" in r["tflite"]["reason"]  # names the extra that fixes it
        assert r["registered"] == ["digits-notfl@1"]
        assert not any(k.startswith("tflite") for k in r["artifacts"])
        with pytest.raises(NotFound):
            registry.get("digits-notfl", "1+tflite")
        off = load_recipe({**recipe().as_json(), "name": "digits-off", "export": {"tflite": False},
                           "quantization": {"enabled": False}})
        r = train(off, workdir=tmp_path / "w")
        assert r["tflite"] == {"status": "disabled", "reason": "export.tflite is false"}
    finally:
        store.close()


# ------------------------------------------------------------------ with litert-torch


@needs_litert_torch
def test_float_and_int8_exported_gated_and_registered_with_lineage(run: dict[str, Any], env: dict[str, Any]) -> None:
    r = run["result"]
    t = r["tflite"]
    assert t["status"] == "exported", t
    assert t["versions"]["litert-torch"]
    # the standardization is in the graph: raw features in, the ONNX float's probabilities out
    assert t["float_max_abs_diff_vs_onnx"] <= _tflite.FLOAT_TOLERANCE
    assert t["float"]["accuracy"] == pytest.approx(r["float"]["accuracy"], abs=1e-9)
    assert t["onnx_float"]["latency_us_batch"] > 0 and t["float"]["latency_us_row"] > 0
    assert [c["method"] for c in t["int8_candidates"]] == list(_tflite.INT8_METHODS)
    for cand in t["int8_candidates"]:
        assert "error" not in cand, cand
        g = cand["gate"]
        assert g["accepted"] == (g["accuracy_drop"] <= 0.01 + 1e-12)  # min_speedup is ~0 in this recipe
        assert cand["size_bytes"] < 0.6 * t["float"]["size_bytes"] and cand["runtime"] == "litert"
    assert t["int8"] is not None and t["int8"]["gate"]["accepted"]
    assert any(line.startswith("tflite int8 pt2e_static:") for line in run["lines"])
    assert r["artifacts"]["tflite_float"].endswith("model.tflite")
    assert r["artifacts"]["tflite_int8"] == t["int8"]["path"]

    reg = env["registry"]
    assert r["registered"][-2:] == ["digits-tfl@1+tflite", "digits-tfl@1+tflite-int8"]
    flt = reg.get("digits-tfl", "1+tflite")
    assert flt.format == "tflite" and flt.parent == "digits-tfl@1"
    assert flt.dataset_hash == r["dataset"]["hash"] and flt.params["quantization"] == "none"
    assert flt.params["recipe_sha256"] == r["recipe_sha256"] and flt.params["weights_sha256"] == r["weights_sha256"]
    assert flt.metrics["size_bytes"]["litert"] == flt.size and flt.metrics["latency_us"]["litert"] > 0
    q = reg.get("digits-tfl", "1+tflite-int8")
    assert q.format == "tflite" and q.parent == "digits-tfl@1+tflite"
    assert q.params["quantization"] == t["int8"]["method"] and q.metrics["gate"]["accepted"]
    assert q.metrics["float_accuracy"] == t["float"]["accuracy"]


@needs_litert_torch
def test_agent_predictions_equal_the_cloud_evaluation(
    run: dict[str, Any], env: dict[str, Any], held_out: dict[str, np.ndarray],
) -> None:
    """The registered .tflite files, loaded by the agent's runtime, predict the held-out rows as
    the cloud evaluated them: same accuracy; int8 within the quantization tolerance of float."""
    reg, artifacts = env["registry"], env["artifacts"]
    x, y = held_out["x"], held_out["y"]
    probs = {}
    for version in ("1+tflite", "1+tflite-int8"):
        record = reg.get("digits-tfl", version)
        runtime = load_runtime(artifacts.path(record.sha256))  # the engine from the file, as the agent does
        try:
            # traced with one row: the agent takes one row or a batch, as from the ONNX model
            assert runtime.engine == "litert" and runtime.inputs[0].shape == (None, 64)
            assert record.inputs[0]["shape"][1:] == [64] and record.inputs[0]["shape"][0] in (1, -1, None)
            name = runtime.inputs[0].name
            batch = next(iter(runtime.run(runtime.prepare({name: x})).values()))
            rows = np.concatenate([next(iter(runtime.run({name: x[i : i + 1]}).values())) for i in range(len(x))])
        finally:
            runtime.close()
        np.testing.assert_allclose(rows, batch, atol=1e-5)  # one row at a time = the whole batch
        assert float((batch.argmax(axis=1) == y).mean()) == record.metrics["accuracy"]
        probs[version] = batch
    onnx = _tflite.probabilities(Path(run["result"]["artifacts"]["onnx_float"]), x)
    assert np.abs(probs["1+tflite"] - onnx).max() <= _tflite.FLOAT_TOLERANCE
    q, f = probs["1+tflite-int8"], probs["1+tflite"]
    assert np.abs(q - f).mean() < 0.02  # int8 steps; a few ambiguous rows move more
    assert (q.argmax(axis=1) == f.argmax(axis=1)).mean() >= 0.97


@needs_litert_torch
def test_int8_not_faster_is_refused_with_the_figures(env: dict[str, Any], held_out: dict[str, np.ndarray]) -> None:
    from cloud.training import _torch

    r = recipe("digits-slow", min_speedup=1000.0)
    snap = build_snapshot(r.data.sources)
    tr, te = split(snap, r.data.test_fraction, r.training.seed)
    trained = _torch.train_model(r.model_copy(update={"training": r.training.model_copy(update={"epochs": 2})}),
                                 snap.x[tr], snap.y[tr], snap.x[te], snap.y[te], 10)
    run_dir = env["root"] / "slow"
    onnx = _torch.export_onnx(trained.model, run_dir / "model.onnx", 17, {})
    doc = _tflite.export_and_gate(trained.model, run_dir, snap.x[tr][:64], held_out["x"], held_out["y"],
                                  onnx_float=onnx, margin=0.01, min_speedup=1000.0, repeats=3)
    assert doc["status"] == "exported" and doc["int8"] is None
    assert "tflite_int8" not in doc["artifacts"]
    assert len(doc["int8_candidates"]) == len(_tflite.INT8_METHODS)
    for cand in doc["int8_candidates"]:
        assert not cand["gate"]["accepted"]
        assert any("not faster than float" in why for why in cand["gate"]["reasons"])
        assert cand["accuracy"] > 0 and cand["latency_us_batch"] > 0 and cand["size_bytes"] > 0
    refs = _tflite.register(env["registry"], "digits-slow", "1", doc, lineage={}, base_metrics={},
                            parent=None, dataset_hash=snap.hash)
    assert refs == ["digits-slow@1+tflite"]
    with pytest.raises(NotFound):
        env["registry"].get("digits-slow", "1+tflite-int8")
