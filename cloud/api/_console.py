"""The web console's routes: its pages, the JSON views they need, and live updates.

    app.include_router(console_router(store, registry, rollouts))

Pages (no auth needed: they are static files; every data request the scripts make
goes through one function that adds ``Authorization: Bearer <token>``):
``/`` redirects to ``/console/``; ``/console/`` (fleet), ``/console/devices/{fleet}/{device}``,
``/console/models``, ``/console/rollouts``, ``/console/rollouts/{id}`` and
``/console/audit`` all serve the same shell, whose script draws the view;
``/console/static/{file}`` serves the shell's files from :data:`cloud.console.STATIC`.

JSON the REST API does not already give (computed server-side, read through the store):
``/v1/console/overview`` (online/offline, model versions across the fleet, health),
``/v1/console/devices/{fleet}/{device}/series`` (latency percentiles per time bucket,
the distribution of predictions, drift as PSI of the device's top1 distribution against
the fleet's, events), ``/v1/console/models`` (versions, lineage edges, where each runs),
``/v1/console/rollouts/{id}/series`` (latency and accuracy of the canary and baseline
cohorts over time). The audit view reads the REST API's own ``/v1/audit``.

``/v1/stream`` is a server-sent event stream of small change notices
(``event: change``, ``data: {"topics": ["rollouts", "audit"]}``): the page refetches
what changed, and falls back to polling when the stream fails. A stream ends after
``stream_max_age_s`` (the browser reconnects by itself) or when the server is closing.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Callable, Iterable
from typing import TYPE_CHECKING, Annotated, Any

import orjson
from fastapi import APIRouter, Query
from fastapi.responses import FileResponse, RedirectResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from .._exceptions import NotFound
from ..console import STATIC
from ..registry.models import model_json
from ..rollouts._stats import psi
from ._routes import _ids, device_detail

if TYPE_CHECKING:
    from ..registry.models import ModelRegistry
    from ..rollouts import RolloutService
    from ..store import Device, Store

__all__ = ["console_router"]

#: Most telemetry rows one series request reads (newest first): bounds the work per request.
MAX_ROWS = 20_000
#: The fleet's class distribution (the device page's drift reference) is read from this many of its latest predictions.
REFERENCE_ROWS = 5_000
#: Drift buckets are this many latency buckets wide, and need this many predictions for a PSI.
DRIFT_COARSER, DRIFT_MIN = 4, 20
#: Telemetry fresher than this (seconds) counts as a device that is sending.
STALE_S = 120.0
_MEDIA = {".html": "text/html; charset=utf-8", ".css": "text/css; charset=utf-8",
          ".js": "text/javascript; charset=utf-8", ".svg": "image/svg+xml", ".png": "image/png"}
_NO_CACHE = {"Cache-Control": "no-cache"}
#: Pages and their files need no token (the API's auth reads this route option); the data does.
OPEN = {"x-edgeml-role": "open"}


def console_router(
    store: Store, registry: ModelRegistry, rollouts: RolloutService | None = None, *,
    closing: Callable[[], bool] = lambda: False, stream_interval_s: float = 1.0, stream_max_age_s: float = 30.0,
) -> APIRouter:
    router = APIRouter()
    _page_routes(router)
    _data_routes(router, store, registry, rollouts)
    watcher = _Watcher(store, stream_interval_s)

    @router.get("/v1/stream", tags=["console"], response_class=StreamingResponse)
    async def stream() -> StreamingResponse:
        """Server-sent change notices (topics: devices, telemetry, models, rollouts, audit); the
        stream ends on a client's disconnect (starlette cancels it), after ``stream_max_age_s``
        or when the server closes."""
        return StreamingResponse(
            _notices(watcher, closing, stream_interval_s, stream_max_age_s),
            media_type="text/event-stream", headers={**_NO_CACHE, "X-Accel-Buffering": "no"},
        )

    return router


# ---------------------------------------------------------------------- pages
def _page_routes(router: APIRouter) -> None:
    files = {p.name: p for p in STATIC.iterdir() if p.is_file()}
    shell = STATIC / "index.html"

    def page() -> FileResponse:
        return FileResponse(shell, media_type=_MEDIA[".html"], headers=_NO_CACHE)

    def home() -> RedirectResponse:
        return RedirectResponse("/console/")

    for path in ("/", "/console"):
        router.add_api_route(path, home, include_in_schema=False, openapi_extra=OPEN)
    for path in ("/console/", "/console/models", "/console/rollouts", "/console/rollouts/{rollout_id}",
                 "/console/audit", "/console/devices/{fleet}/{device}"):
        router.add_api_route(path, page, include_in_schema=False, response_class=FileResponse, openapi_extra=OPEN)

    @router.get("/console/static/{name}", include_in_schema=False, openapi_extra=OPEN)
    def static(name: str) -> FileResponse:
        path = files.get(name)
        if path is None:
            raise NotFound(f"no console file {name}")
        return FileResponse(path, media_type=_MEDIA.get(path.suffix, "application/octet-stream"),
                            headers=_NO_CACHE)


# ---------------------------------------------------------------------- JSON views
def _data_routes(router: APIRouter, store: Store, registry: ModelRegistry, rollouts: RolloutService | None) -> None:
    @router.get("/v1/console/overview", tags=["console"])
    def overview(fleet: str | None = None) -> dict[str, Any]:
        """Devices online/offline, model versions across the fleet, health, active rollouts."""
        return fleet_overview(store, rollouts, fleet, time.time())

    @router.get("/v1/console/devices/{fleet}/{device}/series", tags=["console"])
    def device_series(
        fleet: str, device: str, window_s: Annotated[float, Query(gt=0, le=7 * 86400)] = 600.0,
        buckets: Annotated[int, Query(ge=1, le=500)] = 40,
    ) -> dict[str, Any]:
        """A device's telemetry aggregated per time bucket over the last ``window_s`` seconds."""
        _ids(fleet, device)
        with store.transaction() as tx:
            doc = device_detail(tx, fleet, device)
        return {"device": doc, **device_telemetry(store, fleet, device, time.time(), window_s, buckets)}

    @router.get("/v1/console/models", tags=["console"])
    def models() -> dict[str, Any]:
        """Every model version with its aliases, the lineage edges, and where each version runs."""
        return model_view(store, registry)

    @router.get("/v1/console/rollouts/{rollout_id}/series", tags=["console"])
    def rollout_series(rollout_id: str, buckets: Annotated[int, Query(ge=1, le=500)] = 40,
                       window_s: Annotated[float, Query(gt=0, le=7 * 86400)] = 1800.0) -> dict[str, Any]:
        """Latency percentiles and accuracy of the canary and baseline cohorts per time bucket."""
        if rollouts is None:
            raise NotFound("rollouts are not enabled on this coordinator")
        return cohort_series(store, rollouts.status(rollout_id), time.time(), window_s, buckets)


