"""One training run, end to end: snapshot -> train -> export -> quantize -> gate -> register.

    result = train(load_recipe("configs/recipes/digits-mlp.yaml"), store=store, registry=registry,
                   workdir=artifact_dir / "training", progress=print)

Every step is recorded in the run (see :mod:`._runs`) when a store is given; the float
artifact is always registered, an int8 artifact only when the gate accepts it (the
refusal and its figures stay in the run's result). Lineage on every registered version:
dataset hash (and the snapshot's rows, time range, devices), the recipe and its sha256,
the code version, the parent model, metrics, and latency and size per runtime.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .._exceptions import CloudError
from ..drift import build_reference
from ..store import Store
from . import _tflite
from ._data import Snapshot, build_snapshot, save_snapshot
from ._quantize import (
    Evaluation,
    _session,
    evaluate,
    gate,
    interleaved_latency,
    probabilities,
    quantize,
)
from ._recipe import Recipe
from ._runs import RunStore

__all__ = ["TrainingError", "code_version", "split", "train"]

Progress = Callable[[str], None]
#: ONNX float probabilities must match torch's within this (float32 op-order noise).
ONNX_TOLERANCE = 1e-4
#: Held-out rows shipped in every exported ONNX file with the file's own outputs for them:
#: the device's health check runs them before it switches (edgeml.updates.encode_samples).
HEALTH_SAMPLES = 8


class TrainingError(CloudError):
    """A training run failed (the run is recorded as failed with this message)."""


def code_version() -> dict[str, Any]:
    """edgeml's version and, when the code runs from a git checkout, its commit."""
    import edgeml

    doc: dict[str, Any] = {"edgeml": edgeml.__version__, "git_commit": None, "git_dirty": None}
    repo = Path(__file__).resolve().parents[2]
    try:
        doc["git_commit"] = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip() or None
        doc["git_dirty"] = bool(subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo, capture_output=True, text=True,
            timeout=5, check=True,
        ).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return doc


