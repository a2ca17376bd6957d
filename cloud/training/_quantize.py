"""int8 artifacts and the gate that accepts or refuses them.

Static QDQ follows edgeml/_testing/models.py: int8 activations and weights, MinMax
calibration (here on rows of the training split), ``reduce_range=True`` (7-bit weights,
so ORT's u8s8 kernels on AVX2 CPUs without VNNI do not saturate). Dynamic quantization
(int8 weights, activations quantized at run time) is tried beside it; every candidate is
evaluated on the held-out split and timed against the float model on the same batch.

The gate (:func:`gate`) refuses a candidate that loses more than ``margin`` accuracy or
is not ``min_speedup`` times faster than float; of the accepted ones the fastest wins.
"""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

#: The exported graph's input (``_torch.INPUT_NAME``; not imported from there: reading a
#: model's figures needs onnxruntime, not torch).
INPUT_NAME = "input"

__all__ = ["Evaluation", "GateDecision", "evaluate", "gate", "quantize"]


@dataclass(frozen=True)
class Evaluation:
    """One ONNX artifact measured with onnxruntime on the held-out batch."""

    path: Path
    accuracy: float
    latency_us: float  # median of the held-out batch, one thread
    latency_us_row: float  # median of a single row
    size: int
    method: str

    def as_json(self) -> dict[str, Any]:
        return {"accuracy": self.accuracy, "latency_us_batch": self.latency_us, "latency_us_row": self.latency_us_row,
                "size_bytes": self.size, "method": self.method, "runtime": "onnxruntime"}


@dataclass(frozen=True)
class GateDecision:
    method: str
    accepted: bool
    reasons: tuple[str, ...]
    accuracy_drop: float
    speedup: float
    size_ratio: float

    def as_json(self) -> dict[str, Any]:
        return {"method": self.method, "accepted": self.accepted, "reasons": list(self.reasons),
                "accuracy_drop": self.accuracy_drop, "speedup": self.speedup, "size_ratio": self.size_ratio}


def gate(float_eval: Evaluation, candidate: Evaluation, *, margin: float, min_speedup: float) -> GateDecision:
    """Accept ``candidate`` only within ``margin`` accuracy and at least ``min_speedup`` times faster."""
    drop = float_eval.accuracy - candidate.accuracy
    speedup = float_eval.latency_us / candidate.latency_us if candidate.latency_us > 0 else float("inf")
    reasons = []
    if drop > margin + 1e-12:
        reasons.append(f"accuracy {candidate.accuracy:.4f} is {drop * 100:.2f} points below float "
                       f"{float_eval.accuracy:.4f} (margin {margin * 100:.2f})")
    if speedup < min_speedup:
        reasons.append(f"not faster than float on this CPU: {candidate.latency_us:.1f} us vs "
                       f"{float_eval.latency_us:.1f} us per batch (x{speedup:.2f}, need x{min_speedup:.2f})")
    return GateDecision(candidate.method, not reasons, tuple(reasons), drop, speedup, candidate.size / float_eval.size)


class _DropOrtHints(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "pre-processing" not in record.getMessage()


def quantize(float_path: Path, out_dir: Path, method: str, calibration: np.ndarray) -> Path:
    """Write ``model.int8-<method>.onnx`` beside the float model; returns its path."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    out = out_dir / f"model.int8-{method}.onnx"

    class _Reader(CalibrationDataReader):  # type: ignore[misc]
        def __init__(self) -> None:
            self._rows = iter(calibration[i : i + 1] for i in range(len(calibration)))

        def get_next(self) -> dict[str, np.ndarray] | None:
            row = next(self._rows, None)
            return None if row is None else {INPUT_NAME: row}

    hints = _DropOrtHints()
    root = logging.getLogger()
    root.addFilter(hints)
    try:
        if method == "static_qdq":
            quantize_static(
                str(float_path), str(out), _Reader(), quant_format=QuantFormat.QDQ,
                activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, per_channel=False,
                reduce_range=True, extra_options={"ActivationSymmetric": False, "WeightSymmetric": True},
            )
        elif method == "dynamic":
            quantize_dynamic(str(float_path), str(out), weight_type=QuantType.QInt8)
        else:
            raise ValueError(f"unknown quantization method {method!r}")
    finally:
        root.removeFilter(hints)
    return out


def _session(path: Path) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _median_us(sess: Any, batch: np.ndarray, repeats: int) -> float:
    feed = {INPUT_NAME: batch}
    for _ in range(3):
        sess.run(None, feed)
    times = []
    for _ in range(repeats):
        start = time.perf_counter_ns()
        sess.run(None, feed)
        times.append((time.perf_counter_ns() - start) / 1000.0)
    return statistics.median(times)


def probabilities(path: Path, x: np.ndarray) -> np.ndarray:
    return _session(path).run(None, {INPUT_NAME: np.ascontiguousarray(x, np.float32)})[0]


def evaluate(path: Path, x: np.ndarray, y: np.ndarray, *, method: str, repeats: int) -> Evaluation:
    sess = _session(path)
    batch = np.ascontiguousarray(x, np.float32)
    probs = sess.run(None, {INPUT_NAME: batch})[0]
    return Evaluation(
        path, float((probs.argmax(axis=1) == y).mean()), _median_us(sess, batch, repeats),
        _median_us(sess, batch[:1], repeats * 3), path.stat().st_size, method,
    )


def interleaved_latency(paths: list[Path], x: np.ndarray, repeats: int) -> list[float]:
    """Median batch latency of each model, measured in alternation (fair under CPU noise)."""
    sessions = [_session(p) for p in paths]
    batch = np.ascontiguousarray(x, np.float32)
    feed = {INPUT_NAME: batch}
    times: list[list[float]] = [[] for _ in paths]
    for sess in sessions:
        for _ in range(3):
            sess.run(None, feed)
    for _ in range(repeats):
        for sess, out in zip(sessions, times, strict=True):
            start = time.perf_counter_ns()
            sess.run(None, feed)
            out.append((time.perf_counter_ns() - start) / 1000.0)
    return [statistics.median(t) for t in times]
