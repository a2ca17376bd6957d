"""TFLite engine through LiteRT (``ai_edge_litert``), else ``tflite_runtime``.

Quantized (int8/uint8) input and output tensors are converted at the boundary:
callers pass and receive float32, with the tensor's scale and zero point applied.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .._exceptions import InputError, ModelError, ModelLoadError
from ._base import Runtime, TensorSpec
from .tflite_metadata import read_tflite_metadata


def _interpreter_class() -> Any:
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        try:
            from tflite_runtime.interpreter import Interpreter
        except ImportError:
            raise ModelLoadError(
                "TFLite models need LiteRT: pip install 'edgeml[litert]' (or tflite-runtime on numpy<2)"
            ) from None
    return Interpreter


def available() -> bool:
    try:
        _interpreter_class()
    except ModelLoadError:
        return False
    return True


def _quant(detail: dict[str, Any]) -> tuple[float, int] | None:
    scale, zero = detail.get("quantization", (0.0, 0))
    if np.dtype(detail["dtype"]).kind in "iu" and scale:
        return float(scale), int(zero)
    return None


def _spec(detail: dict[str, Any]) -> TensorSpec:
    sig = detail.get("shape_signature")
    dims = sig if sig is not None and len(sig) else detail["shape"]
    shape = tuple(int(d) if d > 0 else None for d in dims)
    quant = _quant(detail)
    dtype = np.dtype(np.float32) if quant else np.dtype(detail["dtype"])
    return TensorSpec(detail["name"], shape, dtype, quantized=quant is not None)


class LiteRTRuntime(Runtime):
    engine = "litert"

    def __init__(self, path: Path, threads: int = 1) -> None:
        interpreter_cls = _interpreter_class()
        try:
            self._interp = interpreter_cls(model_path=str(path), num_threads=threads)
            self._interp.allocate_tensors()
        except Exception as exc:  # LiteRT raises ValueError/RuntimeError with C++ messages
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelLoadError(f"cannot load TFLite model {path}: {reason}") from exc
        self._in = self._interp.get_input_details()
        self._out = self._interp.get_output_details()
        self.inputs = tuple(_spec(d) for d in self._in)
        # a batch dimension of 1 that the model can resize is reported as dynamic
        self.inputs = tuple(
            TensorSpec(s.name, (None, *s.shape[1:]), s.dtype, s.quantized) if s.shape and s.shape[0] in (1, None) else s
            for s in self.inputs
        )
        self.outputs = tuple(_spec(d) for d in self._out)
        try:
            self.metadata = read_tflite_metadata(path)
        except (OSError, ValueError) as exc:  # the interpreter verified the flatbuffer: unexpected
            raise ModelLoadError(f"cannot read the metadata of TFLite model {path}: {exc}") from exc
        self._lock = threading.Lock()
        self._shapes = {d["index"]: tuple(int(n) for n in d["shape"]) for d in self._in}

    def _resize(self, index: int, name: str, shape: tuple[int, ...]) -> None:
        old = self._shapes[index]
        if old == shape:
            return
        try:
            self._interp.resize_tensor_input(index, list(shape))
            self._interp.allocate_tensors()
        except Exception as exc:  # the graph cannot take that shape (a fixed reshape, say)
            try:  # back to the shape that worked, so the next request is served
                self._interp.resize_tensor_input(index, list(old))
                self._interp.allocate_tensors()
            except Exception as again:
                raise ModelError(f"the model cannot be restored to shape {list(old)}: {again}") from again
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise InputError(f"input {name!r}: this model cannot take shape {list(shape)} ({reason}); "
                             f"it takes {list(old)}") from None
        self._shapes[index] = shape

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        with self._lock:
            for detail in self._in:
                arr = feeds[detail["name"]]
                self._resize(detail["index"], detail["name"], arr.shape)
                quant = _quant(detail)
                if quant is not None and arr.dtype.kind == "f":
                    info = np.iinfo(detail["dtype"])
                    arr = np.clip(np.round(arr / quant[0]) + quant[1], info.min, info.max)
                self._interp.set_tensor(detail["index"], arr.astype(detail["dtype"], copy=False))
            self._interp.invoke()
            out: dict[str, np.ndarray] = {}
            for detail in self._out:
                value = self._interp.get_tensor(detail["index"])
                quant = _quant(detail)
                if quant is not None:
                    value = (value.astype(np.float32) - quant[1]) * np.float32(quant[0])
                out[detail["name"]] = value
            return out

    def close(self) -> None:
        self._interp = None
