"""Inference engines behind one :class:`Runtime` interface.

:func:`load_runtime` picks the engine from the file (TFLite flatbuffers carry the
``TFL3`` identifier; everything else is tried as ONNX), loads it and warms it up.
"""

from __future__ import annotations

from pathlib import Path

from .._exceptions import ModelLoadError
from ._base import Runtime, TensorSpec

__all__ = ["Runtime", "TensorSpec", "detect_engine", "load_runtime"]


def detect_engine(path: Path) -> str:
    """``"litert"`` or ``"onnx"``, from the file's content and name."""
    try:
        with path.open("rb") as fh:
            head = fh.read(8)
    except FileNotFoundError:
        raise ModelLoadError(f"model file {path} does not exist") from None
    except OSError as exc:
        raise ModelLoadError(f"cannot read model file {path}: {exc.strerror}") from exc
    if not head:
        raise ModelLoadError(f"model file {path} is empty")
    if head[4:8] == b"TFL3" or path.suffix == ".tflite":
        return "litert"
    if path.suffix in (".onnx", ".ort", ""):
        return "onnx"
    raise ModelLoadError(f"unsupported model format {path.suffix!r} ({path}); expected .onnx or .tflite")


def load_runtime(path: str | Path, *, engine: str = "auto", threads: int = 1, warmup_runs: int = 3) -> Runtime:
    """Load ``path`` into an engine and warm it up; :class:`ModelLoadError` on any failure."""
    path = Path(path)
    kind = detect_engine(path) if engine == "auto" else engine
    if kind == "onnx":
        from ._onnx import OnnxRuntime

        runtime: Runtime = OnnxRuntime(path, threads)
    elif kind == "litert":
        from ._litert import LiteRTRuntime

        runtime = LiteRTRuntime(path, threads)
    else:
        raise ModelLoadError(f"unknown engine {kind!r}")
    try:
        runtime.warm_up(warmup_runs)
    except Exception as exc:  # an engine error during warm-up means the model is unusable
        runtime.close()
        raise ModelLoadError(f"model {path} failed its warm-up run: {exc}") from exc
    return runtime
