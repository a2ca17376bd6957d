"""Runtimes: the same outputs through the agent as through the engine called directly."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import numpy as np
import pytest

from edgeml import Agent, AgentClient, InputError, ModelLoadError, NoModelError, load_config
from edgeml._testing import models as modelgen
from edgeml.runtime import load_runtime

from .conftest import agent_env, free_port

X = np.random.default_rng(42).standard_normal((8, 4)).astype(np.float32)


def _direct(kind: str, path: Path, x: np.ndarray) -> np.ndarray:
    """Run the model with the engine's own API, no edgeml code involved."""
    if kind.startswith("onnx"):
        import onnxruntime as ort

        return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=str(path))
    inp, out = it.get_input_details()[0], it.get_output_details()[0]
    it.resize_tensor_input(inp["index"], list(x.shape))
    it.allocate_tensors()
    if inp["dtype"] == np.int8:
        scale, zero = inp["quantization"]
        x = np.clip(np.round(x / scale) + zero, -128, 127).astype(np.int8)
    it.set_tensor(inp["index"], x)
    it.invoke()
    y = it.get_tensor(out["index"])
    if out["dtype"] == np.int8:
        scale, zero = out["quantization"]
        y = (y.astype(np.float32) - zero) * np.float32(scale)
    return y


def _agent(tmp_path: Path, model: Path | None, **extra: str) -> Agent:
    env = agent_env(EDGEML_DATA_DIR=tmp_path / "data", EDGEML_API_ADDR=f"127.0.0.1:{free_port()}", **extra)
    if model is not None:
        env["EDGEML_MODEL_PATH"] = str(model)
    return Agent(load_config(env=env))


@pytest.mark.parametrize("kind", ["onnx_float", "onnx_int8", "tflite_float", "tflite_int8"])
def test_agent_matches_engine(kind: str, models: dict[str, Path], tmp_path: Path) -> None:
    expected = _direct(kind, models[kind], X)
    with _agent(tmp_path, models[kind]) as agent:
        assert agent.model is not None and agent.model.info.engine == kind.split("_")[0].replace("tflite", "litert")
        got = agent.predict({"input": X}).outputs["probs"]
        np.testing.assert_array_equal(got, expected)
        # one row at a time (TFLite resizes its batch) and as nested lists
        for i in range(3):
            row = agent.predict({"input": X[i : i + 1].tolist()}).outputs["probs"]
            np.testing.assert_allclose(row, expected[i : i + 1], rtol=0, atol=1e-6)
        with AgentClient(f"http://{agent.config.api_addr}") as client:
            answer = client.predict({"input": X.tolist()})
        np.testing.assert_allclose(np.array(answer["outputs"]["probs"]), expected, rtol=0, atol=1e-6)
        assert answer["model"] == agent.model.name and answer["latency_us"] > 0


def test_onnx_engine_binding_and_public_api_agree(models: dict[str, Path]) -> None:
    """The runtime calls ONNX Runtime's binding directly (prepare has checked the feeds);
    when the binding refuses the feeds, the public API answers, with the same outputs."""
    runtime = load_runtime(models["onnx_float"])
    expected = _direct("onnx_float", models["onnx_float"], X)
    assert runtime._engine_binding  # this build has the binding: the fast path is taken
    np.testing.assert_array_equal(runtime.run(runtime.prepare({"input": X}))["probs"], expected)

    class RefusesOnce:
        """The binding refusing the fast path's call, then answering the public method's."""

        def __init__(self, real: object) -> None:
            self.real, self.calls = real, 0

        def run(self, *args: object) -> object:
            self.calls += 1
            if self.calls == 1:
                raise TypeError("not a feed this binding takes")
            return self.real.run(*args)  # type: ignore[attr-defined]

        def __getattr__(self, name: str) -> object:  # what the public method also asks the binding
            return getattr(self.real, name)

    session = runtime._session
    real = session._sess
    session._sess = wrapper = RefusesOnce(real)
    try:
        np.testing.assert_array_equal(runtime.run({"input": X})["probs"], expected)
        assert wrapper.calls == 2  # refused, then answered through InferenceSession.run
    finally:
        session._sess = real
    np.testing.assert_array_equal(runtime.run({"input": X})["probs"], expected)


