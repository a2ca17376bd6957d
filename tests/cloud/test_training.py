"""Training: recipes, deterministic torch training, ONNX export with preprocessing in the graph,
the int8 gate, snapshots, run tracking and registry lineage. Real torch, onnxruntime, SQLite."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")

from cloud import Store, open_store  # noqa: E402
from cloud._exceptions import InvalidInput, NotFound  # noqa: E402
from cloud.artifacts import ArtifactStore  # noqa: E402
from cloud.registry.models import ModelRegistry  # noqa: E402
from cloud.training import (  # noqa: E402
    DEFAULT_MARGIN,
    Evaluation,
    InvalidRecipe,
    Recipe,
    RunStore,
    build_snapshot,
    compare_runs,
    gate,
    load_recipe,
    load_snapshot,
    save_snapshot,
    split,
    train,
)
from cloud.training import _torch as ttorch  # noqa: E402
from cloud.training._quantize import probabilities  # noqa: E402
from edgeml.cli import main  # noqa: E402

RECIPES = Path(__file__).resolve().parents[2] / "configs" / "recipes"


def small_recipe(**overrides: Any) -> Recipe:
    doc: dict[str, Any] = {
        "name": "digits-test",
        "model": {"hidden": [32]},
        "data": {"sources": ["sklearn:digits"], "test_fraction": 0.2},
        "training": {"epochs": 6, "batch_size": 64, "lr": 0.003, "seed": 7},
        "quantization": {"latency_repeats": 5, "calibration_rows": 128},
    }
    for key, value in overrides.items():
        doc[key] = {**doc.get(key, {}), **value} if isinstance(value, dict) else value
    return load_recipe(doc)


@pytest.fixture(scope="module")
def digits() -> dict[str, Any]:
    recipe = small_recipe()
    snap = build_snapshot(recipe.data.sources)
    tr, te = split(snap, recipe.data.test_fraction, recipe.training.seed)
    return {"recipe": recipe, "snap": snap, "x_tr": snap.x[tr], "y_tr": snap.y[tr], "x_te": snap.x[te], "y_te": snap.y[te]}


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Any:
    root = tmp_path_factory.mktemp("training")
    store = open_store(f"sqlite://{root}/cloud.db")
    registry = ModelRegistry(store, ArtifactStore(root / "artifacts"))
    yield {"root": root, "store": store, "registry": registry, "workdir": root / "artifacts" / "training"}
    store.close()


@pytest.fixture(scope="module")
def run(env: dict[str, Any]) -> dict[str, Any]:
    """One full run of the small recipe: train, export, quantize, gate, register."""
    lines: list[str] = []
    result = train(small_recipe(), store=env["store"], registry=env["registry"], workdir=env["workdir"],
                   progress=lines.append)
    return {"result": result, "lines": lines}


# ------------------------------------------------------------------ recipes


def test_shipped_recipes_load() -> None:
    for path in sorted(RECIPES.glob("*.yaml")):
        recipe = load_recipe(path)
        assert recipe.quantization.margin == DEFAULT_MARGIN == 0.01
        assert recipe.data.sources[0].type in ("sklearn", "sensor")  # offline data only: nothing downloaded
        assert recipe.export.opset == 17


def test_bad_recipe_names_the_key(tmp_path: Path) -> None:
    with pytest.raises(InvalidRecipe) as err:
        load_recipe({"name": "x", "training": {"epochs": 0}})
    assert err.value.key == "training.epochs"
    with pytest.raises(InvalidRecipe) as err:
        load_recipe({"name": "x", "model": {"hiden": [3]}})
    assert err.value.key == "model.hiden"
    with pytest.raises(InvalidRecipe, match="sklearn:NAME"):
        load_recipe({"name": "x", "data": {"sources": ["kaggle:mnist"]}})
    assert small_recipe().digest() == small_recipe().digest() != small_recipe(training={"seed": 8}).digest()


# ------------------------------------------------------------------ torch


def _train(d: dict[str, Any], recipe: Recipe) -> ttorch.TrainedModel:
    return ttorch.train_model(recipe, d["x_tr"], d["y_tr"], d["x_te"], d["y_te"], 10)


def test_training_is_deterministic(digits: dict[str, Any]) -> None:
    before = torch.get_num_threads()
    a, b = _train(digits, digits["recipe"]), _train(digits, digits["recipe"])
    assert ttorch.weights_hash(a.model) == ttorch.weights_hash(b.model)
    assert [m.loss for m in a.epochs] == [m.loss for m in b.epochs]
    assert [m.test_accuracy for m in a.epochs] == [m.test_accuracy for m in b.epochs]
    other = _train(digits, small_recipe(training={"seed": 8}))
    assert ttorch.weights_hash(other.model) != ttorch.weights_hash(a.model)
    assert torch.get_num_threads() == before  # global torch state restored
    assert a.epochs[-1].test_accuracy > 0.9


def test_preprocessing_is_in_the_exported_graph(digits: dict[str, Any], tmp_path: Path) -> None:
    import onnx

    trained = _train(digits, digits["recipe"])
    path = ttorch.export_onnx(trained.model, tmp_path / "m.onnx", 17, {"edgeml.name": "t"})
    graph = onnx.load_model(str(path)).graph
    assert [n.op_type for n in graph.node[:2]] == ["Sub", "Mul"]  # standardization first
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"  # dynamic batch
    raw = digits["x_te"]
    mean, std = digits["x_tr"].mean(axis=0), digits["x_tr"].std(axis=0)
    normalized = ((raw - mean) / np.where(std < 1e-6, 1.0, std)).astype(np.float32)  # numpy, not the model's layer
    with torch.no_grad():
        logits = trained.model.body(torch.as_tensor(normalized)).numpy()  # torch on normalized inputs
    onnx_probs = probabilities(path, raw)  # the device feeds raw features
    assert (onnx_probs.argmax(axis=1) == logits.argmax(axis=1)).all()
    torch_probs = torch.softmax(torch.as_tensor(logits), dim=1).numpy()
    assert np.abs(onnx_probs - torch_probs).max() < 1e-4
    for batch in (1, 7, len(raw)):  # any batch size
        assert probabilities(path, raw[:batch]).shape == (batch, 10)


# ------------------------------------------------------------------ gate


def _eval(acc: float, us: float, size: int = 1000, method: str = "float") -> Evaluation:
    return Evaluation(Path("m.onnx"), acc, us, us / 10, size, method)


@pytest.mark.parametrize(
    ("acc", "us", "margin", "accepted", "why"),
    [
        (0.965, 50.0, 0.01, True, ""),
        (0.960, 50.0, 0.01, True, ""),            # exactly one point: allowed
        (0.955, 50.0, 0.01, False, "points below float"),
        (0.970, 120.0, 0.01, False, "not faster"),
        (0.900, 120.0, 0.01, False, "points below float"),
        (0.968, 50.0, 0.0, False, "points below float"),  # forced tight margin
    ],
)
def test_gate(acc: float, us: float, margin: float, accepted: bool, why: str) -> None:
    d = gate(_eval(0.970, 100.0), _eval(acc, us, 300, "static_qdq"), margin=margin, min_speedup=1.0)
    assert d.accepted is accepted
    assert d.speedup == pytest.approx(100.0 / us) and d.size_ratio == pytest.approx(0.3)
    assert (why in " ".join(d.reasons)) if why else not d.reasons


# ------------------------------------------------------------------ full run


def test_run_exports_gates_and_registers_with_lineage(run: dict[str, Any], env: dict[str, Any]) -> None:
    r = run["result"]
    assert r["float"]["accuracy"] > 0.9 and r["onnx_max_abs_diff"] < 1e-4
    import importlib.util

    if importlib.util.find_spec("litert_torch") is None:  # the optional tflite-export extra
        assert r["tflite"]["status"] == "skipped" and "litert-torch" in r["tflite"]["reason"]
    else:
        assert r["tflite"]["status"] in ("exported", "failed"), r["tflite"]
    assert {c["method"] for c in r["int8_candidates"]} == {"static_qdq", "dynamic"}
    for cand in r["int8_candidates"]:  # figures are there, accepted or not
        g = cand["gate"]
        assert g["accepted"] == (g["accuracy_drop"] <= 0.01 + 1e-12 and g["speedup"] >= 1.0)
        assert g["accepted"] or g["reasons"]
        assert cand["size_bytes"] < r["float"]["size_bytes"]
    assert any(line.startswith("epoch 6/6") for line in run["lines"])
    registry = env["registry"]
    model = registry.get("digits-test", "1")
    assert model.dataset_hash == r["dataset"]["hash"] and model.quantization == "float"
    assert model.params["recipe"]["training"]["seed"] == 7
    assert model.params["code_version"]["edgeml"] and "git_commit" in model.params["code_version"]
    assert model.params["dataset"]["rows"] == 1797 and model.params["dataset"]["devices"] == []
    assert model.metrics["latency_us"]["onnxruntime"] > 0 and model.metrics["size_bytes"]["onnxruntime"] == model.size
    if r["int8"] is not None:
        q = registry.get("digits-test", "1+int8")
        assert q.parent == "digits-test@1" and q.dataset_hash == model.dataset_hash
        assert q.quantization == {"static_qdq": "int8-qdq", "dynamic": "int8-dynamic"}[r["int8"]["method"]]
        assert r["registered"] == ["digits-test@1", "digits-test@1+int8"]
        assert r["float"]["accuracy"] - q.metrics["accuracy"] <= 0.01
    else:
        assert r["registered"] == ["digits-test@1"]


def test_int8_refused_with_figures_when_the_margin_is_impossible(env: dict[str, Any]) -> None:
    recipe = small_recipe(name="digits-tight", quantization={"margin": 0.0, "min_speedup": 1000.0, "latency_repeats": 3})
    r = train(recipe, store=env["store"], registry=env["registry"], workdir=env["workdir"], parent="digits-test@1")
    assert r["int8"] is None and r["registered"] == ["digits-tight@1"]
    for cand in r["int8_candidates"]:
        assert not cand["gate"]["accepted"]
        assert any("not faster than float" in why for why in cand["gate"]["reasons"])
        assert cand["accuracy"] > 0 and cand["latency_us_batch"] > 0
    assert env["registry"].get("digits-tight", "1").parent == "digits-test@1"
    with pytest.raises(NotFound):
        env["registry"].get("digits-tight", "1+int8")


def test_onnx_int8_agrees_with_float_within_tolerance(run: dict[str, Any], digits: dict[str, Any]) -> None:
    r = run["result"]
    flt = probabilities(Path(r["artifacts"]["onnx_float"]), digits["x_te"])
    for cand in r["int8_candidates"]:
        q = probabilities(Path(cand["path"]), digits["x_te"])
        assert np.abs(q - flt).mean() < 0.02  # int8 outputs step in 1/255; a few ambiguous rows move more
        assert (q.argmax(1) == flt.argmax(1)).mean() > 0.95


def test_same_recipe_same_weights_across_runs(run: dict[str, Any], env: dict[str, Any]) -> None:
    again = train(small_recipe(), workdir=env["workdir"])  # no store, no registry
    r = run["result"]
    assert again["weights_sha256"] == r["weights_sha256"]
    assert again["dataset"]["hash"] == r["dataset"]["hash"]
    assert [e["loss"] for e in again["epochs"]] == [e["loss"] for e in r["epochs"]]
    assert again["float"]["accuracy"] == r["float"]["accuracy"] and again["registered"] == []


# ------------------------------------------------------------------ snapshots


def test_snapshot_rematerializes_from_its_hash(run: dict[str, Any], env: dict[str, Any]) -> None:
    digest = run["result"]["dataset"]["hash"]
    snap = load_snapshot(digest, env["workdir"] / "datasets")
    fresh = build_snapshot(small_recipe().data.sources)
    assert snap.hash == digest == fresh.hash
    assert np.array_equal(snap.x, fresh.x) and np.array_equal(snap.y, fresh.y)
    assert RunStore(env["store"]).snapshot(digest)["rows"] == 1797
    with pytest.raises(NotFound):
        load_snapshot("sha256:" + "0" * 64, env["workdir"] / "datasets")
    with pytest.raises(InvalidInput):
        load_snapshot("md5:abc", env["workdir"] / "datasets")


def test_altered_snapshot_file_is_refused(tmp_path: Path) -> None:
    snap = build_snapshot(small_recipe().data.sources)
    path = save_snapshot(snap, tmp_path)
    with np.load(path) as data:
        arrays = {k: data[k] for k in data.files}
    arrays["y"][0] = (arrays["y"][0] + 1) % 10
    np.savez(path, **arrays)
    with pytest.raises(InvalidInput, match="does not hash"):
        load_snapshot(snap.hash, tmp_path)


def _fleet_store(tmp_path: Path) -> Store:
    store = open_store(f"sqlite://{tmp_path}/fleet.db")
    rng = np.random.default_rng(0)
    for d, device in enumerate(("dev-a", "dev-b")):
        store.upsert_device("plant", device)
        records, seq = [], 0
        for i in range(12):
            x = rng.normal(size=4).round(3).tolist()
            ts = 1000.0 + 10 * i + d
            label = int(x[0] > 0)
            seq += 1
            if i % 2:  # feedback carrying its inputs: a labeled sample
                records.append({"seq": seq, "ts": ts, "kind": "feedback", "model": "m", "version": "1", "label": label,
                                "inputs": {"input": [x]}})
            else:  # a sample record, then feedback without inputs 2 s later: joined
                records.append({"seq": seq, "ts": ts, "kind": "sample", "model": "m", "version": "1",
                                "inputs": {"input": [x]}, "outputs": {"probs": [[0.5, 0.5]]}})
                seq += 1
                records.append({"seq": seq, "ts": ts + 2, "kind": "feedback", "model": "m", "version": "1", "label": label})
        seq += 1
        records.append({"seq": seq, "ts": 5000.0, "kind": "feedback", "model": "m", "version": "1", "label": 1})  # no sample: dropped
        store.insert_telemetry("plant", device, "telemetry", records)
    return store


def test_fleet_snapshot_joins_samples_and_feedback(tmp_path: Path) -> None:
    store = _fleet_store(tmp_path)
    try:
        recipe = load_recipe({"name": "fleet", "data": {"sources": [{"type": "fleet", "fleet": "plant", "model": "m"}]}})
        snap = build_snapshot(recipe.data.sources, store)
        summary = snap.summary()
        assert summary["rows"] == 24 and summary["features"] == 4
        assert summary["devices"] == ["dev-a", "dev-b"] and summary["time_range"] == [1002.0, 1111.0]  # feedback times; the orphan at 5000 dropped
        assert summary["sources"] == ["fleet:plant/m"]
        assert (snap.y == (snap.x[:, 0] > 0)).all()  # labels matched to the right inputs
        assert build_snapshot(recipe.data.sources, store).hash == snap.hash
        path = save_snapshot(snap, tmp_path / "ds")
        assert load_snapshot(snap.hash, path.parent).summary() == summary
        one = load_recipe({"name": "f", "data": {"sources": [{"type": "fleet", "fleet": "plant", "devices": ["dev-b"]}]}})
        assert build_snapshot(one.data.sources, store).summary()["devices"] == ["dev-b"]
    finally:
        store.close()


# ------------------------------------------------------------------ tracking


def test_runs_are_listed_and_compared(run: dict[str, Any], env: dict[str, Any]) -> None:
    runs = RunStore(env["store"])
    listed = {r.run_id: r for r in runs.list()}
    rid = run["result"]["run_id"]
    assert listed[rid].status == "succeeded" and listed[rid].dataset_hash == run["result"]["dataset"]["hash"]
    record = runs.get(rid)
    assert [e["epoch"] for e in record.epochs] == [1, 2, 3, 4, 5, 6]
    assert record.metrics["float"]["accuracy"] == run["result"]["float"]["accuracy"]
    assert record.artifacts["onnx_float"].endswith("model.onnx")
    other = next(r for r in runs.list("digits-tight"))
    doc = compare_runs(record, runs.get(other.run_id))
    assert doc["same_dataset"] is True
    assert doc["params"]["quantization.margin"] == {"a": 0.01, "b": 0.0}
    assert "name" in doc["params"] and "training.seed" not in doc["params"]
    assert doc["metrics"]["float.accuracy"]["delta"] == pytest.approx(0.0)
    with pytest.raises(NotFound):
        runs.get("run-nope")


def test_failed_run_is_recorded(env: dict[str, Any]) -> None:
    recipe = load_recipe({"name": "broken", "data": {"sources": [{"type": "fleet", "fleet": "nobody"}]}})
    with pytest.raises(InvalidInput, match="not enough labeled data"):
        train(recipe, store=env["store"], registry=env["registry"], workdir=env["workdir"])
    (failed,) = RunStore(env["store"]).list("broken")
    assert failed.status == "failed" and "not enough labeled data" in (failed.error or "")


def test_run_tables_on_both_backends(store: Store) -> None:
    runs = RunStore(store)  # its tables come with the store's migrations
    rid = runs.start("n", {"training": {"seed": 1}}, "abc", {"edgeml": "0.1.0"})
    runs.set_dataset(rid, "sha256:" + "1" * 64, {"rows": 3}, "/x.npz")
    runs.add_epoch(rid, {"epoch": 1, "loss": 0.5, "train_accuracy": 0.8, "test_accuracy": 0.7, "seconds": 0.1})
    runs.finish(rid, metrics={"float": {"accuracy": 0.7}}, artifacts={"onnx_float": "/m.onnx"}, result={"registered": []})
    got = runs.get(rid)
    assert got.status == "succeeded" and got.epochs[0]["loss"] == 0.5 and got.metrics["float"]["accuracy"] == 0.7
    assert runs.snapshot("sha256:" + "1" * 64)["rows"] == 3


# ------------------------------------------------------------------ CLI


def test_cli_train_runs_compare(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "cloud.yaml"
    config.write_text(f"db: sqlite://{tmp_path}/c.db\nartifact_dir: {tmp_path}/art\n")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(small_recipe(quantization={"latency_repeats": 3}, training={"epochs": 3}).model_dump_json())

    def cli(*argv: str) -> tuple[int, str, str]:
        code = main(list(argv))
        out, err = capsys.readouterr()
        return code, out, err

    code, out, err = cli("models", "train", "--recipe", str(recipe), "-c", str(config), "--json")
    assert code == 0, err
    first = json.loads(out)
    assert "epoch 3/3" in err and first["registered"][0] == "digits-test@1"
    code, out, err = cli("models", "train", "--recipe", str(recipe), "-c", str(config), "--no-register")
    assert code == 0 and "registered nothing" in out and "float  accuracy" in out
    code, out, _ = cli("models", "runs", "-c", str(config), "--json")
    ids = [r["run_id"] for r in json.loads(out)]
    assert len(ids) == 2 and ids[0] == first["run_id"]
    code, out, _ = cli("models", "runs", "-c", str(config))
    assert code == 0 and "succeeded" in out and first["run_id"] in out
    code, out, _ = cli("models", "compare", *ids, "-c", str(config))
    assert code == 0 and "same dataset" in out and "float.accuracy" in out
    code, _, err = cli("models", "compare", ids[0], "run-missing", "-c", str(config))
    assert code == 1 and "no training run" in err
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ntraining: {epochs: -1}\n")
    code, _, err = cli("models", "train", "--recipe", str(bad), "-c", str(config))
    assert code == 2 and "training.epochs" in err


def test_train_on_fleet_data_records_devices_and_time_range(tmp_path: Path) -> None:
    store = _fleet_store(tmp_path)
    try:
        registry = ModelRegistry(store, ArtifactStore(tmp_path / "art"))
        recipe = load_recipe({
            "name": "fleet-m", "model": {"hidden": [8]},
            "data": {"sources": [{"type": "fleet", "fleet": "plant", "model": "m"}], "test_fraction": 0.25},
            "training": {"epochs": 3, "seed": 1}, "quantization": {"enabled": False},
        })
        r = train(recipe, store=store, registry=registry, workdir=tmp_path / "art" / "training")
        model = registry.get("fleet-m", "1")
        assert model.dataset_hash == r["dataset"]["hash"] and r["int8"] is None
        assert model.params["dataset"]["devices"] == ["dev-a", "dev-b"]
        assert model.params["dataset"]["time_range"] == [1002.0, 1111.0]
        assert model.inputs[0]["name"] == "input" and model.outputs[0]["name"] == "probs"
        assert load_snapshot(model.dataset_hash, tmp_path / "art" / "training" / "datasets").rows == 24
    finally:
        store.close()
