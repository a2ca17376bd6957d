"""PyTorch side: the MLP with its preprocessing as the first layer, deterministic training, ONNX export.

Determinism: the run forks the RNG (the caller's global torch RNG is untouched), seeds
it, uses deterministic algorithms on one thread and shuffles with its own generator;
the previous thread count and determinism flag are restored afterwards. Same recipe and
snapshot -> bit-identical weights on the same torch build and CPU.
"""

from __future__ import annotations

import contextlib
import hashlib
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ._recipe import Recipe

__all__ = ["EpochMetrics", "Standardize", "TrainedModel", "build_model", "predict", "train_model", "weights_hash"]

INPUT_NAME = "input"  # also cloud.training._quantize.INPUT_NAME
OUTPUT_NAME = "probs"


class Standardize(nn.Module):
    """``(x - mean) * inv_std``: the training's preprocessing, exported as the graph's first ops."""

    def __init__(self, mean: np.ndarray, inv_std: np.ndarray) -> None:
        super().__init__()
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32))
        self.register_buffer("inv_std", torch.as_tensor(inv_std, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) * self.inv_std


class Classifier(nn.Module):
    """Raw features -> standardize -> MLP -> logits; :meth:`probs` adds the softmax (exported)."""

    def __init__(self, prep: Standardize, body: nn.Sequential) -> None:
        super().__init__()
        self.prep = prep
        self.body = body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.prep(x))


class _Exported(nn.Module):
    def __init__(self, model: Classifier) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.model(x), dim=-1)


@dataclass(frozen=True)
class EpochMetrics:
    epoch: int
    loss: float
    train_accuracy: float
    test_accuracy: float
    seconds: float

    def as_json(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "loss": self.loss, "train_accuracy": self.train_accuracy,
                "test_accuracy": self.test_accuracy, "seconds": self.seconds}


@dataclass
class TrainedModel:
    model: Classifier
    epochs: list[EpochMetrics]
    n_features: int
    n_classes: int


def standardization(x: np.ndarray, min_std: float, enabled: bool) -> tuple[np.ndarray, np.ndarray]:
    if not enabled:
        return np.zeros(x.shape[1], np.float32), np.ones(x.shape[1], np.float32)
    mean = x.mean(axis=0, dtype=np.float64)
    std = x.std(axis=0, dtype=np.float64)
    inv = np.where(std < min_std, 1.0, 1.0 / np.maximum(std, min_std))
    return mean.astype(np.float32), inv.astype(np.float32)


def build_model(recipe: Recipe, mean: np.ndarray, inv_std: np.ndarray, n_classes: int) -> Classifier:
    layers: list[nn.Module] = []
    width = int(mean.shape[0])
    for hidden in recipe.model.hidden:
        layers += [nn.Linear(width, hidden), nn.ReLU()]
        if recipe.model.dropout:
            layers.append(nn.Dropout(recipe.model.dropout))
        width = hidden
    layers.append(nn.Linear(width, n_classes))
    return Classifier(Standardize(mean, inv_std), nn.Sequential(*layers))


@contextlib.contextmanager
def deterministic(seed: int) -> Iterator[torch.Generator]:
    threads = torch.get_num_threads()
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.set_num_threads(1)
        torch.use_deterministic_algorithms(True)
        try:
            yield torch.Generator().manual_seed(seed)
        finally:
            torch.use_deterministic_algorithms(was_deterministic)
            torch.set_num_threads(threads)


def predict(model: nn.Module, x: np.ndarray) -> np.ndarray:
    """Logits of ``model`` on raw features (eval mode, no grad)."""
    model.eval()
    with torch.no_grad():
        return model(torch.as_tensor(x, dtype=torch.float32)).numpy()


def _accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    return float((predict(model, x).argmax(axis=1) == y).mean())


def train_model(
    recipe: Recipe, x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray,
    n_classes: int, on_epoch: Callable[[EpochMetrics], None] | None = None,
) -> TrainedModel:
    import time

    cfg = recipe.training
    mean, inv_std = standardization(x_train, recipe.preprocessing.min_std, recipe.preprocessing.standardize)
    with deterministic(cfg.seed) as gen:
        model = build_model(recipe, mean, inv_std, n_classes)
        params = model.parameters()
        opt: torch.optim.Optimizer = (
            torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay) if cfg.optimizer == "adam"
            else torch.optim.SGD(params, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=0.9)
        )
        loss_fn = nn.CrossEntropyLoss()
        xt = torch.as_tensor(x_train, dtype=torch.float32)
        yt = torch.as_tensor(y_train, dtype=torch.int64)
        history = []
        for epoch in range(1, cfg.epochs + 1):
            start = time.perf_counter()
            model.train()
            order = torch.randperm(len(xt), generator=gen)
            total = 0.0
            for i in range(0, len(xt), cfg.batch_size):
                idx = order[i : i + cfg.batch_size]
                opt.zero_grad()
                loss = loss_fn(model(xt[idx]), yt[idx])
                loss.backward()
                opt.step()
                total += loss.detach().item() * len(idx)
            metrics = EpochMetrics(
                epoch, total / len(xt), _accuracy(model, x_train, y_train), _accuracy(model, x_test, y_test),
                time.perf_counter() - start,
            )
            history.append(metrics)
            if on_epoch is not None:
                on_epoch(metrics)
    model.eval()
    return TrainedModel(model, history, int(mean.shape[0]), n_classes)


def weights_hash(model: nn.Module) -> str:
    """sha256 over every parameter and buffer (name, dtype, shape, bytes) in state-dict order."""
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        arr = tensor.detach().cpu().contiguous().numpy()
        h.update(f"{name}|{arr.dtype.str}|{arr.shape}".encode())
        h.update(arr.tobytes())
    return h.hexdigest()


def export_onnx(model: Classifier, path: Path, opset: int, metadata: dict[str, str]) -> Path:
    """Raw features in (``input``: float32 [N, F]), softmax probabilities out (``probs``: [N, C]).

    Uses the TorchScript exporter (``dynamo=False``): the torch.export-based one needs
    onnxscript, which the train extra does not install.
    """
    import onnx

    wrapped = _Exported(model).eval()
    example = torch.zeros(1, model.prep.mean.shape[0], dtype=torch.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # "legacy TorchScript-based ONNX export"
        torch.onnx.export(
            wrapped, (example,), str(path), dynamo=False, opset_version=opset,
            input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "N"}, OUTPUT_NAME: {0: "N"}},
        )
    proto = onnx.load_model(str(path))
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save_model(proto, str(path))
    return path
