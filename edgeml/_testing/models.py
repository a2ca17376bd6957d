"""Tiny, real MLP models for tests and benchmarks (no TensorFlow / PyTorch).

Everything here is deterministic given ``seed``:

* :func:`mlp_weights` - float32 weights for a 2-layer MLP (``[out, in]`` layout).
* :func:`reference_forward` - numpy forward pass (ReLU hidden, softmax output).
* :func:`build_onnx_mlp` / :func:`build_onnx_mlp_int8` - ONNX float / int8 (QDQ) models.
* :func:`build_tflite_mlp` - TFLite float or fully-int8 model written directly as a
  flatbuffer via ``ai_edge_litert.schema_py_generated``.
* :func:`corrupt_copy` - truncated / garbled copies for bad-model tests.
* :func:`embed_samples` - store health-check samples (``edgeml.samples``) in an ONNX file.
* :func:`build_onnx_argmax` - an int64 label output whose real shape can differ from
  the declared one.

Heavy optional dependencies (onnx, onnxruntime, flatbuffers, ai_edge_litert) are
imported lazily inside the builders so importing this module only needs numpy.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import numpy as np

__all__ = [
    "mlp_weights",
    "reference_forward",
    "calibration_data",
    "build_onnx_mlp",
    "build_onnx_mlp_int8",
    "build_tflite_mlp",
    "corrupt_copy",
    "embed_samples",
    "build_onnx_argmax",
]

Weights = list[tuple[np.ndarray, np.ndarray]]

_ONNX_OPSET = 17
_ONNX_IR_VERSION = 8  # IR version paired with opset 17; loadable by onnxruntime 1.32
_N_CALIB = 512
_CALIB_MARGIN = 1.25  # calibration also sees inputs scaled by this, to leave headroom


# --------------------------------------------------------------------------- numpy


def mlp_weights(n_in: int = 4, n_hidden: int = 16, n_out: int = 3, seed: int = 0) -> Weights:
    """Deterministic float32 weights for ``n_in -> n_hidden (ReLU) -> n_out (softmax)``.

    Returns ``[(W1, b1), (W2, b2)]`` with ``W`` shaped ``[out, in]`` and ``b`` shaped ``[out]``
    (i.e. ``y = x @ W.T + b``).
    """
    rng = np.random.default_rng(seed)
    layers: Weights = []
    for fan_in, fan_out in ((n_in, n_hidden), (n_hidden, n_out)):
        limit = np.sqrt(6.0 / (fan_in + fan_out))  # Glorot uniform
        w = rng.uniform(-limit, limit, size=(fan_out, fan_in)).astype(np.float32)
        b = rng.uniform(-0.1, 0.1, size=(fan_out,)).astype(np.float32)
        layers.append((w, b))
    return layers


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def _forward_all(x: np.ndarray, weights: Weights) -> list[np.ndarray]:
    """Return every intermediate activation: [input, hidden(relu), logits, probs]."""
    h = np.asarray(x, dtype=np.float32)
    acts = [h]
    for i, (w, b) in enumerate(weights):
        h = h @ w.T + b
        if i < len(weights) - 1:
            h = np.maximum(h, 0.0)
        acts.append(h.astype(np.float32))
    acts.append(_softmax(acts[-1]).astype(np.float32))
    return acts


def reference_forward(x: np.ndarray, weights: Weights) -> np.ndarray:
    """Numpy float32 forward pass: ReLU on hidden layers, softmax on the output."""
    return _forward_all(x, weights)[-1]


def calibration_data(n_in: int = 4, n: int = _N_CALIB, seed: int = 0) -> np.ndarray:
    """Deterministic float32 sample inputs (standard normal) used for int8 calibration.

    Returns ``2 * n`` rows: ``n`` standard-normal samples followed by the same samples
    scaled by 1.25, so calibrated ranges keep some headroom for unseen inputs.
    """
    base = np.random.default_rng(seed + 1_000_003).standard_normal((n, n_in)).astype(np.float32)
    return np.concatenate([base, base * np.float32(_CALIB_MARGIN)], axis=0)


# --------------------------------------------------------------------------- ONNX


def _make_onnx_model(
    weights: Weights,
    *,
    input_name: str,
    output_name: str,
    name: str,
    version: str,
    batch: int | None,
    inner_batch: int | None = None,
) -> Any:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    (w1, b1), (w2, b2) = weights
    n_in, n_out = w1.shape[1], w2.shape[0]
    dim0: int | str = "N" if batch is None else int(batch)
    inits = [
        numpy_helper.from_array(w1, "fc1.weight"),
        numpy_helper.from_array(b1, "fc1.bias"),
        numpy_helper.from_array(w2, "fc2.weight"),
        numpy_helper.from_array(b2, "fc2.bias"),
    ]
    first = input_name
    nodes = []
    if inner_batch is not None:  # a fixed batch hidden inside the graph: other batches fail at run time
        inits.append(numpy_helper.from_array(np.array([inner_batch, n_in], dtype=np.int64), "inner.shape"))
        nodes.append(helper.make_node("Reshape", [input_name, "inner.shape"], ["inner"], name="inner"))
        first = "inner"
    nodes += [
        helper.make_node(
            "Gemm", [first, "fc1.weight", "fc1.bias"], ["fc1"], name="fc1", transB=1
        ),
        helper.make_node("Relu", ["fc1"], ["relu1"], name="relu1"),
        helper.make_node(
            "Gemm", ["relu1", "fc2.weight", "fc2.bias"], ["logits"], name="fc2", transB=1
        ),
        helper.make_node("Softmax", ["logits"], [output_name], name="softmax", axis=-1),
    ]
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, [dim0, n_in])],
        [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, [dim0, n_out])],
        initializer=inits,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", _ONNX_OPSET)],
        producer_name="edgeml._testing",
    )
    model.ir_version = _ONNX_IR_VERSION
    _set_onnx_metadata(model, {"edgeml.name": name, "edgeml.version": version})
    onnx.checker.check_model(model)
    return model


def _set_onnx_metadata(model: Any, props: dict[str, str]) -> None:
    """Set (overwrite) string metadata_props on an onnx ModelProto."""
    existing = {p.key: p for p in model.metadata_props}
    for key, value in props.items():
        if key in existing:
            existing[key].value = value
        else:
            entry = model.metadata_props.add()
            entry.key, entry.value = key, value


def build_onnx_mlp(
    path: str | os.PathLike[str],
    n_in: int = 4,
    n_hidden: int = 16,
    n_out: int = 3,
    seed: int = 0,
    *,
    input_name: str = "input",
    output_name: str = "probs",
    name: str = "mlp",
    version: str = "1.0.0",
    batch: int | None = None,
    inner_batch: int | None = None,
) -> Path:
    """Write a float32 ONNX MLP (Gemm -> Relu -> Gemm -> Softmax) and return its path.

    Input is ``[batch or "N", n_in]`` float32 (dynamic dim named ``"N"`` when ``batch`` is
    None); output ``[.., n_out]`` float32 probabilities. Opset 17, IR version 8, with
    ``metadata_props`` ``edgeml.name`` / ``edgeml.version``.

    ``inner_batch``: the graph first reshapes its input to ``[inner_batch, n_in]``. The
    model loads, declares a dynamic batch and answers that batch size; any other batch
    fails inside ONNX Runtime (a model that breaks in service, not in its health check).
    """
    import onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = _make_onnx_model(
        mlp_weights(n_in, n_hidden, n_out, seed),
        input_name=input_name,
        output_name=output_name,
        name=name,
        version=version,
        batch=batch,
        inner_batch=inner_batch,
    )
    onnx.save_model(model, str(path))
    return path


def build_onnx_argmax(
    path: str | os.PathLike[str],
    n_in: int = 4,
    *,
    declared: tuple[int | str, ...] = ("N", 1),
    name: str = "argmax",
    version: str = "1.0.0",
) -> Path:
    """Write an ONNX model whose int64 output ``"label"`` is the argmax of its float input
    ``"input"`` ``[N, n_in]``. It really answers ``[N, 1]``; the graph declares ``declared``
    (through a data-dependent Reshape, so ONNX Runtime keeps the declaration and does not
    check it at run time): a lying int output for the health check's shape test."""
    import onnx
    from onnx import TensorProto, helper

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    nodes = [
        helper.make_node("ArgMax", ["input"], ["argmax"], axis=1, keepdims=1),
        helper.make_node("Shape", ["argmax"], ["argmax.shape"]),
        helper.make_node("Reshape", ["argmax", "argmax.shape"], ["label"]),
    ]
    graph = helper.make_graph(
        nodes, name,
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", n_in])],
        [helper.make_tensor_value_info("label", TensorProto.INT64, list(declared))],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", _ONNX_OPSET)],
                              producer_name="edgeml._testing")
    model.ir_version = _ONNX_IR_VERSION
    _set_onnx_metadata(model, {"edgeml.name": name, "edgeml.version": version})
    onnx.checker.check_model(model)
    onnx.save_model(model, str(path))
    return path