def test_quantized_models_agree_with_float(models: dict[str, Path]) -> None:
    ref = modelgen.reference_forward(X, modelgen.mlp_weights())
    for kind in ("onnx_int8", "tflite_int8"):
        rt = load_runtime(models[kind])
        y = rt.run(rt.prepare({"input": X}))["probs"]
        assert np.abs(y - ref).max() < 0.06, kind
        assert rt.inputs[0].dtype == np.float32


@pytest.mark.parametrize("mode", ["truncate", "garbage"])
@pytest.mark.parametrize("kind", ["onnx_float", "tflite_float"])
def test_corrupt_model_is_a_clear_error(kind: str, mode: str, models: dict[str, Path], tmp_path: Path) -> None:
    bad = modelgen.corrupt_copy(models[kind], tmp_path / f"bad{models[kind].suffix}", mode=mode)
    with pytest.raises(ModelLoadError, match="cannot load"):
        load_runtime(bad)


def test_unsupported_and_missing_model(tmp_path: Path) -> None:
    (tmp_path / "m.pt").write_bytes(b"not a model at all")
    with pytest.raises(ModelLoadError, match="unsupported model format"):
        load_runtime(tmp_path / "m.pt")
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_runtime(tmp_path / "nope.onnx")
    (tmp_path / "empty.onnx").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="empty"):
        load_runtime(tmp_path / "empty.onnx")


def test_no_model_answers_503(tmp_path: Path) -> None:
    with _agent(tmp_path, None) as agent:
        with pytest.raises(NoModelError):
            agent.predict({"input": X})
        base = f"http://{agent.config.api_addr}"
        r = httpx.post(f"{base}/v1/predict", json={"inputs": {"input": X.tolist()}})
        assert r.status_code == 503 and r.json()["error"]["code"] == "no_model"
        assert httpx.get(f"{base}/v1/health").status_code == 503


def test_corrupt_model_keeps_the_model_it_had(models: dict[str, Path], tmp_path: Path) -> None:
    with _agent(tmp_path, models["onnx_float"]) as agent:
        before = agent.predict({"input": X}).outputs["probs"]
    bad = modelgen.corrupt_copy(models["onnx_v2"], tmp_path / "v2.onnx", mode="truncate")
    with _agent(tmp_path, bad) as agent:  # same data dir: the stored model is still there
        assert agent.model is not None and agent.model.version == "1.0.0"
        np.testing.assert_array_equal(agent.predict({"input": X}).outputs["probs"], before)
        events = [e for e in _events(agent) if e["name"] == "model_load_failed"]
        assert events and "cannot load" in events[0]["message"]
        with pytest.raises(ModelLoadError):
            agent.load_model(bad)
        assert agent.model.version == "1.0.0"
        agent.load_model(models["onnx_v2"])
        assert agent.model.version == "2.0.0"


def _events(agent: Agent) -> list[dict]:
    from edgeml.buffer import iter_records

    buf = agent._buffer
    assert buf is not None
    buf.flush()
    batch = buf.read_batch(0, 10_000, 1 << 30)
    return [r for r in iter_records(batch.bodies if batch else []) if r["kind"] == "event"]


def test_input_errors_in_process(models: dict[str, Path], tmp_path: Path) -> None:
    with _agent(tmp_path, models["onnx_float"]) as agent:
        cases = [
            ({"input": [[1, 2, 3]]}, "expected shape [N, 4], got [1, 3]"),
            ({"input": [1, 2, 3, 4]}, "expected 2 dimensions"),
            ({"input": [["a", "b", "c", "d"]]}, "expected numbers"),
            ({"input": [[1, 2], [3]]}, "not a rectangular array"),
            ({}, "missing input 'input'"),
            ({"input": [[1, 2, 3, 4]], "extra": [1]}, "unknown input"),
            ([1, 2], "must be an object"),
        ]
        # numpy arrays take the fast check first; what it does not accept gets the full one
        cases += [
            ({"input": np.zeros((1, 3), np.float32)}, "expected shape [N, 4], got [1, 3]"),
            ({"input": np.zeros((4,), np.float32)}, "expected 2 dimensions"),
            ({"input": np.zeros((1, 1, 4), np.float32)}, "expected 2 dimensions"),
        ]
        for inputs, message in cases:
            with pytest.raises(InputError) as info:
                agent.predict(inputs)  # type: ignore[arg-type]
            assert message in str(info.value), (inputs, str(info.value))
        assert agent.status()["counters"]["prediction_errors"] == len(cases)
        want = agent.predict({"input": np.ones((2, 4), np.float32)}).outputs["probs"]
        for same in (np.ones((2, 4), np.float64), np.ones((2, 4), np.dtype(">f4")), [[1, 1, 1, 1]] * 2):
            np.testing.assert_array_equal(agent.predict({"input": same}).outputs["probs"], want)  # converted


