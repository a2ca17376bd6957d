"""ONNX Runtime engine."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from .._exceptions import ModelLoadError
from ._base import Runtime, TensorSpec

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
    shape = tuple(d if isinstance(d, int) and d > 0 else None for d in (arg.shape or []))  # type: ignore[attr-defined]
    return TensorSpec(name, shape, np.dtype(_ONNX_TYPES[onnx_type]))


class OnnxRuntime(Runtime):
    engine = "onnx"

    def __init__(self, path: Path, threads: int = 1) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        try:
            self._session = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises pybind errors of several kinds
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelLoadError(f"cannot load ONNX model {path}: {reason}") from exc
        self.inputs = tuple(_spec(a) for a in self._session.get_inputs())
        self.outputs = tuple(_spec(a, output=True) for a in self._session.get_outputs())
        self._output_names = [o.name for o in self.outputs]
        self.metadata = dict(self._session.get_modelmeta().custom_metadata_map)

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self._output_names, self._session.run(self._output_names, feeds)))  # noqa: B905