def embed_samples(
    path: str | os.PathLike[str],
    inputs: list[dict[str, Any]],
    expected: list[dict[str, Any]] | None = None,
    *,
    atol: float | None = None,
    dst: str | os.PathLike[str] | None = None,
    raw: str | None = None,
) -> Path:
    """Store health-check samples in an ONNX model's metadata (``edgeml.samples``, see
    :func:`edgeml.updates.encode_samples`); writes ``dst`` (default: in place).
    ``raw`` stores that exact string instead (a malformed value, for tests)."""
    import onnx

    from edgeml.updates import SAMPLES_KEY, encode_samples

    src = Path(path)
    out = Path(dst) if dst is not None else src
    model = onnx.load_model(str(src))
    value = raw if raw is not None else encode_samples(inputs, expected, atol=atol)
    _set_onnx_metadata(model, {SAMPLES_KEY: value})
    out.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(out))
    return out


class _DropOrtPreprocessHint(logging.Filter):
    """Silence onnxruntime.quantization's 'consider pre-processing' root-logger warning."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "pre-process" not in record.getMessage()


class _ArrayDataReader:
    """Minimal CalibrationDataReader over a fixed array (one sample-batch per call)."""

    def __init__(self, input_name: str, data: np.ndarray, batch: int | None) -> None:
        self._input_name = input_name
        step = 64 if batch is None else int(batch)
        if len(data) < step:  # fixed batch larger than the calibration set: tile it
            data = np.resize(data, (step, data.shape[1]))
        n = (len(data) // step) * step
        self._batches = [data[i : i + step] for i in range(0, n, step)]
        self._it: Iterable[np.ndarray] = iter(self._batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        nxt = next(self._it, None)  # type: ignore[call-overload]
        return None if nxt is None else {self._input_name: nxt}

    def rewind(self) -> None:
        self._it = iter(self._batches)


def build_onnx_mlp_int8(
    path: str | os.PathLike[str],
    n_in: int = 4,
    n_hidden: int = 16,
    n_out: int = 3,
    seed: int = 0,
    *,
    input_name: str = "input",
    output_name: str = "probs",
    name: str = "mlp",
    version: str = "1.0.0",
    batch: int | None = None,
) -> Path:
    """Write the :func:`build_onnx_mlp` network quantized to int8 and return its path.

    Uses onnxruntime static QDQ quantization (int8 activations and weights, MinMax
    calibration on :func:`calibration_data`, ``reduce_range=True`` i.e. 7-bit weight
    range, which keeps x86 AVX2 (non-VNNI) int8 kernels from saturating); if that fails, falls back to dynamic
    quantization. Input and output stay float32; metadata props are preserved. The
    chosen method is recorded in metadata ``edgeml.quantization`` (``"static_qdq"`` or
    ``"dynamic"``).
    """
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    float_model = _make_onnx_model(
        mlp_weights(n_in, n_hidden, n_out, seed),
        input_name=input_name,
        output_name=output_name,
        name=name,
        version=version,
        batch=batch,
    )

    class _Reader(_ArrayDataReader, CalibrationDataReader):  # type: ignore[misc]
        pass

    log_filter = _DropOrtPreprocessHint()
    root_logger = logging.getLogger()
    root_logger.addFilter(log_filter)
    try:
        with tempfile.TemporaryDirectory(prefix="edgeml_q_") as tmp:
            fp = Path(tmp) / "float.onnx"
            onnx.save_model(float_model, str(fp))
            method = "static_qdq"
            try:
                quantize_static(
                    str(fp),
                    str(path),
                    _Reader(input_name, calibration_data(n_in, seed=seed), batch),
                    quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QInt8,
                    weight_type=QuantType.QInt8,
                    per_channel=False,
                    # 7-bit weights: avoids int16 accumulation saturation in ORT's u8s8
                    # kernels on AVX2 CPUs without VNNI (else errors reach ~0.15).
                    reduce_range=True,
                    extra_options={"ActivationSymmetric": False, "WeightSymmetric": True},
                )
            except Exception:  # pragma: no cover - fallback path
                method = "dynamic"
                quantize_dynamic(str(fp), str(path), weight_type=QuantType.QInt8)
    finally:
        root_logger.removeFilter(log_filter)

    qmodel = onnx.load_model(str(path))
    _set_onnx_metadata(
        qmodel, {"edgeml.name": name, "edgeml.version": version, "edgeml.quantization": method}
    )
    onnx.save_model(qmodel, str(path))
    return path


# --------------------------------------------------------------------------- TFLite


def _act_qparams(lo: float, hi: float) -> tuple[float, int]:
    """Asymmetric int8 (scale, zero_point) covering [lo, hi] (range forced to include 0)."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    if hi - lo < 1e-8:
        hi = lo + 1e-8
    scale = (hi - lo) / 255.0
    zp = int(np.clip(np.round(-128.0 - lo / scale), -128, 127))
    return float(scale), zp


