"""ONNX Runtime engine."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from .._exceptions import ModelLoadError
from ._base import Runtime, TensorSpec, is_ort_format

_ONNX_TYPES = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(float16)": np.float16,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(int16)": np.int16,
    "tensor(int32)": np.int32,
    "tensor(int64)": np.int64,
    "tensor(bool)": np.bool_,
}


def _spec(arg: object, *, output: bool = False) -> TensorSpec:
    name = arg.name  # type: ignore[attr-defined]
    onnx_type = arg.type  # type: ignore[attr-defined]
    if onnx_type not in _ONNX_TYPES:
        if output:  # e.g. scikit-learn's ZipMap: seq(map(int64,tensor(float)))
            return TensorSpec(name, (), np.dtype(object))
        raise ModelLoadError(f"input {name!r} has unsupported type {onnx_type}")
    dims = arg.shape  # type: ignore[attr-defined]
    shape = tuple(d if isinstance(d, int) and d > 0 else None for d in (dims or []))
    # ONNX Runtime says [] both for a scalar and for a tensor of unknown rank: take it as unknown
    names = tuple(d if isinstance(d, str) and d else None for d in (dims or []))
    return TensorSpec(name, shape, np.dtype(_ONNX_TYPES[onnx_type]), rank_known=bool(dims), dim_names=names)


class OnnxRuntime(Runtime):
    engine = "onnx"

    def __init__(self, path: Path, threads: int = 1) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        if is_ort_format(path):  # ONNX Runtime tells the formats apart by the file name only
            opts.add_session_config_entry("session.load_model_format", "ORT")
        try:
            self._session = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises pybind errors of several kinds
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelLoadError(f"cannot load ONNX model {path}: {reason}") from exc
        self.inputs = tuple(_spec(a) for a in self._session.get_inputs())
        self.outputs = tuple(_spec(a, output=True) for a in self._session.get_outputs())
        self._output_names = [o.name for o in self.outputs]
        self.metadata = dict(self._session.get_modelmeta().custom_metadata_map)
        # ``InferenceSession.run`` re-validates in Python what ``prepare`` has already checked
        # (input names, and OrtValue placement, which never applies: feeds are numpy arrays)
        # and costs ~2 us per call, a fifth of a tiny model's whole run. Call the engine's
        # own binding when this build has it; the public method otherwise.
        # (looked up at each call: ONNX Runtime replaces ``_sess`` when its providers change)
        self._engine_binding = callable(getattr(getattr(self._session, "_sess", None), "run", None))

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        names = self._output_names
        if self._engine_binding:
            try:
                values = self._session._sess.run(names, feeds, None)
            except TypeError:  # feeds the binding does not take (refused before running): the public API says why
                values = self._session.run(names, feeds)
        else:
            values = self._session.run(names, feeds)
        if len(names) == 1:
            return {names[0]: values[0]}
        return dict(zip(names, values))  # noqa: B905
