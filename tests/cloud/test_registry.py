"""The model registry on both store backends: rows, aliases, lineage, signing, bad files."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import pytest

from cloud import Conflict, NotFound, Store
from cloud._exceptions import InvalidModel
from cloud.artifacts import ArtifactStore
from cloud.keys import generate_keys
from cloud.registry.models import InvalidInput, ModelRegistry, parse_ref
from cloud.store import ModelRecord
from edgeml.protocol.signing import verify_digest


def _record(name: str = "mlp", version: str = "1.0.0", **over: object) -> ModelRecord:
    fields: dict[str, object] = dict(
        name=name, version=version, format="onnx", runtime="onnx", quantization="float", size=10,
        sha256="a" * 64, inputs=[{"name": "input", "shape": [None, 4], "dtype": "float32"}],
        outputs=[{"name": "probs", "shape": [None, 3], "dtype": "float32"}], metrics={"acc": 0.9},
        params={"lr": 0.01}, metadata={}, parent=None, dataset_hash=None, signature_key_id=None,
        created_at=time.time(),
    )
    fields.update(over)
    return ModelRecord(**fields)  # type: ignore[arg-type]


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, Path]:
    return generate_keys(tmp_path / "keys")


@pytest.fixture
def registry(store: Store, tmp_path: Path, keys: tuple[Path, Path]) -> ModelRegistry:
    return ModelRegistry(store, ArtifactStore(tmp_path / "artifacts"), signing_key=keys[0])


def test_model_rows_and_aliases(store: Store) -> None:
    store.insert_model(_record(version="1.0.0"))
    stored = store.insert_model(_record(version="1.1.0", parent="mlp@1.0.0", dataset_hash="sha256:ab"))
    assert (stored.parent, stored.dataset_hash, stored.metrics, stored.inputs[0]["shape"]) == (
        "mlp@1.0.0", "sha256:ab", {"acc": 0.9}, [None, 4])
    with pytest.raises(Conflict, match="already registered"):
        store.insert_model(_record(version="1.0.0"))
    with pytest.raises(NotFound):
        store.get_model("mlp", "9.9.9")
    assert store.set_alias("mlp", "champion", "1.0.0") is None
    assert store.set_alias("mlp", "challenger", "1.1.0") is None
    assert store.set_alias("mlp", "champion", "1.1.0") == "1.0.0"  # moved: the previous version comes back
    with pytest.raises(NotFound):
        store.set_alias("mlp", "champion", "7.0.0")
    assert store.resolve_alias("mlp", "champion").version == "1.1.0"
    assert store.model_aliases("mlp") == {"challenger": "1.1.0", "champion": "1.1.0"}
    listed = store.list_models()
    assert [(m.version, m.aliases) for m in listed] == [("1.0.0", ()), ("1.1.0", ("challenger", "champion"))]
    assert store.list_models("other") == []


def test_register_onnx_and_tflite_signed_and_content_addressed(
    registry: ModelRegistry, models: dict[str, Path], keys: tuple[Path, Path]
) -> None:
    onnx = registry.register(models["onnx_float"], name="mlp", version="1.0.0", metrics={"acc": 0.91})
    data = models["onnx_float"].read_bytes()
    assert (onnx.format, onnx.runtime, onnx.quantization) == ("onnx", "onnx", "float")
    assert (onnx.size, onnx.sha256) == (len(data), hashlib.sha256(data).hexdigest())
    assert [t["name"] for t in onnx.inputs] == ["input"] and onnx.signature_key_id == registry.key_id
    verify_digest(onnx.sha256, registry.artifacts.read_signature(onnx.sha256), keys[1])

    with models["tflite_int8"].open("rb") as fh:  # a stream, as the HTTP upload gives it
        lite = registry.register(fh, name="mlp-lite", version="1.0.0", parent="mlp@1.0.0", filename="m.tflite")
    assert (lite.format, lite.runtime, lite.parent) == ("tflite", "litert", "mlp@1.0.0")
    assert lite.quantization.startswith("int8")

    again = registry.register(models["onnx_float"], name="mlp", version="1.0.1")  # same bytes, new version
    assert again.sha256 == onnx.sha256
    assert len(list((registry.artifacts.root / "sha256").rglob("*.sig"))) == 2
    assert not list((registry.artifacts.root / "tmp").iterdir())  # uploads cleaned up


def test_register_refuses_bad_input_and_keeps_nothing(registry: ModelRegistry, models: dict[str, Path], tmp_path: Path) -> None:
    registry.register(models["onnx_float"], name="mlp", version="1.0.0")
    with pytest.raises(Conflict):
        registry.register(models["onnx_v2"], name="mlp", version="1.0.0")
    with pytest.raises(NotFound, match="mlp@0.1"):
        registry.register(models["onnx_v2"], name="mlp", version="2.0.0", parent="mlp@0.1")
    for bad in ({"name": "a/b", "version": "1"}, {"name": "mlp", "version": "1 0"}, {"name": "mlp", "version": "@"}):
        with pytest.raises(InvalidInput):
            registry.register(models["onnx_v2"], **bad)
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x08\x07 not a protobuf model at all" * 10)
    with pytest.raises(InvalidModel):
        registry.register(junk, name="mlp", version="3.0.0")
    truncated = tmp_path / "cut.tflite"
    truncated.write_bytes(models["tflite_float"].read_bytes()[:200])
    with pytest.raises(InvalidModel):
        registry.register(truncated, name="mlp", version="3.0.0")
    assert [m.version for m in registry.list()] == ["1.0.0"]


def test_references_and_alias_names(registry: ModelRegistry, models: dict[str, Path]) -> None:
    registry.register(models["onnx_float"], name="mlp", version="1.0.0")
    registry.register(models["onnx_v2"], name="mlp", version="2.0.0")
    assert registry.set_alias("mlp", "champion", "1.0.0") is None
    assert registry.resolve("mlp@champion").version == "1.0.0"
    assert registry.resolve("mlp@2.0.0").aliases == ()
    assert registry.set_alias("mlp", "champion", "2.0.0") == "1.0.0"
    assert registry.resolve("mlp@champion").version == "2.0.0"
    with pytest.raises(NotFound, match="neither a version nor an alias"):
        registry.resolve("mlp@stable")
    with pytest.raises(Conflict, match="is an alias"):  # name@champion must mean one thing
        registry.register(models["onnx_v2"], name="mlp", version="champion")
    registry.register(models["onnx_v2"], name="mlp", version="v3")
    with pytest.raises(Conflict, match="is a version"):
        registry.set_alias("mlp", "v3", "1.0.0")
    with pytest.raises(InvalidInput):
        registry.set_alias("mlp", "1stable", "1.0.0")  # aliases start with a letter
    with pytest.raises(InvalidInput):
        parse_ref("mlp")
    assert parse_ref("mlp@champion") == ("mlp", "champion")