def test_tflite_metadata_of_a_cut_file_is_a_clear_error(tmp_path: Path) -> None:
    from edgeml.runtime.tflite_metadata import read_tflite_metadata

    indented = json.dumps({"inputs": [{"input": [[0.0, 1.0, 2.0, 3.0]]}]}, indent=2)  # newlines are text
    path = modelgen.build_tflite_mlp(tmp_path / "m.tflite", metadata={"edgeml.version": "2.0.0",
                                                                        "edgeml.samples": indented, "raw": "\x01\x02"})
    assert read_tflite_metadata(path) == {"edgeml.version": "2.0.0", "edgeml.samples": indented}  # binary skipped
    raw = path.read_bytes()
    for size in (0, 3, 64, len(raw) // 2):
        (tmp_path / "cut.tflite").write_bytes(raw[:size])
        with pytest.raises(ValueError, match="cut.tflite"):
            read_tflite_metadata(tmp_path / "cut.tflite")


def _identity_onnx(path: Path, elem_type: int, shape: list[int | str] | None) -> Path:
    """One Identity node: what goes in comes out (shape None: the input's rank is not declared)."""
    import onnx
    from onnx import TensorProto, helper

    def info(name: str) -> onnx.ValueInfoProto:
        if shape is None:
            return helper.make_value_info(name, helper.make_tensor_type_proto(elem_type, shape=None))
        return helper.make_tensor_value_info(name, elem_type, shape)

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "identity", [info("x")], [info("y")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    assert TensorProto  # the element types come from it
    return path


@pytest.mark.parametrize(
    ("elem", "value", "message"),
    [
        ("UINT8", [[300, 1]], "out of range 0..255"),
        ("INT8", [[-1, -129]], "out of range -128..127"),
        ("INT64", [[2**63, 1]], "out of range"),
        ("FLOAT16", [[1e6, 1.0]], "out of range of float16"),
        ("FLOAT", [[1e300, 1.0]], "out of range of float32"),
        ("FLOAT", [[True, False]], "got booleans"),
        ("BOOL", [[2, 1]], "expected booleans"),
        ("INT64", [[1.0, 2.5]], "expected integers (int64), got floats"),
        ("INT32", [[1.0, 2.0]], "expected integers (int32), got floats"),
    ],
)
def test_numbers_that_do_not_fit_the_input_type_are_refused_not_wrapped(elem: str, value: list, message: str,
                                                                          tmp_path: Path) -> None:
    from onnx import TensorProto

    runtime = load_runtime(_identity_onnx(tmp_path / "m.onnx", getattr(TensorProto, elem), ["N", 2]))
    with pytest.raises(InputError, match=re.escape(message)):
        runtime.prepare({"x": value})


def test_numbers_that_fit_are_converted_exactly(tmp_path: Path) -> None:
    from onnx import TensorProto

    runtime = load_runtime(_identity_onnx(tmp_path / "m.onnx", TensorProto.UINT8, ["N", 2]))
    assert runtime.run(runtime.prepare({"x": [[0, 255]]}))["y"].tolist() == [[0, 255]]
    flags = load_runtime(_identity_onnx(tmp_path / "b.onnx", TensorProto.BOOL, ["N", 2]))
    assert flags.run(flags.prepare({"x": [[True, False]]}))["y"].tolist() == [[True, False]]
    assert flags.run(flags.prepare({"x": [[1, 0]]}))["y"].tolist() == [[True, False]]


def test_an_input_of_undeclared_rank_is_served(tmp_path: Path) -> None:
    from onnx import TensorProto

    path = _identity_onnx(tmp_path / "m.onnx", TensorProto.FLOAT, None)
    with _agent(tmp_path, path) as agent:
        out = agent.predict({"x": [[1.0, 2.0], [3.0, 4.0]]}).outputs["y"]
        assert out.tolist() == [[1.0, 2.0], [3.0, 4.0]]
        assert agent.predict({"x": [5.0]}).outputs["y"].tolist() == [5.0]


def test_an_ort_format_model_is_served_again_after_a_restart(models: dict[str, Path], tmp_path: Path) -> None:
    import onnxruntime as ort

    ort_model = tmp_path / "mlp.ort"
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(ort_model)
    opts.add_session_config_entry("session.save_model_format", "ORT")
    ort.InferenceSession(str(models["onnx_float"]), opts, providers=["CPUExecutionProvider"])
    want = _direct("onnx", models["onnx_float"], X)
    for _ in range(2):  # the second start loads the stored copy
        with _agent(tmp_path, ort_model) as agent:
            assert agent.health()["status"] == "ok"
            np.testing.assert_allclose(agent.predict({"input": X}).outputs["probs"], want, rtol=1e-5)
    assert [p.suffix for p in (tmp_path / "data" / "models").glob("*.ort")] == [".ort"]


def _fixed_batch_tflite(path: Path) -> Path:
    """input [1, 4] -> RESHAPE to [1, 4]: a graph that cannot take another batch size."""
    flatbuffers = pytest.importorskip("flatbuffers")
    schema = pytest.importorskip("ai_edge_litert.schema_py_generated")
    buffers, tensors = [schema.BufferT()], []

    def tensor(name: str, shape: list[int], kind: int, data: np.ndarray | None = None) -> int:
        buf = schema.BufferT()
        if data is not None:
            buf.data = np.frombuffer(data.tobytes(), dtype=np.uint8)
        buffers.append(buf)
        t = schema.TensorT()
        t.name, t.shape, t.type, t.buffer = name, shape, kind, len(buffers) - 1
        tensors.append(t)
        return len(tensors) - 1

    x = tensor("input", [1, 4], schema.TensorType.FLOAT32)
    shape = tensor("shape", [2], schema.TensorType.INT32, np.array([1, 4], np.int32))
    y = tensor("out", [1, 4], schema.TensorType.FLOAT32)
    code = schema.OperatorCodeT()
    code.builtinCode = code.deprecatedBuiltinCode = schema.BuiltinOperator.RESHAPE
    code.version = 1
    op = schema.OperatorT()
    op.opcodeIndex, op.inputs, op.outputs = 0, [x, shape], [y]
    options = schema.ReshapeOptionsT()
    options.newShape = [1, 4]
    op.builtinOptionsType, op.builtinOptions = schema.BuiltinOptions.ReshapeOptions, options
    graph = schema.SubGraphT()
    graph.name, graph.tensors, graph.inputs, graph.outputs, graph.operators = "main", tensors, [x], [y], [op]
    model = schema.ModelT()
    model.version, model.operatorCodes, model.subgraphs, model.buffers, model.metadata = 3, [code], [graph], buffers, []
    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    path.write_bytes(bytes(builder.Output()))
    return path


def test_a_batch_the_tflite_graph_cannot_take_is_a_400_and_the_model_keeps_serving(tmp_path: Path) -> None:
    runtime = load_runtime(_fixed_batch_tflite(tmp_path / "fixed.tflite"))
    one = [[1.0, 2.0, 3.0, 4.0]]
    with pytest.raises(InputError, match=r"cannot take shape \[2, 4\].*it takes \[1, 4\]"):
        runtime.run(runtime.prepare({"input": one * 2}))
    assert runtime.run(runtime.prepare({"input": one}))["out"].tolist() == one  # served as before


def test_inputs_that_share_a_named_dimension_must_agree_on_it(tmp_path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    a, b, y = (helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", 4]) for n in ("a", "b", "y"))
    graph = helper.make_graph([helper.make_node("Add", ["a", "b"], ["y"])], "add", [a, b], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "add.onnx")
    with _agent(tmp_path, tmp_path / "add.onnx") as agent:
        with pytest.raises(InputError, match=r"agree on dimension 'N': a\[0\] = 2, b\[0\] = 3"):
            agent.predict({"a": np.zeros((2, 4), np.float32), "b": np.zeros((3, 4), np.float32)})
        assert agent.predict({"a": np.ones((2, 4), np.float32), "b": np.ones((2, 4), np.float32)}).outputs["y"].sum() == 16
