"""Health checks of a candidate model before it may serve, and the application contract."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .._exceptions import InputError
from .._models import LoadedModel
from ..runtime import TensorSpec
from ._download import UpdateRejected

SAMPLES_KEY = "edgeml.samples"


def check_contract(candidate: LoadedModel, active: LoadedModel | None) -> None:
    """The candidate must keep the active model's input/output names, dtypes and shapes."""
    if active is None:
        return
    for kind, new, old in (
        ("input", candidate.runtime.inputs, active.runtime.inputs),
        ("output", candidate.runtime.outputs, active.runtime.outputs),
    ):
        have = {s.name: s for s in new}
        for spec in old:
            got = have.get(spec.name)
            if got is None:
                raise UpdateRejected("contract", f"the new model has no {kind} {spec.name!r}")
            ranks_known = got.rank_known and spec.rank_known  # (an undeclared rank is not held to one)
            if got.dtype != spec.dtype or ranks_known and (len(got.shape) != len(spec.shape) or any(
                a is not None and b is not None and a != b for a, b in zip(got.shape, spec.shape, strict=True)
            )):
                raise UpdateRejected(
                    "contract",
                    f"{kind} {spec.name!r} changed from {spec.dtype.name}{list(spec.shape)} "
                    f"to {got.dtype.name}{list(got.shape)}",
                )


def encode_samples(
    inputs: Sequence[Mapping[str, Any]],
    expected: Sequence[Mapping[str, Any]] | None = None,
    *,
    atol: float | None = None,
) -> str:
    """The ``edgeml.samples`` metadata value for a model: sample inputs (one mapping of
    input name -> array per sample) and, optionally, the outputs the model must give for
    them (output name -> array; compared with ``atol``, default 1e-3). The exporter stores
    it in the model file (ONNX ``metadata_props``); :func:`health_check` runs it."""
    if not inputs:
        raise ValueError("at least one sample input is needed")
    if expected is not None and len(expected) != len(inputs):
        raise ValueError(f"{len(expected)} expected outputs for {len(inputs)} sample inputs")

    def plain(sample: Mapping[str, Any]) -> dict[str, Any]:
        return {name: np.asarray(value).tolist() for name, value in sample.items()}

    doc: dict[str, Any] = {"inputs": [plain(x) for x in inputs]}
    if expected is not None:
        doc["outputs"] = [plain(y) for y in expected]
    if atol is not None:
        doc["atol"] = float(atol)
    return json.dumps(doc, separators=(",", ":"))


def _bad(message: str) -> UpdateRejected:
    return UpdateRejected("bad_metadata", f"{SAMPLES_KEY} metadata is malformed: {message}")


def _decode_samples(model: LoadedModel, raw: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None, float]:
    try:
        doc = json.loads(raw)
    except ValueError as exc:
        raise _bad(f"not JSON ({exc})") from exc
    if not isinstance(doc, dict):
        raise _bad("not a JSON object")
    inputs, expected, atol = doc.get("inputs"), doc.get("outputs"), doc.get("atol", 1e-3)
    if not isinstance(inputs, list) or not inputs or not all(isinstance(x, dict) for x in inputs):
        raise _bad('"inputs" must be a non-empty list of objects (input name -> array)')
    if expected is not None and (not isinstance(expected, list) or len(expected) != len(inputs)
                                 or not all(isinstance(y, dict) for y in expected)):
        raise _bad('"outputs" must be a list of objects (output name -> array), one per input')
    if isinstance(atol, bool) or not isinstance(atol, int | float) or not 0 <= atol < float("inf"):
        raise _bad('"atol" must be a non-negative number')
    names = {spec.name for spec in model.runtime.outputs}
    for i, sample in enumerate(expected or []):
        for name, value in sample.items():
            if name not in names:
                raise _bad(f"sample {i} expects output {name!r}, the model has {sorted(names)}")
            try:
                sample[name] = np.asarray(value, dtype=np.float64)
            except (ValueError, TypeError) as exc:
                raise _bad(f"sample {i}: expected {name!r} is not a numeric array ({exc})") from exc
    return inputs, expected, float(atol)


def _samples(model: LoadedModel) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None, float]:
    """Sample inputs (and expected outputs) from the model's metadata, else generated ones."""
    raw = model.runtime.metadata.get(SAMPLES_KEY)
    if raw:
        return _decode_samples(model, raw)
    rng = np.random.default_rng(0)
    inputs = []
    for _ in range(3):
        feeds = {}
        for spec in model.runtime.inputs:
            shape = [d if d is not None else 1 for d in spec.shape]
            if spec.dtype.kind == "f":
                feeds[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
            else:
                feeds[spec.name] = np.zeros(shape, dtype=spec.dtype)
        inputs.append(feeds)
    return inputs, None, 0.0


def health_check(model: LoadedModel, *, latency_budget_ms: float | None) -> dict[str, Any]:
    """Run the sample inputs: output shapes, no NaN/inf, expected outputs where given,
    mean latency within budget. Raises UpdateRejected("unhealthy", ...) on failure, and
    UpdateRejected("bad_metadata", ...) when the model's own samples are malformed."""
    inputs, expected, atol = _samples(model)
    runtime = model.runtime
    latencies = []
    for i, raw in enumerate(inputs):
        try:
            feeds = runtime.prepare(raw)
        except InputError as exc:  # the samples do not fit the model they came with
            raise _bad(f"sample {i}: {exc}") from exc
        try:
            t0 = time.perf_counter()
            outputs = runtime.run(feeds)
            latencies.append((time.perf_counter() - t0) * 1000)
        except Exception as exc:  # any engine failure on a sample is a failed check
            raise UpdateRejected("unhealthy", f"sample {i} failed: {exc}") from exc
        for spec in runtime.outputs:
            value = outputs.get(spec.name)
            if value is None:
                raise UpdateRejected("unhealthy", f"sample {i}: output {spec.name!r} missing")
            _check_output(i, spec, value)
        if expected is not None:
            for name, want in expected[i].items():
                got = np.asarray(outputs[name], dtype=np.float64)
                if got.shape != want.shape or not np.allclose(got, want, atol=atol, rtol=0):
                    raise UpdateRejected("unhealthy", f"sample {i}: output {name!r} disagrees with the expected values")
    mean_ms = float(np.mean(latencies)) if latencies else 0.0
    if latency_budget_ms is not None and mean_ms > latency_budget_ms:
        raise UpdateRejected("unhealthy", f"mean latency {mean_ms:.3f} ms exceeds the budget of {latency_budget_ms} ms")
    return {"samples": len(inputs), "mean_latency_ms": round(mean_ms, 4), "expected_checked": expected is not None}


def _check_output(i: int, spec: TensorSpec, value: Any) -> None:
    """An output has the shape its model declares (any dtype) and, if floating, no NaN/inf.
    Outputs the engine cannot describe as a tensor (``object``: ZipMap maps) are not checked."""
    if not isinstance(value, np.ndarray) or spec.dtype.kind == "O":
        return
    if value.dtype.kind in "fc" and not np.isfinite(value).all():
        raise UpdateRejected("unhealthy", f"sample {i}: output {spec.name!r} has NaN or inf")
    if not spec.rank_known:  # the model does not say: nothing to hold the output to
        return
    if len(value.shape) != len(spec.shape) or any(
        d is not None and d != v for d, v in zip(spec.shape, value.shape, strict=True)
    ):
        raise UpdateRejected(
            "unhealthy",
            f"sample {i}: output {spec.name!r} has shape {list(value.shape)}, the model declares "
            f"{['N' if d is None else d for d in spec.shape]}",
        )
