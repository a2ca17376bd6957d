"""The recorded input set and the models built from it.

``hil/data/iris.npz`` holds a held-out split of the iris measurements (``inputs``,
``labels``) and the weights of a small MLP fitted on the other split (``w1 b1 w2 b2``,
standardization folded into the first layer). The rig builds the ONNX model from the
weights, so the artifact it registers is made here, not downloaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ._exceptions import ScenarioError
from ._scenario import ModelSpec


@dataclass(frozen=True)
class RecordedSet:
    inputs: np.ndarray
    labels: np.ndarray
    weights: list[tuple[np.ndarray, np.ndarray]]

    def __len__(self) -> int:
        return len(self.labels)


def load_set(path: Path) -> RecordedSet:
    try:
        with np.load(path) as npz:
            inputs = npz["inputs"].astype(np.float32)
            labels = npz["labels"].astype(np.int64)
            weights = [(npz["w1"], npz["b1"]), (npz["w2"], npz["b2"])]
    except (OSError, KeyError, ValueError) as exc:
        raise ScenarioError(f"dataset {path}: {exc}") from None
    if inputs.ndim != 2 or len(inputs) != len(labels) or len(labels) == 0:
        raise ScenarioError(f"dataset {path}: inputs must be [n, features] with n labels")
    return RecordedSet(inputs, labels, weights)


def build_model(recorded: RecordedSet, spec: ModelSpec, out_dir: Path) -> Path:
    """Write the ONNX model of ``spec`` (float32 MLP) and return its path."""
    import onnx

    from edgeml._testing.models import _make_onnx_model

    (w1, b1), (w2, b2) = recorded.weights
    if spec.variant == "broken":  # the classes shifted by one: every answer wrong
        w2, b2 = np.roll(w2, 1, axis=0), np.roll(b2, 1)
    model = _make_onnx_model([(w1.astype(np.float32), b1.astype(np.float32)), (w2.astype(np.float32), b2.astype(np.float32))],
                             input_name="input", output_name="probs", name=spec.name, version=spec.version, batch=None)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{spec.name}-{spec.version}-{spec.variant}.onnx"
    onnx.save_model(model, str(path))
    return path