def split(snapshot: Snapshot, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Train and test row indices: stratified when every class has two rows, seeded."""
    from sklearn.model_selection import train_test_split

    _, counts = np.unique(snapshot.y, return_counts=True)
    stratify = snapshot.y if counts.min() >= 2 else None
    train_idx, test_idx = train_test_split(
        np.arange(snapshot.rows), test_size=test_fraction, random_state=seed, stratify=stratify,
    )
    return np.sort(train_idx), np.sort(test_idx)


def tflite_status() -> dict[str, Any]:
    """``skipped`` and why when TFLite cannot be exported here, else ``available``."""
    reason = _tflite.unavailable()
    return {"status": "skipped", "reason": reason} if reason else {"status": "available"}


def _tflite_step(recipe: Recipe, trained: Any, run_dir: Path, x_tr: np.ndarray, x_te: np.ndarray, y_te: np.ndarray,
                 float_path: Path, say: Progress) -> dict[str, Any]:
    if not recipe.export.tflite:
        return {"status": "disabled", "reason": "export.tflite is false"}
    q = recipe.quantization
    rng = np.random.default_rng(recipe.training.seed)  # the same calibration rows as the ONNX int8
    calibration = x_tr[rng.permutation(len(x_tr))[: q.calibration_rows]]
    return _tflite.export_and_gate(trained.model, run_dir, calibration, x_te, y_te, onnx_float=float_path,
                                   margin=q.margin, min_speedup=q.min_speedup, repeats=q.latency_repeats,
                                   quantize=q.enabled, say=say)


def train(
    recipe: Recipe, *, workdir: str | os.PathLike[str], store: Store | None = None, registry: Any = None,
    version: str | None = None, parent: str | None = None, progress: Progress | None = None,
    run_id: str | None = None, lineage: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run ``recipe``; return the run's result document (also stored when ``store`` is given).

    ``run_id``: a run already started with :meth:`RunStore.start` (the REST API answers
    with its id before the run begins); ``lineage``: more keys for the registered
    versions' lineage (``trigger``: why continuous training started this run)."""
    from . import _torch

    say = progress or (lambda _msg: None)
    runs = RunStore(store) if store is not None else None
    code = code_version()
    if runs is not None and run_id is None:
        run_id = runs.start(recipe.name, recipe.as_json(), recipe.digest(), code)
    elif runs is not None:
        runs.set_code_version(run_id, code)
    elif run_id is None:
        run_id = f"run-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-local"
    workdir = Path(workdir)
    run_dir = workdir / "runs" / run_id
    try:
        snapshot = build_snapshot(recipe.data.sources, store)
        snap_path = save_snapshot(snapshot, workdir / "datasets")
        if runs is not None:
            runs.set_dataset(run_id, snapshot.hash, snapshot.summary(), str(snap_path))
        say(f"run {run_id}: {snapshot.rows} rows x {snapshot.x.shape[1]} features from "
            f"{', '.join(snapshot.sources)} ({snapshot.hash[:19]}…)")
        train_idx, test_idx = split(snapshot, recipe.data.test_fraction, recipe.training.seed)
        x_tr, y_tr = snapshot.x[train_idx], snapshot.y[train_idx]
        x_te, y_te = snapshot.x[test_idx], snapshot.y[test_idx]
        n_classes = int(snapshot.y.max()) + 1

        def on_epoch(m: _torch.EpochMetrics) -> None:
            if runs is not None:
                runs.add_epoch(run_id, m.as_json())
            say(f"epoch {m.epoch}/{recipe.training.epochs}  loss {m.loss:.4f}  train_acc {m.train_accuracy:.4f}  "
                f"test_acc {m.test_accuracy:.4f}  ({m.seconds * 1000:.0f} ms)")

        started = time.perf_counter()
        trained = _torch.train_model(recipe, x_tr, y_tr, x_te, y_te, n_classes, on_epoch)
        train_seconds = time.perf_counter() - started
        result = _export_and_gate(recipe, trained, run_dir, snapshot, x_tr, x_te, y_te, say)
        result.update({
            "run_id": run_id, "name": recipe.name, "recipe_sha256": recipe.digest(), "code_version": code,
            "dataset": snapshot.summary(), "split": {"train": len(train_idx), "test": len(test_idx)},
            "training_seconds": train_seconds, "epochs": [m.as_json() for m in trained.epochs],
            "weights_sha256": _torch.weights_hash(trained.model), "lineage": dict(lineage or {}),
        })
        result["registered"] = _register(recipe, registry, result, version, parent or recipe.parent) if registry else []
    except (CloudError, ValueError, OSError, RuntimeError) as exc:
        if runs is not None:
            runs.fail(run_id, f"{type(exc).__name__}: {exc}")
        if isinstance(exc, CloudError):
            raise
        raise TrainingError(f"training run {run_id} failed: {exc}") from exc
    if runs is not None:
        runs.finish(run_id, metrics=_run_metrics(result), artifacts=result["artifacts"],
                    result={k: v for k, v in result.items() if k != "epochs"})
    return result


def _export_and_gate(
    recipe: Recipe, trained: Any, run_dir: Path, snapshot: Snapshot, x_tr: np.ndarray, x_te: np.ndarray,
    y_te: np.ndarray, say: Progress,
) -> dict[str, Any]:
    from . import _torch

    meta = {"edgeml.name": recipe.name, "edgeml.recipe_sha256": recipe.digest(), "edgeml.dataset_hash": snapshot.hash}
    float_path = _torch.export_onnx(trained.model, run_dir / "model.onnx", recipe.export.opset, meta)
    torch_probs = _softmax(_torch.predict(trained.model, x_te))
    onnx_diff = float(np.abs(probabilities(float_path, x_te) - torch_probs).max())
    if onnx_diff > ONNX_TOLERANCE:
        raise TrainingError(f"the ONNX export disagrees with torch: max |dp| {onnx_diff:.2e} > {ONNX_TOLERANCE}")
    embed_samples(float_path, x_te[:HEALTH_SAMPLES])
    q = recipe.quantization
    float_eval = evaluate(float_path, x_te, y_te, method="float", repeats=q.latency_repeats)
    reference = build_reference(x_tr, probabilities(float_path, x_tr).argmax(axis=1), input_name=_torch.INPUT_NAME,
                                classes=int(snapshot.y.max()) + 1)
    result: dict[str, Any] = {
        "drift_reference": reference,
        "float": float_eval.as_json(), "onnx_max_abs_diff": onnx_diff, "int8": None, "int8_candidates": [],
        "tflite": _tflite_step(recipe, trained, run_dir, x_tr, x_te, y_te, float_path, say),
        "artifacts": {"onnx_float": str(float_path)},
    }
    result["artifacts"].update(result["tflite"].get("artifacts", {}))
    if not q.enabled:
        say(_float_line(float_eval, len(x_te)))
        return result
    rng = np.random.default_rng(recipe.training.seed)
    calibration = x_tr[rng.permutation(len(x_tr))[: q.calibration_rows]]
    candidates = []
    for method in q.methods:
        path = quantize(float_path, run_dir, method, calibration)
        # its own outputs (an int8 file differs from the float one), with room for int8 kernels
        # that round differently on another CPU
        embed_samples(path, x_te[:HEALTH_SAMPLES], atol=0.02)
        candidates.append(evaluate(path, x_te, y_te, method=method, repeats=q.latency_repeats))
    batch_us = interleaved_latency([float_path, *(c.path for c in candidates)], x_te, q.latency_repeats)
    float_eval = dataclasses.replace(float_eval, latency_us=batch_us[0])
    candidates = [dataclasses.replace(c, latency_us=us) for c, us in zip(candidates, batch_us[1:], strict=True)]
    result["float"] = float_eval.as_json()
    say(_float_line(float_eval, len(x_te)))
    best: tuple[Evaluation, Any] | None = None
    for cand in candidates:
        decision = gate(float_eval, cand, margin=q.margin, min_speedup=q.min_speedup)
        result["int8_candidates"].append({**cand.as_json(), "path": str(cand.path), "gate": decision.as_json()})
        verdict = "accepted" if decision.accepted else "refused: " + "; ".join(decision.reasons)
        say(f"int8 {cand.method}: accuracy {cand.accuracy:.4f} (drop {decision.accuracy_drop * 100:+.2f} pt), "
            f"x{decision.speedup:.2f} faster, {decision.size_ratio:.0%} of the size -> {verdict}")
        if decision.accepted and (best is None or decision.speedup > best[1].speedup):
            best = (cand, decision)
    if best is not None:
        result["int8"] = {**best[0].as_json(), "path": str(best[0].path), "gate": best[1].as_json()}
        result["artifacts"]["onnx_int8"] = str(best[0].path)
    return result


def embed_samples(path: Path, rows: np.ndarray, atol: float = 1e-3) -> None:
    """Store ``rows`` (one sample each, batch of 1, as the device runs them) and what this
    very file answers for them in its ``edgeml.samples`` metadata, replacing any there."""
    import onnx

    from edgeml.updates import SAMPLES_KEY, encode_samples

    from ._torch import INPUT_NAME, OUTPUT_NAME

    inputs = [{INPUT_NAME: np.ascontiguousarray(row[None], np.float32)} for row in rows]
    session = _session(path)
    expected = [{OUTPUT_NAME: session.run(None, x)[0]} for x in inputs]
    model = onnx.load(str(path))
    kept = [prop for prop in model.metadata_props if prop.key != SAMPLES_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    model.metadata_props.add(key=SAMPLES_KEY, value=encode_samples(inputs, expected, atol=atol))
    onnx.save(model, str(path))


def _float_line(e: Evaluation, rows: int) -> str:
    return f"float: accuracy {e.accuracy:.4f}, {e.latency_us:.0f} us/batch of {rows}, {e.size} bytes"


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _run_metrics(result: dict[str, Any]) -> dict[str, Any]:
    last = result["epochs"][-1]
    doc = {"loss": last["loss"], "train_accuracy": last["train_accuracy"], "float": result["float"],
           "training_seconds": result["training_seconds"]}
    doc["int8"] = result["int8"] and {k: v for k, v in result["int8"].items() if k != "path"}
    return doc


def _next_version(registry: Any, name: str) -> str:
    from .._exceptions import NotFound

    try:
        versions = [m.version for m in registry.list(name)]
    except NotFound:
        versions = []
    numbers = [int(v) for v in versions if v.isdigit()]
    return str(max(numbers, default=0) + 1)


def _register(recipe: Recipe, registry: Any, result: dict[str, Any], version: str | None, parent: str | None) -> list[str]:
    version = version or _next_version(registry, recipe.name)
    lineage = {
        "run_id": result["run_id"], "recipe": recipe.as_json(), "recipe_sha256": result["recipe_sha256"],
        "code_version": result["code_version"], "dataset": result["dataset"], "weights_sha256": result["weights_sha256"],
        "drift_reference": result["drift_reference"], **result.get("lineage", {}),
    }
    flt = result["float"]
    float_metrics = {"accuracy": flt["accuracy"], "loss": result["epochs"][-1]["loss"],
                     "latency_us": {"onnxruntime": flt["latency_us_batch"]}, "latency_us_row": {"onnxruntime": flt["latency_us_row"]},
                     "size_bytes": {"onnxruntime": flt["size_bytes"]}, "eval_rows": result["split"]["test"]}
    dataset_hash = result["dataset"]["hash"]
    model = registry.register(result["artifacts"]["onnx_float"], name=recipe.name, version=version, metrics=float_metrics,
                              params=lineage, parent=parent, dataset_hash=dataset_hash)
    refs = [model.ref]
    if result["int8"] is not None:
        q = result["int8"]
        metrics = {**float_metrics, "accuracy": q["accuracy"], "latency_us": {"onnxruntime": q["latency_us_batch"]},
                   "latency_us_row": {"onnxruntime": q["latency_us_row"]}, "size_bytes": {"onnxruntime": q["size_bytes"]},
                   "gate": q["gate"], "float_accuracy": flt["accuracy"]}
        int8 = registry.register(result["artifacts"]["onnx_int8"], name=recipe.name, version=f"{version}+int8",
                                 metrics=metrics, params={**lineage, "quantization": q["method"]}, parent=model.ref,
                                 dataset_hash=dataset_hash)
        refs.append(int8.ref)
    refs += _tflite.register(registry, recipe.name, version, result["tflite"], lineage=lineage,
                             base_metrics={"loss": float_metrics["loss"], "eval_rows": float_metrics["eval_rows"]},
                             parent=model.ref, dataset_hash=dataset_hash)
    return refs
