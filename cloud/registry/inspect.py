"""What a model file is, read from the file itself: :func:`inspect_model`.

ONNX models are read with ``onnx`` (protobuf parse + ``onnx.checker``); TFLite models
are verified by the LiteRT interpreter's flatbuffer verifier and read with
``ai_edge_litert.schema_py_generated``. Nothing is executed.

``quantization`` classifies how the model computes:

* ``"float"``: no int8 tensors or quantization ops (float16 weights count as float).
* ``"int8-dynamic"``: int8 weights, activations quantized at run time (ONNX
  ``DynamicQuantizeLinear`` / ``MatMulInteger`` / ``ConvInteger``; TFLite int8 weights
  with float activations, i.e. "dynamic range" quantization).
* ``"int8-qdq"``: statically quantized int8 activations behind float inputs and
  outputs (ONNX ``QuantizeLinear``/``DequantizeLinear`` or ``QLinear*`` ops; TFLite int8
  activation tensors with float I/O).
* ``"int8-full"``: statically quantized with 8-bit integer inputs or outputs (TFLite
  int8/uint8 I/O with scale and zero point; ONNX static quantization with int8/uint8
  graph I/O). Callers must quantize inputs; the agent does it for TFLite.
"""

from __future__ import annotations

import hashlib
import os
import struct
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from edgeml.runtime.tflite_metadata import read_tflite_metadata_bytes

from .._exceptions import CloudError, InvalidModel

__all__ = ["ModelFacts", "TensorFacts", "inspect_model"]

Quantization = Literal["float", "int8-qdq", "int8-dynamic", "int8-full"]

_INT8 = frozenset({"int8", "uint8"})
_ONNX_DYNAMIC_OPS = frozenset(
    {"DynamicQuantizeLinear", "MatMulInteger", "ConvInteger", "DynamicQuantizeMatMul",
     "DynamicQuantizeLSTM", "MatMulIntegerToFloat"}
)
_ONNX_STATIC_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "QGemm", "QAttention"})


class TensorFacts(BaseModel):
    """One input or output: ``shape`` has ``None`` for a dynamic dimension (``None``
    altogether when the rank is unknown); ``scale``/``zero_point`` for quantized I/O."""

    model_config = ConfigDict(frozen=True)

    name: str
    shape: tuple[int | None, ...] | None
    dtype: str
    scale: float | None = None
    zero_point: int | None = None


class ModelFacts(BaseModel):
    """Everything the registry needs to know about a model file."""

    model_config = ConfigDict(frozen=True)

    format: Literal["onnx", "tflite"]
    runtime: Literal["onnx", "litert"]  # the agent's engine name (edgeml.runtime)
    inputs: tuple[TensorFacts, ...]
    outputs: tuple[TensorFacts, ...]
    quantization: Quantization
    size: int
    sha256: str
    metadata: dict[str, str]
    name: str | None = None  # metadata "edgeml.name"
    version: str | None = None  # metadata "edgeml.version"
    operators: tuple[str, ...] = ()
    opset: int | None = None  # ONNX default-domain opset; TFLite schema version
    producer: str | None = None


def inspect_model(path: str | os.PathLike[str]) -> ModelFacts:
    """Read a model's format, signature, quantization and metadata.

    :class:`InvalidModel` for a missing, empty, corrupt, truncated or unsupported file.
    """
    path = Path(path)
    try:
        with path.open("rb") as fh:
            head = fh.read(8)
    except FileNotFoundError:
        raise InvalidModel(f"model file {path} does not exist") from None
    except OSError as exc:
        raise InvalidModel(f"cannot read model file {path}: {exc.strerror}") from exc
    if not head:
        raise InvalidModel(f"model file {path} is empty")
    if head[4:8] == b"TFL3":
        facts = _inspect_tflite(path)
    elif path.suffix.lower() == ".tflite":
        raise InvalidModel(f"{path} is not a TFLite flatbuffer (no TFL3 identifier): corrupt or not a model")
    else:
        facts = _inspect_onnx(path)
    sha256, size = _hash(path)
    common = {"size": size, "sha256": sha256, "name": facts["metadata"].get("edgeml.name"),
              "version": facts["metadata"].get("edgeml.version")}
    return ModelFacts(**facts, **common)


