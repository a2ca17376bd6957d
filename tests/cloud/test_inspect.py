"""inspect_model on real ONNX and TFLite models (float, int8) and on broken copies."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest

from cloud._exceptions import CloudError, InvalidModel
from cloud.registry.inspect import ModelFacts, inspect_model
from edgeml._testing import models as modelgen


def test_onnx_float(models: dict[str, Path]) -> None:
    path = models["onnx_float"]
    facts = inspect_model(path)
    assert (facts.format, facts.runtime, facts.quantization) == ("onnx", "onnx", "float")
    assert [(t.name, t.shape, t.dtype) for t in facts.inputs] == [("input", (None, 4), "float32")]
    assert [(t.name, t.shape, t.dtype) for t in facts.outputs] == [("probs", (None, 3), "float32")]
    assert (facts.name, facts.version) == ("mlp", "1.0.0")
    assert facts.metadata["edgeml.name"] == "mlp"
    assert facts.size == path.stat().st_size
    assert facts.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert facts.operators == ("Gemm", "Relu", "Softmax")
    assert facts.opset == 17


def test_onnx_int8_qdq(models: dict[str, Path]) -> None:
    facts = inspect_model(models["onnx_int8"])
    assert facts.quantization == "int8-qdq"
    assert facts.version == "1.0.0-int8"
    assert facts.inputs[0].dtype == "float32", "QDQ keeps float I/O"
    assert {"QuantizeLinear", "DequantizeLinear"} <= set(facts.operators)


def test_onnx_fixed_batch(tmp_path: Path) -> None:
    facts = inspect_model(modelgen.build_onnx_mlp(tmp_path / "b8.onnx", batch=8, n_in=5))
    assert facts.inputs[0].shape == (8, 5)


def test_onnx_int8_dynamic(tmp_path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization import QuantType, quantize_dynamic

    w = np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "mm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])],
        initializer=[numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save_model(model, str(tmp_path / "f.onnx"))
    quantize_dynamic(str(tmp_path / "f.onnx"), str(tmp_path / "d.onnx"), weight_type=QuantType.QInt8)
    facts = inspect_model(tmp_path / "d.onnx")
    assert facts.quantization == "int8-dynamic", facts.operators
    assert facts.inputs[0].name == "x", "initializers are not inputs"


def test_tflite_float(models: dict[str, Path]) -> None:
    facts = inspect_model(models["tflite_float"])
    assert (facts.format, facts.runtime, facts.quantization) == ("tflite", "litert", "float")
    assert [(t.name, t.shape, t.dtype, t.scale) for t in facts.inputs] == [("input", (None, 4), "float32", None)]
    assert facts.outputs[0].name == "probs"
    assert facts.operators == ("FULLY_CONNECTED", "SOFTMAX")
    assert facts.name is None


def test_tflite_int8_full(models: dict[str, Path]) -> None:
    facts = inspect_model(models["tflite_int8"])
    assert facts.quantization == "int8-full"
    inp, out = facts.inputs[0], facts.outputs[0]
    assert (inp.dtype, out.dtype) == ("int8", "int8")
    assert inp.scale is not None and inp.scale > 0 and inp.zero_point is not None
    assert (out.scale, out.zero_point) == (1 / 256, -128)


def test_tflite_int8_weights_only_is_dynamic(models: dict[str, Path], tmp_path: Path) -> None:
    """A float model whose fc1 weights are stored int8 ("dynamic range" quantization)."""
    import flatbuffers
    from ai_edge_litert import schema_py_generated as S

    model = S.ModelT.InitFromObj(S.Model.GetRootAs(models["tflite_float"].read_bytes(), 0))
    tensor = next(t for t in model.subgraphs[0].tensors if t.name == b"fc1/weights")
    weights = np.frombuffer(model.buffers[tensor.buffer].data.tobytes(), dtype=np.float32)
    scale = float(np.abs(weights).max()) / 127
    model.buffers[tensor.buffer].data = np.round(weights / scale).astype(np.int8).view(np.uint8)
    tensor.type = S.TensorType.INT8
    tensor.quantization = S.QuantizationParametersT()
    tensor.quantization.scale, tensor.quantization.zeroPoint = [scale], [0]
    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    path = tmp_path / "hybrid.tflite"
    path.write_bytes(bytes(builder.Output()))
    assert inspect_model(path).quantization == "int8-dynamic"


def test_facts_serialize(models: dict[str, Path]) -> None:
    facts = inspect_model(models["tflite_int8"])
    assert ModelFacts.model_validate_json(facts.model_dump_json()) == facts


@pytest.mark.parametrize("kind", ["onnx_float", "onnx_int8", "tflite_float", "tflite_int8"])
@pytest.mark.parametrize("mode", ["truncate", "garbage"])
def test_corrupt_copies_are_invalid(models: dict[str, Path], tmp_path: Path, kind: str, mode: str) -> None:
    src = models[kind]
    bad = modelgen.corrupt_copy(src, tmp_path / f"bad{src.suffix}", mode)  # type: ignore[arg-type]
    with pytest.raises(InvalidModel, match=str(bad)):
        inspect_model(bad)


def test_other_bad_files(models: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(InvalidModel, match="does not exist"):
        inspect_model(tmp_path / "missing.onnx")
    (tmp_path / "empty.onnx").write_bytes(b"")
    with pytest.raises(InvalidModel, match="is empty"):
        inspect_model(tmp_path / "empty.onnx")
    shutil.copy(models["onnx_float"], tmp_path / "onnx-named.tflite")
    with pytest.raises(InvalidModel, match="not a TFLite flatbuffer"):
        inspect_model(tmp_path / "onnx-named.tflite")
    (tmp_path / "notes.bin").write_text("hello, I am not a model\n")
    with pytest.raises(InvalidModel, match="neither a TFLite flatbuffer nor ONNX"):
        inspect_model(tmp_path / "notes.bin")
    assert issubclass(InvalidModel, CloudError)


def test_format_comes_from_content_not_name(models: dict[str, Path], tmp_path: Path) -> None:
    """Stored artifacts have no extension: the format is sniffed."""
    for kind, fmt in (("onnx_float", "onnx"), ("tflite_int8", "tflite")):
        blob = tmp_path / kind
        shutil.copy(models[kind], blob)
        assert inspect_model(blob).format == fmt
