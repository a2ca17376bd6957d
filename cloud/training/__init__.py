"""Training: recipes -> PyTorch -> ONNX float and int8 (gated) -> registry, with lineage and tracking.

    from cloud.training import load_recipe, train, RunStore
    result = train(load_recipe("configs/recipes/digits-mlp.yaml"), store=store, registry=registry,
                   workdir=artifact_dir / "training", progress=print)
    RunStore(store).list()                       # every run, newest last
    compare_runs(runs.get(a), runs.get(b))       # recipe keys that differ, metrics with deltas

Needs the ``train`` extra (torch, scikit-learn); :mod:`._torch` is imported only when a
run starts, so recipes, snapshots and runs can be read without torch.

In the coordinator, :class:`TrainingService` runs recipes on a background thread (one
at a time) and :class:`ContinuousTraining` retrains on drift, on a schedule or on new
labels (see :mod:`._service` and docs/training.md).

Errors: :class:`InvalidRecipe` (a ConfigError naming the key), :class:`TrainingError`
(the run is recorded as failed), :class:`TrainingBusy` (a Conflict: a run is in
progress), :class:`TrainingUnavailable` (no torch here), and the coordinator's
InvalidInput / NotFound.
"""

from ._data import Snapshot, build_snapshot, load_snapshot, save_snapshot, snapshot_hash
from ._pipeline import TrainingError, code_version, split, train
from ._quantize import Evaluation, GateDecision, gate
from ._recipe import DEFAULT_MARGIN, InvalidRecipe, Recipe, load_recipe
from ._runs import RunRecord, RunStore, compare_runs
from ._service import ContinuousTraining, TrainingBusy, TrainingService, TrainingUnavailable

__all__ = [
    "DEFAULT_MARGIN",
    "ContinuousTraining",
    "Evaluation",
    "GateDecision",
    "InvalidRecipe",
    "Recipe",
    "RunRecord",
    "RunStore",
    "Snapshot",
    "TrainingBusy",
    "TrainingError",
    "TrainingService",
    "TrainingUnavailable",
    "build_snapshot",
    "code_version",
    "compare_runs",
    "gate",
    "load_recipe",
    "load_snapshot",
    "save_snapshot",
    "snapshot_hash",
    "split",
    "train",
]
