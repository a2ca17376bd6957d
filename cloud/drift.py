"""Drift: PSI of the fleet's inputs and predictions against a model's training reference.

    ref = build_reference(x_train, top1_train)          # at training time, kept in the lineage
    monitor = DriftMonitor(store, registry, threshold=0.2)
    monitor.measure(fleet="default")                    # one stored measurement per model/version/cohort
    monitor.latest()                                    # the newest of each, for GET /v1/drift

The reference (``params["drift_reference"]`` of a registered version) holds, per input
feature, the inner cut points of ``REFERENCE_BINS`` quantile bins of the training rows
and the count of training rows in each bin, and the count of each predicted class (the
model's top-1 on its training rows). A measurement looks at the window
``[now - window_s, now]`` of telemetry: the inputs of ``sample`` records (binned with the
reference's cut points) and the ``top1`` of ``prediction`` records' summaries, grouped by
model, version and cohort (the value of the device tag ``cohort_tag``; every device is
also in cohort ``*``). Figures:

* ``input_psi``: mean over features of each feature's PSI (``input_psi_max``: the largest);
* ``prediction_psi``: PSI of the predicted-class distribution;
* ``psi``: the larger of the two; ``status`` is ``drift`` above ``threshold``, ``ok`` below,
  ``insufficient_data`` with fewer than ``min_samples`` sample rows and ``min_predictions``
  predictions, ``no_reference`` for a version registered without a reference (older
  models, uploads), ``unknown_model`` for one the registry does not have.

PSI = sum over bins of (a - e) * ln(a / e), with the shares ``a`` (measured) and ``e``
(reference) floored at ``PSI_FLOOR`` so an empty bin counts as rare, not impossible.
Measurements are stored in ``drift_measurements`` (schema migration 6).
"""

from __future__ import annotations

import math
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import orjson

from ._exceptions import InvalidInput, NotFound
from .store import Store

__all__ = [
    "DEFAULT_THRESHOLD",
    "PSI_FLOOR",
    "REFERENCE_BINS",
    "DriftMonitor",
    "build_reference",
    "input_psi",
    "prediction_psi",
    "psi",
]

#: PSI above this is drift (the usual rule of thumb: < 0.1 stable, 0.1-0.2 watch, > 0.2 shifted).
DEFAULT_THRESHOLD = 0.2
#: Smallest share given to a bin (an empty bin would make PSI infinite).
PSI_FLOOR = 1e-4
REFERENCE_BINS = 10
ALL_COHORT = "*"
_ROW_LIMIT = 500_000


# ---------------------------------------------------------------------- PSI
def psi(expected: Sequence[float] | np.ndarray, actual: Sequence[float] | np.ndarray, floor: float = PSI_FLOOR) -> float:
    """Population stability index of ``actual`` against ``expected`` (counts per bin, same bins)."""
    e = np.asarray(expected, dtype=float)
    a = np.asarray(actual, dtype=float)
    if e.shape != a.shape or e.ndim != 1:
        raise ValueError(f"PSI needs two count vectors over the same bins, got {e.shape} and {a.shape}")
    if e.sum() <= 0 or a.sum() <= 0:
        raise ValueError("PSI needs at least one observation on each side")
    e = np.maximum(e / e.sum(), floor)
    a = np.maximum(a / a.sum(), floor)
    return float(((a - e) * np.log(a / e)).sum())


def build_reference(x: np.ndarray, top1: np.ndarray, *, input_name: str = "input", bins: int = REFERENCE_BINS,
                    classes: int | None = None) -> dict[str, Any]:
    """The training reference of a model: quantile bins of each input feature, class counts."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError("the reference needs a non-empty [rows, features] array")
    quantiles = np.linspace(0.0, 1.0, bins + 1)[1:-1]
    edges, counts = [], []
    for j in range(x.shape[1]):
        inner = np.unique(np.quantile(x[:, j], quantiles))
        edges.append([float(v) for v in inner])
        counts.append(_bin_counts(x[:, j], inner).tolist())
    n_classes = classes if classes is not None else int(np.max(top1)) + 1
    predicted = np.bincount(np.asarray(top1, dtype=np.int64), minlength=n_classes)
    return {
        "v": 1,
        "inputs": {"name": input_name, "features": int(x.shape[1]), "rows": int(x.shape[0]), "edges": edges,
                   "counts": counts},
        "predictions": {"rows": int(len(top1)), "counts": {str(c): int(n) for c, n in enumerate(predicted)}},
    }


def _bin_counts(values: np.ndarray, inner: np.ndarray | Sequence[float]) -> np.ndarray:
    idx = np.searchsorted(np.asarray(inner, dtype=np.float64), values, side="right")
    return np.bincount(idx, minlength=len(inner) + 1)


def input_psi(reference: Mapping[str, Any], x: np.ndarray) -> list[float]:
    """PSI of each feature of ``x`` [rows, features] against the reference's bins."""
    ref = reference["inputs"]
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] != ref["features"]:
        raise InvalidInput(f"inputs have shape {x.shape}; the reference has {ref['features']} features")
    return [psi(counts, _bin_counts(x[:, j], edges)) for j, (edges, counts) in enumerate(zip(ref["edges"], ref["counts"], strict=True))]


