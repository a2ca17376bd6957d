"""Training data: sources -> one snapshot, content-hashed and re-materializable.

A :class:`Snapshot` is the exact arrays a run learned from: features ``x`` (float32),
labels ``y`` (int64), and per row its capture time ``ts`` (NaN for a packaged dataset)
and ``device`` ("" likewise). Its hash is ``sha256:`` over the arrays' dtypes, shapes and
bytes, so the same rows in the same order always hash the same. :func:`save_snapshot`
writes ``<hex>.npz`` under the datasets directory; :func:`load_snapshot` reads it back
and checks the hash, so a model's ``dataset_hash`` leads to the exact training set.

Fleet rows come from the store: a feedback record with ``inputs`` is a labeled sample;
a feedback record with a ``prediction_id`` takes the inputs of the sample record of
that prediction (none sampled: no row); one with neither takes the inputs of the newest
sample record of the same device and model at most ``join_window_s`` older.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .._exceptions import InvalidInput, NotFound
from ..store import Store, TelemetryRow
from ._recipe import FleetSource, SensorSource, SklearnSource

__all__ = ["Snapshot", "build_snapshot", "load_snapshot", "save_snapshot", "snapshot_hash"]

_TELEMETRY_LIMIT = 10_000_000


@dataclass(frozen=True)
class Snapshot:
    x: np.ndarray
    y: np.ndarray
    ts: np.ndarray
    device: np.ndarray
    sources: tuple[str, ...] = ()
    hash: str = field(default="")

    @property
    def rows(self) -> int:
        return int(self.x.shape[0])

    def summary(self) -> dict[str, Any]:
        """Hash, row count, time range, devices: the lineage recorded with a model."""
        finite = self.ts[np.isfinite(self.ts)]
        return {
            "hash": self.hash,
            "rows": self.rows,
            "features": int(self.x.shape[1]),
            "classes": sorted(int(c) for c in np.unique(self.y)),
            "time_range": [float(finite.min()), float(finite.max())] if finite.size else None,
            "devices": sorted({str(d) for d in self.device if d}),
            "sources": list(self.sources),
        }


def snapshot_hash(x: np.ndarray, y: np.ndarray, ts: np.ndarray, device: np.ndarray) -> str:
    h = hashlib.sha256(b"edgeml-snapshot-v1")
    for arr in (np.ascontiguousarray(x, "<f4"), np.ascontiguousarray(y, "<i8"), np.ascontiguousarray(ts, "<f8")):
        h.update(f"{arr.dtype.str}{arr.shape}".encode())
        h.update(arr.tobytes())
    h.update("\x1f".join(str(d) for d in device).encode())
    return "sha256:" + h.hexdigest()


def _make(x: np.ndarray, y: np.ndarray, ts: np.ndarray, device: np.ndarray, sources: Sequence[str]) -> Snapshot:
    x = np.ascontiguousarray(x, np.float32)
    y = np.ascontiguousarray(y, np.int64)
    ts = np.ascontiguousarray(ts, np.float64)
    device = np.asarray([str(d) for d in device], dtype=np.str_)
    return Snapshot(x, y, ts, device, tuple(sources), snapshot_hash(x, y, ts, device))


def build_snapshot(sources: Sequence[SklearnSource | FleetSource | SensorSource], store: Store | None = None) -> Snapshot:
    """Materialize every source and concatenate them in recipe order."""
    parts = []
    for source in sources:
        if isinstance(source, SklearnSource):
            parts.append(_sklearn(source))
        elif isinstance(source, SensorSource):
            parts.append(_sensor(source))
        else:
            if store is None:
                raise InvalidInput("a fleet data source needs the coordinator's store")
            parts.append(_fleet(source, store))
    names = [p[4] for p in parts]
    parts = [p for p in parts if p[0].shape[0]]
    widths = {p[0].shape[1] for p in parts}
    if len(widths) > 1:
        raise InvalidInput(f"data sources disagree on the number of features: {sorted(widths)}")
    rows = sum(p[0].shape[0] for p in parts)
    classes = len(np.unique(np.concatenate([p[1] for p in parts]))) if parts else 0
    if rows < 10 or classes < 2:
        raise InvalidInput(f"not enough labeled data to train from {', '.join(names)}: {rows} rows, {classes} classes")
    x, y, ts, dev, _ = zip(*parts, strict=True)
    return _make(np.concatenate(x), np.concatenate(y), np.concatenate(ts), np.concatenate(dev), names)


def _sklearn(source: SklearnSource) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, str]:
    from sklearn import datasets

    bunch = getattr(datasets, f"load_{source.dataset}")()
    n = len(bunch.target)
    return bunch.data, bunch.target, np.full(n, np.nan), np.full(n, ""), f"sklearn:{source.dataset}"


def _sensor(source: SensorSource) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, str]:
    from edgeml._testing.sensor import SensorStream

    stream = SensorStream(features=source.features, classes=source.classes, seed=source.seed)
    x, y = stream.sample(source.rows, drift=source.drift, rng=source.sample_seed)
    name = f"sensor:seed={source.seed},drift={source.drift:g},rows={source.rows}"
    return x, y, np.full(source.rows, np.nan), np.full(source.rows, ""), name


def _tensor(inputs: Any, name: str | None) -> list[float] | None:
    """The one input row of a record as a flat list; None when it has no usable input."""
    if not isinstance(inputs, dict) or not inputs:
        return None
    if name is None:
        if len(inputs) != 1:
            return None
        value = next(iter(inputs.values()))
    elif name in inputs:
        value = inputs[name]
    else:
        return None
    arr = np.asarray(value, dtype=np.float32)
    if arr.ndim >= 2 and arr.shape[0] == 1:
        arr = arr[0]  # a batch of one
    elif arr.ndim >= 2:
        return None  # a label belongs to one row; a batch is ambiguous
    return arr.reshape(-1).tolist()


def _label(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def _fleet(source: FleetSource, store: Store) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, str]:
    devices = list(source.devices) or [d.device_id for d in store.list_devices(source.fleet)]
    rows: list[tuple[list[float], int, float, str]] = []
    for device in sorted(devices):
        feedback = _records(store, source, device, "feedback")
        samples = _records(store, source, device, "sample")
        rows.extend(_join(source, device, feedback, samples))
        if len(rows) >= source.max_rows:
            rows = rows[: source.max_rows]
            break
    name = f"fleet:{source.fleet}" + (f"/{source.model}" if source.model else "")
    if not rows:
        return np.zeros((0, 0), np.float32), np.zeros(0, np.int64), np.zeros(0), np.zeros(0, np.str_), name
    widths = {len(r[0]) for r in rows}
    if len(widths) != 1:
        raise InvalidInput(f"fleet samples of {name} have different widths: {sorted(widths)}")
    x, y, ts, dev = zip(*rows, strict=True)
    return np.asarray(x, np.float32), np.asarray(y, np.int64), np.asarray(ts), np.asarray(dev), name


def _records(store: Store, source: FleetSource, device: str, kind: str) -> list[TelemetryRow]:
    try:
        found = store.query_telemetry(source.fleet, device, kind=kind, since=source.since, limit=_TELEMETRY_LIMIT)
    except NotFound:
        return []
    return [
        r for r in found
        if (source.model is None or r.body.get("model") == source.model)
        and (source.until is None or r.ts <= source.until)
    ]


def _join(
    source: FleetSource, device: str, feedback: Iterable[TelemetryRow], samples: Sequence[TelemetryRow],
) -> list[tuple[list[float], int, float, str]]:
    """Labeled rows of one device, in (ts, stream, seq) order; each sample used at most once.

    Feedback naming a ``prediction_id`` takes the sample record of that prediction (same
    stream); without one, the newest earlier sample within ``join_window_s``."""
    used: set[int] = set()
    by_id = {(s.stream, s.body["prediction_id"]): i for i, s in enumerate(samples)
             if isinstance(s.body.get("prediction_id"), str)}
    out = []
    for fb in feedback:
        label = _label(fb.body.get("label"))
        if label is None or label < 0:
            continue
        features = _tensor(fb.body.get("inputs"), source.input)
        pid = fb.body.get("prediction_id")
        if features is None and isinstance(pid, str):
            i = by_id.get((fb.stream, pid))
            if i is None or i in used:
                continue  # its prediction was not sampled: no inputs to learn from
            used.add(i)
            features = _tensor(samples[i].body.get("inputs"), source.input)
        elif features is None:
            features = _nearest_sample(source, fb, samples, used)
        if features is not None and all(math.isfinite(v) for v in features):
            out.append((features, label, fb.ts, device))
    return out


def _nearest_sample(source: FleetSource, fb: TelemetryRow, samples: Sequence[TelemetryRow], used: set[int]) -> list[float] | None:
    for i in range(len(samples) - 1, -1, -1):
        s = samples[i]
        if s.ts > fb.ts or i in used or s.body.get("model") != fb.body.get("model"):
            continue
        if fb.ts - s.ts > source.join_window_s:
            return None
        used.add(i)
        return _tensor(s.body.get("inputs"), source.input)
    return None


def _path(root: str | os.PathLike[str], digest: str) -> Path:
    algo, _, hexdigest = digest.partition(":")
    if algo != "sha256" or len(hexdigest) != 64 or any(c not in "0123456789abcdef" for c in hexdigest):
        raise InvalidInput(f"not a snapshot hash: {digest!r}")
    return Path(root) / f"{hexdigest}.npz"


def save_snapshot(snapshot: Snapshot, root: str | os.PathLike[str]) -> Path:
    """Write the snapshot as ``<hex>.npz`` under ``root`` (a no-op if it is there)."""
    path = _path(root, snapshot.hash)
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, x=snapshot.x, y=snapshot.y, ts=snapshot.ts, device=snapshot.device,
             sources=np.asarray(snapshot.sources, dtype=np.str_))
    os.replace(tmp, path)
    return path


def load_snapshot(digest: str, root: str | os.PathLike[str]) -> Snapshot:
    """Re-materialize a snapshot from its hash; NotFound if absent, InvalidInput if altered."""
    path = _path(root, digest)
    if not path.exists():
        raise NotFound(f"no snapshot {digest} under {root}")
    with np.load(path, allow_pickle=False) as data:
        snap = _make(data["x"], data["y"], data["ts"], data["device"], tuple(str(s) for s in data["sources"]))
    if snap.hash != digest:
        raise InvalidInput(f"snapshot file {path} does not hash to {digest} (got {snap.hash})")
    return snap