def _loads(value: Any) -> Any:
    return orjson.loads(value) if isinstance(value, str | bytes) else value


def _active(state: dict[str, Any] | None) -> str | None:
    active = (state or {}).get("active")
    return f"{active['name']}@{active['version']}" if active else None


def device_health(d: Device, gaps: int, now: float) -> str:
    """``offline``, ``update failed`` (the last update failed or was rolled back), ``gaps``
    (telemetry missing), ``silent`` (online, nothing for a while) or ``ok``."""
    if not d.online:
        return "offline"
    update = (d.reported_state or {}).get("update") or {}
    if update.get("result") in ("failed", "rolled_back"):
        return "update failed"
    if gaps:
        return "gaps"
    if d.last_seen is None or now - d.last_seen > STALE_S:
        return "silent"
    return "ok"


def fleet_overview(store: Store, rollouts: RolloutService | None, fleet: str | None, now: float) -> dict[str, Any]:
    totals = store.device_totals(fleet)
    devices, versions, health = [], Counter[str](), Counter[str]()
    online_versions = Counter[str]()
    for d in store.list_devices(fleet):
        t = totals.get((d.fleet, d.device_id))
        model = _active(d.reported_state)
        state = device_health(d, t.gaps if t else 0, now)
        versions[model or "none"] += 1
        online_versions[model or "none"] += d.online
        health[state] += 1
        devices.append({"fleet": d.fleet, "device_id": d.device_id, "online": d.online, "model": model,
                        "last_seen": d.last_seen, "records": t.records if t else 0, "gaps": t.gaps if t else 0,
                        "health": state, "tags": d.tags, "hardware_profile": d.hardware_profile})
    active = [r for r in (rollouts.list() if rollouts is not None else [])
              if r["state"] not in ("completed", "rolled_back", "aborted")]
    online = sum(d["online"] for d in devices)
    return {
        "now": now, "devices": len(devices), "online": online, "offline": len(devices) - online,
        "records": sum(d["records"] for d in devices),
        "versions": [{"model": m, "devices": n, "online": online_versions[m]} for m, n in versions.most_common()],
        "health": dict(health), "active_rollouts": active, "device_list": devices,
    }