def _sym_weight_q(w: np.ndarray) -> tuple[np.ndarray, float]:
    """Per-tensor symmetric int8 quantization (zero_point 0, range [-127, 127])."""
    amax = float(np.max(np.abs(w))) or 1e-8
    scale = amax / 127.0
    q = np.clip(np.round(w / scale), -127, 127).astype(np.int8)
    return q, scale


def build_tflite_mlp(
    path: str | os.PathLike[str],
    n_in: int = 4,
    n_hidden: int = 16,
    n_out: int = 3,
    seed: int = 0,
    *,
    quantized: bool = False,
    batch: int = 1,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write a TFLite MLP flatbuffer and return its path.

    ``metadata``: text entries of ``Model.metadata`` (one buffer each), as ``edgeml.name``,
    ``edgeml.version`` and ``edgeml.samples`` ride in ONNX ``metadata_props``.

    Graph: ``FULLY_CONNECTED(fused RELU) -> FULLY_CONNECTED -> SOFTMAX`` with input tensor
    ``"input"`` ``[batch, n_in]`` and output tensor ``"probs"`` ``[batch, n_out]``.

    * ``quantized=False``: float32 throughout.
    * ``quantized=True``: fully int8 - int8 input/output with scale/zero_point, int8
      per-tensor symmetric weights, int32 biases (scale ``in_scale * w_scale``), softmax
      output scale 1/256 / zero_point -128. Activation ranges are calibrated by running
      :func:`calibration_data` through the float network in numpy.

    The batch dimension is static (``shape_signature`` is ``[-1, ...]`` though), so use
    ``interpreter.resize_tensor_input(idx, [B, n_in])`` + ``allocate_tensors()`` for
    other batch sizes.
    """
    import flatbuffers
    from ai_edge_litert import schema_py_generated as S

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    weights = mlp_weights(n_in, n_hidden, n_out, seed)
    (w1, b1), (w2, b2) = weights
    batch = int(batch)

    buffers: list[Any] = [S.BufferT()]  # buffer 0: mandatory empty sentinel
    tensors: list[Any] = []

    def add_buffer(arr: np.ndarray | None) -> int:
        buf = S.BufferT()
        if arr is not None:
            buf.data = np.frombuffer(np.ascontiguousarray(arr).tobytes(), dtype=np.uint8)
        buffers.append(buf)
        return len(buffers) - 1

    def add_tensor(
        tname: str,
        shape: list[int],
        ttype: int,
        data: np.ndarray | None = None,
        q: tuple[float, int] | None = None,
        dynamic_batch: bool = False,
    ) -> int:
        t = S.TensorT()
        t.name = tname
        t.shape = list(shape)
        if dynamic_batch:
            t.shapeSignature = [-1] + list(shape[1:])
        t.type = ttype
        t.buffer = add_buffer(data) if data is not None else add_buffer(None)
        if q is not None:
            qp = S.QuantizationParametersT()
            qp.scale = [float(q[0])]
            qp.zeroPoint = [int(q[1])]
            qp.quantizedDimension = 0
            t.quantization = qp
        tensors.append(t)
        return len(tensors) - 1

    F32, I8, I32 = S.TensorType.FLOAT32, S.TensorType.INT8, S.TensorType.INT32
    if not quantized:
        t_in = add_tensor("input", [batch, n_in], F32, dynamic_batch=True)
        t_w1 = add_tensor("fc1/weights", [n_hidden, n_in], F32, w1.astype(np.float32))
        t_b1 = add_tensor("fc1/bias", [n_hidden], F32, b1.astype(np.float32))
        t_h = add_tensor("fc1/relu", [batch, n_hidden], F32, dynamic_batch=True)
        t_w2 = add_tensor("fc2/weights", [n_out, n_hidden], F32, w2.astype(np.float32))
        t_b2 = add_tensor("fc2/bias", [n_out], F32, b2.astype(np.float32))
        t_lg = add_tensor("logits", [batch, n_out], F32, dynamic_batch=True)
        t_out = add_tensor("probs", [batch, n_out], F32, dynamic_batch=True)
        fc_version, sm_version = 1, 1
    else:
        acts = _forward_all(calibration_data(n_in, seed=seed), weights)
        q_in = _act_qparams(acts[0].min(), acts[0].max())
        q_h = _act_qparams(0.0, acts[1].max())  # post-ReLU: zero_point -128
        q_lg = _act_qparams(acts[2].min(), acts[2].max())
        q_out = (1.0 / 256.0, -128)  # TFLite's required int8 softmax output params
        qw1, s_w1 = _sym_weight_q(w1)
        qw2, s_w2 = _sym_weight_q(w2)
        s_b1, s_b2 = q_in[0] * s_w1, q_h[0] * s_w2
        qb1 = np.round(b1.astype(np.float64) / s_b1).astype(np.int32)
        qb2 = np.round(b2.astype(np.float64) / s_b2).astype(np.int32)
        t_in = add_tensor("input", [batch, n_in], I8, q=q_in, dynamic_batch=True)
        t_w1 = add_tensor("fc1/weights", [n_hidden, n_in], I8, qw1, q=(s_w1, 0))
        t_b1 = add_tensor("fc1/bias", [n_hidden], I32, qb1, q=(s_b1, 0))
        t_h = add_tensor("fc1/relu", [batch, n_hidden], I8, q=q_h, dynamic_batch=True)
        t_w2 = add_tensor("fc2/weights", [n_out, n_hidden], I8, qw2, q=(s_w2, 0))
        t_b2 = add_tensor("fc2/bias", [n_out], I32, qb2, q=(s_b2, 0))
        t_lg = add_tensor("logits", [batch, n_out], I8, q=q_lg, dynamic_batch=True)
        t_out = add_tensor("probs", [batch, n_out], I8, q=q_out, dynamic_batch=True)
        fc_version, sm_version = 4, 2

    def opcode(code: int, ver: int) -> Any:
        oc = S.OperatorCodeT()
        oc.builtinCode = code
        oc.deprecatedBuiltinCode = min(code, 127)
        oc.version = ver
        return oc

    op_fc = S.BuiltinOperator.FULLY_CONNECTED
    op_sm = S.BuiltinOperator.SOFTMAX
    opcodes = [opcode(op_fc, fc_version), opcode(op_sm, sm_version)]

    def fc(inp: int, w: int, b: int, out: int, relu: bool) -> Any:
        opt = S.FullyConnectedOptionsT()
        opt.fusedActivationFunction = (
            S.ActivationFunctionType.RELU if relu else S.ActivationFunctionType.NONE
        )
        opt.weightsFormat = S.FullyConnectedOptionsWeightsFormat.DEFAULT
        opt.keepNumDims = False
        op = S.OperatorT()
        op.opcodeIndex = 0
        op.inputs, op.outputs = [inp, w, b], [out]
        op.builtinOptionsType = S.BuiltinOptions.FullyConnectedOptions
        op.builtinOptions = opt
        return op

    sm_opt = S.SoftmaxOptionsT()
    sm_opt.beta = 1.0
    sm = S.OperatorT()
    sm.opcodeIndex = 1
    sm.inputs, sm.outputs = [t_lg], [t_out]
    sm.builtinOptionsType = S.BuiltinOptions.SoftmaxOptions
    sm.builtinOptions = sm_opt

    sg = S.SubGraphT()
    sg.name = "main"
    sg.tensors = tensors
    sg.inputs, sg.outputs = [t_in], [t_out]
    sg.operators = [fc(t_in, t_w1, t_b1, t_h, True), fc(t_h, t_w2, t_b2, t_lg, False), sm]

    model = S.ModelT()
    model.version = 3
    model.description = f"edgeml._testing mlp {n_in}-{n_hidden}-{n_out} seed={seed}" + (
        " int8" if quantized else " float32"
    )
    model.operatorCodes = opcodes
    model.subgraphs = [sg]
    model.metadata = []
    for key, text in (metadata or {}).items():
        data = S.BufferT()
        data.data = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
        buffers.append(data)
        entry = S.MetadataT()
        entry.name, entry.buffer = key, len(buffers) - 1
        model.metadata.append(entry)
    model.buffers = buffers

    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    path.write_bytes(bytes(builder.Output()))
    return path


# --------------------------------------------------------------------------- corruption


def corrupt_copy(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    mode: Literal["truncate", "garbage"] = "truncate",
) -> Path:
    """Write a broken copy of ``src`` to ``dst`` for bad-model tests.

    * ``"truncate"``: keep only the first half of the bytes.
    * ``"garbage"``: same length, every byte replaced with deterministic pseudo-random
      bytes (so the header / file identifier is destroyed too and loaders fail cleanly
      instead of following garbage offsets).
    """
    src, dst = Path(src), Path(dst)
    data = src.read_bytes()
    if mode == "truncate":
        out = data[: len(data) // 2]
    elif mode == "garbage":
        rng = np.random.default_rng(len(data))
        noise = rng.integers(0, 256, size=len(data), dtype=np.uint8).tobytes()
        out = bytes(a ^ b ^ 0xA5 for a, b in zip(data, noise, strict=True)) if data else b"\xa5"
        if out[4:8] == b"TFL3":  # vanishingly unlikely, but be sure
            out = out[:4] + b"XXXX" + out[8:]
    else:
        raise ValueError(f"unknown corruption mode {mode!r} (use 'truncate' or 'garbage')")
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(out)
    return dst