def prediction_psi(reference: Mapping[str, Any], top1: Iterable[int]) -> float:
    """PSI of the predicted classes against the reference's (a class never predicted there counts too)."""
    expected = {int(c): int(n) for c, n in reference["predictions"]["counts"].items()}
    actual = Counter(int(c) for c in top1)
    classes = sorted(set(expected) | set(actual))
    return psi([expected.get(c, 0) for c in classes], [actual.get(c, 0) for c in classes])


# ---------------------------------------------------------------------- measurements
def _loads(value: Any) -> Any:
    return orjson.loads(value) if isinstance(value, str | bytes) else value


def _rows_of(inputs: Any, name: str, features: int) -> np.ndarray | None:
    """The input rows of one sample record, [rows, features]; None when it has no usable input."""
    if not isinstance(inputs, dict) or not inputs:
        return None
    value = inputs.get(name, next(iter(inputs.values())) if len(inputs) == 1 else None)
    if value is None:
        return None
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        return None
    if arr.size == 0 or arr.size % features:
        return None
    arr = arr.reshape(-1, features)
    return arr if np.isfinite(arr).all() else None


class DriftMonitor:
    """Measures and stores drift per model, version and cohort; reads the newest back."""

    def __init__(self, store: Store, registry: Any, *, threshold: float = DEFAULT_THRESHOLD, window_s: float = 3600.0,
                 min_samples: int = 50, min_predictions: int = 100, cohort_tag: str | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.registry = registry
        self.threshold = threshold
        self.window_s = window_s
        self.min_samples = min_samples
        self.min_predictions = min_predictions
        self.cohort_tag = cohort_tag
        self.clock = clock

    def measure(self, *, fleet: str | None = None, models: Iterable[str] | None = None,
                since: float | None = None, now: float | None = None) -> list[dict[str, Any]]:
        """Measure every model/version/cohort seen in the window; store and return the measurements."""
        now = self.clock() if now is None else now
        start = now - self.window_s if since is None else max(since, now - self.window_s)
        wanted = set(models) if models is not None else None
        groups = self._collect(fleet, wanted, start, now)
        out = []
        for (fl, model, version, cohort), data in sorted(groups.items()):
            doc = self._measure_one(model, version, data)
            doc.update({"id": uuid.uuid4().hex[:12], "ts": now, "fleet": fl, "model": model, "version": version,
                        "cohort": cohort, "window": [start, now], "threshold": self.threshold,
                        "devices": sorted(data["devices"])})
            out.append(doc)
        self._save(out)
        return out

    def _collect(self, fleet: str | None, models: set[str] | None, start: float, end: float) -> dict[tuple[str, str, str, str], dict[str, Any]]:
        sql = ("SELECT fleet, device_id, kind, body FROM telemetry WHERE kind IN ('prediction', 'sample') "
               "AND ts >= ? AND ts <= ?")
        params: list[Any] = [start, end]
        if fleet is not None:
            sql += " AND fleet = ?"
            params.append(fleet)
        with self.store.transaction() as tx:
            rows = tx.execute(sql + " ORDER BY ts LIMIT ?", (*params, _ROW_LIMIT)).fetchall()
            cohorts = self._cohorts(tx, fleet) if self.cohort_tag else {}
        groups: dict[tuple[str, str, str, str], dict[str, Any]] = defaultdict(
            lambda: {"top1": [], "inputs": [], "devices": set()})
        for fl, device, kind, raw in rows:
            body = _loads(raw)
            model, version = body.get("model"), body.get("version")
            if not isinstance(model, str) or not isinstance(version, str) or (models is not None and model not in models):
                continue
            keys = [ALL_COHORT]
            if (fl, device) in cohorts:
                keys.append(cohorts[(fl, device)])
            for cohort in keys:
                group = groups[(fl, model, version, cohort)]
                group["devices"].add(device)
                if kind == "prediction":
                    top1 = (body.get("summary") or {}).get("top1")
                    if isinstance(top1, int) and not isinstance(top1, bool):
                        group["top1"].append(top1)
                else:
                    group["inputs"].append(body.get("inputs"))
        return groups

    def _cohorts(self, tx: Any, fleet: str | None) -> dict[tuple[str, str], str]:
        out = {}
        for d in tx.list_devices(fleet):
            value = (d.tags or {}).get(self.cohort_tag)
            if value is not None and str(value) != ALL_COHORT:
                out[(d.fleet, d.device_id)] = f"{self.cohort_tag}={value}"
        return out

    def _reference(self, model: str, version: str) -> tuple[str, dict[str, Any] | None]:
        try:
            record = self.registry.get(model, version)
        except NotFound:
            return "unknown_model", None
        ref = record.params.get("drift_reference")
        return ("ok", ref) if isinstance(ref, dict) and ref.get("v") == 1 else ("no_reference", None)

    def _measure_one(self, model: str, version: str, data: dict[str, Any]) -> dict[str, Any]:
        doc: dict[str, Any] = {"predictions": len(data["top1"]), "samples": 0, "input_psi": None,
                               "input_psi_max": None, "feature_psi": None, "prediction_psi": None, "psi": None}
        found, ref = self._reference(model, version)
        if ref is None:
            doc.update(status=found, reason=f"{model}@{version} has no training reference"
                       if found == "no_reference" else f"{model}@{version} is not registered")
            return doc
        name, features = ref["inputs"]["name"], ref["inputs"]["features"]
        parts = [r for r in (_rows_of(i, name, features) for i in data["inputs"]) if r is not None]
        x = np.concatenate(parts) if parts else np.zeros((0, features))
        doc["samples"] = int(x.shape[0])
        figures = []
        if x.shape[0] >= self.min_samples:
            per_feature = input_psi(ref, x)
            doc.update(input_psi=float(np.mean(per_feature)), input_psi_max=float(np.max(per_feature)),
                       feature_psi=[round(v, 6) for v in per_feature])
            figures.append(doc["input_psi"])
        if len(data["top1"]) >= self.min_predictions:
            doc["prediction_psi"] = prediction_psi(ref, data["top1"])
            figures.append(doc["prediction_psi"])
        if not figures:
            doc.update(status="insufficient_data",
                       reason=f"{doc['samples']} sample rows (need {self.min_samples}) and "
                              f"{doc['predictions']} predictions (need {self.min_predictions}) in the window")
            return doc
        doc["psi"] = max(figures)
        drifted = doc["psi"] > self.threshold
        doc["status"] = "drift" if drifted else "ok"
        doc["reason"] = (f"PSI {doc['psi']:.3f} {'>' if drifted else '<='} threshold {self.threshold:g} "
                         f"(inputs {_fmt(doc['input_psi'])}, predictions {_fmt(doc['prediction_psi'])})")
        return doc

    def _save(self, docs: Sequence[dict[str, Any]]) -> None:
        if not docs:
            return
        with self.store.transaction(write=True) as tx:
            for d in docs:
                tx.execute(
                    "INSERT INTO drift_measurements (id, ts, fleet, model, version, cohort, status, psi, doc) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (d["id"], d["ts"], d["fleet"], d["model"], d["version"], d["cohort"], d["status"], d["psi"],
                     orjson.dumps(d).decode()),
                )

    def latest(self, *, fleet: str | None = None, model: str | None = None) -> list[dict[str, Any]]:
        """The newest measurement of each (fleet, model, version, cohort)."""
        sql, params = "SELECT doc FROM drift_measurements WHERE 1 = 1", []
        for column, value in (("fleet", fleet), ("model", model)):
            if value is not None:
                sql += f" AND {column} = ?"
                params.append(value)
        with self.store.transaction() as tx:
            rows = tx.execute(sql + " ORDER BY ts DESC, id LIMIT ?", (*params, 20_000)).fetchall()
        seen: dict[tuple[str, str, str, str], dict[str, Any]] = {}
        for (raw,) in rows:
            d = _loads(raw)
            seen.setdefault((d["fleet"], d["model"], d["version"], d["cohort"]), d)
        return [seen[k] for k in sorted(seen)]

    def history(self, model: str, version: str | None = None, *, limit: int = 100) -> list[dict[str, Any]]:
        """Measurements of a model (one version, or all), newest first."""
        sql, params = "SELECT doc FROM drift_measurements WHERE model = ?", [model]
        if version is not None:
            sql += " AND version = ?"
            params.append(version)
        with self.store.transaction() as tx:
            rows = tx.execute(sql + " ORDER BY ts DESC, id LIMIT ?", (*params, limit)).fetchall()
        return [_loads(r[0]) for r in rows]


def _fmt(value: float | None) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.3f}"