def _buckets(t0: float, t1: float, n: int) -> tuple[float, list[float]]:
    width = max((t1 - t0) / n, 1e-6)
    return width, [t0 + i * width for i in range(n)]


def _index(ts: float, t0: float, width: float, n: int) -> int:
    return min(max(int((ts - t0) // width), 0), n - 1)


def _percentiles(values: list[float]) -> dict[str, float | int | None]:
    if not values:
        return {"n": 0, "p50": None, "p95": None}
    ordered = sorted(values)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]

    return {"n": len(ordered), "p50": round(at(0.50), 2), "p95": round(at(0.95), 2)}


def _latency_series(rows: Iterable[tuple[float, float]], starts: list[float], width: float) -> list[dict[str, Any]]:
    per: list[list[float]] = [[] for _ in starts]
    for ts, latency in rows:
        per[_index(ts, starts[0], width, len(starts))].append(latency)
    return [{"t": round(t + width / 2, 3), **_percentiles(v)} for t, v in zip(starts, per, strict=True)]


def device_telemetry(store: Store, fleet: str, device: str, now: float, window_s: float, buckets: int) -> dict[str, Any]:
    t0 = now - window_s
    with store.transaction() as tx:
        rows = tx.execute("SELECT ts, kind, body FROM telemetry WHERE fleet = ? AND device_id = ? AND ts >= ? "
                          "AND kind IN ('prediction', 'feedback') ORDER BY ts DESC LIMIT ?",
                          (fleet, device, t0, MAX_ROWS)).fetchall()
        fleet_rows = tx.execute("SELECT body FROM telemetry WHERE fleet = ? AND kind = 'prediction' AND ts >= ? "
                                "ORDER BY ts DESC LIMIT ?", (fleet, t0, REFERENCE_ROWS)).fetchall()
        events = tx.execute("SELECT ts, seq, body FROM telemetry WHERE fleet = ? AND device_id = ? "
                            "AND kind = 'event' ORDER BY ts DESC LIMIT 50", (fleet, device)).fetchall()
    if rows:  # a device younger than the window: its buckets span what it sent
        t0 = max(t0, min(r[0] for r in rows))
    width, starts = _buckets(t0, now, buckets)
    latencies, top1, versions = [], Counter[int](), Counter[str]()
    # drift buckets: coarser than latency's, and as many as give each ~2 x DRIFT_MIN predictions
    drift_width, drift_starts = _buckets(t0, now, max(1, min(buckets // DRIFT_COARSER, len(rows) // (2 * DRIFT_MIN))))
    per_bucket_top1: list[Counter[int]] = [Counter() for _ in drift_starts]
    labeled = correct = 0
    for ts, kind, raw in rows:
        body = _loads(raw)
        if kind == "feedback":
            labeled += 1
            correct += bool(body.get("correct"))
            continue
        latencies.append((ts, float(body.get("latency_us") or 0.0)))
        versions[f"{body.get('model')}@{body.get('version')}"] += 1
        k = (body.get("summary") or {}).get("top1")
        if k is not None:
            top1[int(k)] += 1
            per_bucket_top1[_index(ts, t0, drift_width, len(drift_starts))][int(k)] += 1
    reference = Counter[int]()
    for (raw,) in fleet_rows:
        k = (_loads(raw).get("summary") or {}).get("top1")
        if k is not None:
            reference[int(k)] += 1
    drift = [{"t": round(t + drift_width / 2, 3), "n": sum(c.values()),
              "psi": round(psi(dict(reference), dict(c)), 4) if sum(c.values()) >= DRIFT_MIN and reference else None}
             for t, c in zip(drift_starts, per_bucket_top1, strict=True)]
    return {
        "window": [t0, now], "bucket_s": width, "predictions": len(latencies),
        "latency_us": _latency_series(latencies, starts, width), "top1": {str(k): n for k, n in sorted(top1.items())},
        "reference_top1": {str(k): n for k, n in sorted(reference.items())},
        "versions": dict(versions), "feedback": {"labeled": labeled, "correct": correct},
        "drift": drift, "drift_psi": round(psi(dict(reference), dict(top1)), 4) if top1 and reference else None,
        "events": [{"ts": ts, "seq": seq, **_loads(body)} for ts, seq, body in events],
    }


def model_view(store: Store, registry: ModelRegistry) -> dict[str, Any]:
    running, online = Counter[str](), Counter[str]()
    for d in store.list_devices():
        model = _active(d.reported_state)
        if model:
            running[model] += 1
            online[model] += d.online
    models = []
    for m in registry.list():
        doc = model_json(m)
        doc.update(devices=running[m.ref], devices_online=online[m.ref])
        models.append(doc)
    refs = {m["ref"] for m in models}
    edges = [[m["parent"], m["ref"]] for m in models if m["parent"] in refs]
    return {"models": models, "edges": edges}


def cohort_series(store: Store, rollout: dict[str, Any], now: float, window_s: float, buckets: int) -> dict[str, Any]:
    """The canary runs the rollout's model; the baseline is every other target device."""
    name, _, version = rollout["model"].partition("@")
    t0 = max(rollout["created_at"], now - window_s)
    width, starts = _buckets(t0, now, buckets)
    with store.transaction() as tx:
        cohorts = dict(tx.execute("SELECT device_id, cohort FROM rollout_devices WHERE rollout_id = ?",
                                  (rollout["id"],)).fetchall())
        rows = tx.execute("SELECT device_id, ts, kind, body FROM telemetry WHERE fleet = ? AND ts >= ? "
                          "AND kind IN ('prediction', 'feedback') ORDER BY ts DESC LIMIT ?",
                          (rollout["fleet"], t0, MAX_ROWS * 2)).fetchall()
    latency: dict[str, list[tuple[float, float]]] = defaultdict(list)
    labels: dict[str, list[list[int]]] = {c: [[0, 0] for _ in starts] for c in ("canary", "baseline")}
    for device, ts, kind, raw in rows:
        if device not in cohorts:
            continue
        body = _loads(raw)
        side = "canary" if body.get("model") == name and body.get("version") == version else "baseline"
        if kind == "prediction":
            latency[side].append((ts, float(body.get("latency_us") or 0.0)))
        elif body.get("correct") is not None:
            cell = labels[side][_index(ts, t0, width, buckets)]
            cell[0] += 1
            cell[1] += bool(body["correct"])
    members = Counter(cohorts.values())
    return {
        "window": [t0, now], "bucket_s": width, "cohorts": dict(members),
        "step_started_at": rollout["step_started_at"],
        "latency_us": {side: _latency_series(latency[side], starts, width) for side in ("canary", "baseline")},
        "accuracy": {side: [{"t": round(t + width / 2, 3), "n": n, "accuracy": (ok / n if n else None)}
                            for t, (n, ok) in zip(starts, cells, strict=True)] for side, cells in labels.items()},
    }


# ---------------------------------------------------------------------- live updates
_PROBES = {
    "devices": "SELECT COUNT(*), SUM(CASE WHEN online THEN 1 ELSE 0 END) FROM devices",
    "telemetry": "SELECT MAX(last_seen), SUM(records) FROM ingest_counters",
    "models": "SELECT COUNT(*), (SELECT MAX(updated_at) FROM model_aliases) FROM models",
    "rollouts": "SELECT COUNT(*), MAX(updated_at) FROM rollouts",
    "audit": "SELECT MAX(id) FROM audit_log",
}


class _Watcher:
    """One small fingerprint per topic, read at most every ``interval_s`` whoever asks
    (every open stream shares it)."""

    def __init__(self, store: Store, interval_s: float) -> None:
        self.store = store
        self.interval_s = interval_s
        self._lock = threading.Lock()
        self._at = 0.0
        self._last: dict[str, Any] = {}

    def fingerprint(self) -> dict[str, Any]:
        with self._lock:
            if time.monotonic() - self._at >= self.interval_s * 0.5:
                with self.store.transaction() as tx:
                    self._last = {topic: repr(tuple(tx.execute(sql).fetchone() or ())) for topic, sql in _PROBES.items()}
                self._at = time.monotonic()
            return dict(self._last)


def _sse(event: str, data: Any) -> bytes:
    return b"event: " + event.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


async def _notices(watcher: _Watcher, closing: Callable[[], bool], interval_s: float,
                   max_age_s: float) -> AsyncIterator[bytes]:
    started = time.monotonic()
    last = await run_in_threadpool(watcher.fingerprint)
    yield b"retry: 2000\n" + _sse("ready", {"topics": sorted(last)})
    while time.monotonic() - started < max_age_s and not closing():
        await asyncio.sleep(interval_s)
        now = await run_in_threadpool(watcher.fingerprint)
        changed = sorted(t for t in now if now[t] != last.get(t))
        last = now
        yield _sse("change", {"topics": changed, "ts": time.time()}) if changed else b": keep-alive\n\n"