def _hash(path: Path) -> tuple[str, int]:
    digest, size = hashlib.sha256(), 0
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def _classify(io_int8: bool, static: bool, dynamic: bool) -> Quantization:
    if dynamic and not static:
        return "int8-dynamic"
    if static:
        return "int8-full" if io_int8 else "int8-qdq"
    return "float"


# --------------------------------------------------------------------------- ONNX


def _inspect_onnx(path: Path) -> dict[str, Any]:
    import onnx
    from google.protobuf.message import DecodeError

    try:
        model = onnx.load_model(str(path), load_external_data=False)
        onnx.checker.check_model(model)
    except (DecodeError, onnx.checker.ValidationError, ValueError, RuntimeError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        suffix = path.suffix.lower()
        kind = "ONNX model" if suffix == ".onnx" else "model (neither a TFLite flatbuffer nor ONNX)"
        raise InvalidModel(f"{path} is not a valid {kind}: {reason}") from exc
    try:
        graph = model.graph
        initializers = {t.name for t in graph.initializer}
        inputs = tuple(_onnx_tensor(v) for v in graph.input if v.name not in initializers)
        outputs = tuple(_onnx_tensor(v) for v in graph.output)
        ops = _onnx_ops(model)
        metadata = {_text(p.key, "a metadata key"): _text(p.value, "a metadata value") for p in model.metadata_props}
        producer = " ".join(_text(p, "the producer") for p in (model.producer_name, model.producer_version) if p)
    except _NotText as exc:  # ONNX is proto2: a string field that is not UTF-8 reads as bytes
        raise InvalidModel(f"{path} is not a valid ONNX model: {exc} is not UTF-8 text") from exc
    dynamic = bool(ops & _ONNX_DYNAMIC_OPS)
    static = bool(ops & _ONNX_STATIC_OPS) or any(op.startswith("QLinear") for op in ops)
    io_int8 = any(t.dtype in _INT8 for t in inputs + outputs)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    return {
        "format": "onnx",
        "runtime": "onnx",
        "inputs": inputs,
        "outputs": outputs,
        "quantization": _classify(io_int8, static, dynamic),
        "metadata": metadata,
        "operators": tuple(sorted(ops)),
        "opset": opset,
        "producer": producer or None,
    }


class _NotText(ValueError):
    """A string field of an ONNX file that holds bytes that are not UTF-8; names the field."""


def _text(value: str | bytes, what: str) -> str:
    if isinstance(value, bytes):
        raise _NotText(what)
    return value


def _onnx_tensor(value: Any) -> TensorFacts:
    kind = value.type.WhichOneof("value")
    name = _text(value.name, "an input or output name")
    if kind != "tensor_type":
        return TensorFacts(name=name, shape=None, dtype=(kind or "unknown").removesuffix("_type"))
    tensor = value.type.tensor_type
    shape = None
    if tensor.HasField("shape"):
        shape = tuple(
            d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in tensor.shape.dim
        )
    return TensorFacts(name=name, shape=shape, dtype=_onnx_dtype(tensor.elem_type))


def _onnx_dtype(elem_type: int) -> str:
    import numpy as np
    import onnx

    try:
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type)).name
    except (KeyError, TypeError, ValueError):
        return onnx.TensorProto.DataType.Name(elem_type).lower()


def _onnx_ops(model: Any) -> set[str]:
    """Every op type in the graph, its subgraphs (If/Loop/Scan bodies) and local functions."""
    ops: set[str] = set()
    pending = [model.graph, *model.functions]
    while pending:
        graph = pending.pop()
        for node in graph.node:
            ops.add(_text(node.op_type, "an operator type"))
            for attr in node.attribute:
                pending.extend([attr.g] if attr.HasField("g") else [])
                pending.extend(attr.graphs)
    return ops


# --------------------------------------------------------------------------- TFLite


def _litert() -> tuple[Any, Any]:
    try:
        from ai_edge_litert import schema_py_generated as schema
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        raise CloudError(
            "inspecting TFLite models needs LiteRT on the coordinator: pip install 'edgeml[litert]'"
        ) from None
    return schema, Interpreter


