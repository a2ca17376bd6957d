"""Health checks of a candidate model before it may serve, and the application contract."""

from __future__ import annotations

import json
import time
from typing import Any

import numpy as np

from .._models import LoadedModel
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
            if got.dtype != spec.dtype or len(got.shape) != len(spec.shape) or any(
                a is not None and b is not None and a != b for a, b in zip(got.shape, spec.shape, strict=True)
            ):
                raise UpdateRejected(
                    "contract",
                    f"{kind} {spec.name!r} changed from {spec.dtype.name}{list(spec.shape)} "
                    f"to {got.dtype.name}{list(got.shape)}",
                )


def _samples(model: LoadedModel) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None, float]:
    """Sample inputs (and expected outputs) from the model's metadata, else generated ones."""
    raw = model.runtime.metadata.get(SAMPLES_KEY)
    if raw:
        try:
            doc = json.loads(raw)
            return doc["inputs"], doc.get("outputs"), float(doc.get("atol", 1e-3))
        except (ValueError, KeyError, TypeError) as exc:
            raise UpdateRejected("bad_metadata", f"{SAMPLES_KEY} metadata is malformed: {exc}") from exc
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
    mean latency within budget. Raises UpdateRejected("unhealthy", ...) on failure."""
    inputs, expected, atol = _samples(model)
    runtime = model.runtime
    latencies = []
    for i, raw in enumerate(inputs):
        try:
            feeds = runtime.prepare(raw)
            t0 = time.perf_counter()
            outputs = runtime.run(feeds)
            latencies.append((time.perf_counter() - t0) * 1000)
        except Exception as exc:  # any engine failure on a sample is a failed check
            raise UpdateRejected("unhealthy", f"sample {i} failed: {exc}") from exc
        for spec in runtime.outputs:
            value = outputs.get(spec.name)
            if value is None:
                raise UpdateRejected("unhealthy", f"sample {i}: output {spec.name!r} missing")
            if isinstance(value, np.ndarray) and value.dtype.kind in "fc":
                if not np.isfinite(value).all():
                    raise UpdateRejected("unhealthy", f"sample {i}: output {spec.name!r} has NaN or inf")
                if len(value.shape) != len(spec.shape) or any(
                    d is not None and d != v for d, v in zip(spec.shape, value.shape, strict=True)
                ):
                    raise UpdateRejected("unhealthy", f"sample {i}: output {spec.name!r} has shape {list(value.shape)}")
        if expected is not None:
            for name, want in expected[i].items():
                got = np.asarray(outputs[name], dtype=np.float64)
                if got.shape != np.asarray(want).shape or not np.allclose(got, want, atol=atol, rtol=0):
                    raise UpdateRejected("unhealthy", f"sample {i}: output {name!r} disagrees with the expected values")
    mean_ms = float(np.mean(latencies)) if latencies else 0.0
    if latency_budget_ms is not None and mean_ms > latency_budget_ms:
        raise UpdateRejected("unhealthy", f"mean latency {mean_ms:.3f} ms exceeds the budget of {latency_budget_ms} ms")
    return {"samples": len(inputs), "mean_latency_ms": round(mean_ms, 4), "expected_checked": expected is not None}