def _inspect_tflite(path: Path) -> dict[str, Any]:
    schema, interpreter_cls = _litert()
    try:  # LiteRT's flatbuffer verifier: catches truncation and bad offsets
        interpreter_cls(model_path=str(path))
    except (ValueError, RuntimeError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InvalidModel(f"{path} is not a valid TFLite model: {reason}") from exc
    buf = path.read_bytes()
    try:
        return {**_read_tflite(schema, schema.Model.GetRootAs(buf, 0)), "metadata": read_tflite_metadata_bytes(buf)}
    except (IndexError, ValueError, UnicodeDecodeError, struct.error) as exc:
        raise InvalidModel(f"{path} is not a valid TFLite model: {exc}") from exc


def _read_tflite(schema: Any, model: Any) -> dict[str, Any]:
    if model.SubgraphsLength() < 1:
        raise InvalidModel("TFLite model has no subgraph")
    types = {v: k.lower() for k, v in vars(schema.TensorType).items() if not k.startswith("_")}
    graph = model.Subgraphs(0)
    io_index = set(graph.InputsAsNumpy().tolist()) | set(graph.OutputsAsNumpy().tolist())
    inputs = tuple(_tflite_tensor(graph.Tensors(i), types) for i in graph.InputsAsNumpy())
    outputs = tuple(_tflite_tensor(graph.Tensors(i), types) for i in graph.OutputsAsNumpy())
    weights_int8 = acts_int8 = False
    for s in range(model.SubgraphsLength()):
        sub = model.Subgraphs(s)
        for i in range(sub.TensorsLength()):
            tensor = sub.Tensors(i)
            if (s == 0 and i in io_index) or not _is_quantized_int8(tensor, types):
                continue
            if _is_constant(model, tensor):
                weights_int8 = True
            else:
                acts_int8 = True
    io_int8 = any(t.dtype in _INT8 and t.scale is not None for t in inputs + outputs)
    description = model.Description()
    return {
        "format": "tflite",
        "runtime": "litert",
        "inputs": inputs,
        "outputs": outputs,
        "quantization": _classify(io_int8, io_int8 or acts_int8, weights_int8),
        "operators": _tflite_ops(schema, model),
        "opset": model.Version(),
        "producer": description.decode("utf-8", "replace") if description else None,
    }


def _tflite_tensor(tensor: Any, types: dict[int, str]) -> TensorFacts:
    dims = tensor.ShapeSignatureAsNumpy() if tensor.ShapeSignatureLength() else tensor.ShapeAsNumpy()
    dims = [] if isinstance(dims, int) else dims.tolist()  # flatbuffers returns 0 for an empty vector
    scale = zero_point = None
    quant = tensor.Quantization()
    if quant is not None and quant.ScaleLength() == 1:
        scale = float(quant.Scale(0))
        zero_point = int(quant.ZeroPoint(0)) if quant.ZeroPointLength() else 0
    return TensorFacts(
        name=tensor.Name().decode("utf-8"),
        shape=tuple(d if d > 0 else None for d in dims),
        dtype=types.get(tensor.Type(), f"type{tensor.Type()}"),
        scale=scale,
        zero_point=zero_point,
    )


def _is_quantized_int8(tensor: Any, types: dict[int, str]) -> bool:
    quant = tensor.Quantization()
    return types.get(tensor.Type()) in _INT8 and quant is not None and quant.ScaleLength() > 0


def _is_constant(model: Any, tensor: Any) -> bool:
    index = tensor.Buffer()
    if index <= 0 or index >= model.BuffersLength():
        return False
    buffer = model.Buffers(index)
    return buffer.DataLength() > 0 or buffer.Offset() > 1  # Offset: data stored after the flatbuffer


def _tflite_ops(schema: Any, model: Any) -> tuple[str, ...]:
    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    ops = set()
    for i in range(model.OperatorCodesLength()):
        code = model.OperatorCodes(i)
        builtin = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())
        if builtin == schema.BuiltinOperator.CUSTOM and code.CustomCode():
            ops.add(code.CustomCode().decode("utf-8", "replace"))
        else:
            ops.add(names.get(builtin, f"BUILTIN_{builtin}"))
    return tuple(sorted(ops))

