"""REST routes: devices, telemetry, events, models. Thin: each calls the store or the
registry and returns JSON; errors are raised as domain exceptions (see ``_errors``)."""

from __future__ import annotations

import dataclasses
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, File, Form, Query, Response, UploadFile
from pydantic import BaseModel, ConfigDict, Field

from edgeml.protocol import check_id

from .._exceptions import InvalidInput
from ..registry.models import ModelRegistry, model_json, parse_ref
from ..store import Device, DeviceTotals, Store, StreamCounters, Transaction


class DeviceIn(BaseModel):
    """Pre-registration of a device: what the fleet operator knows before it connects."""

    model_config = ConfigDict(extra="forbid")

    tags: dict[str, Any] | None = None
    hardware_profile: str | None = Field(None, max_length=200)


class AliasIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: str


def _ids(fleet: str, device: str) -> None:
    try:
        check_id(fleet, "fleet")
        check_id(device, "device")
    except ValueError as exc:
        raise InvalidInput(str(exc)) from None


def device_json(d: Device, totals: DeviceTotals | None = None, streams: dict[str, StreamCounters] | None = None) -> dict[str, Any]:
    """A device with its ingestion counters (:meth:`Transaction.device_totals`: sums over its
    streams, ``max_contiguous_seq`` its current stream's) and, if given, each stream's own."""
    doc = dataclasses.asdict(d)
    if streams is not None:
        doc["streams"] = [dataclasses.asdict(c) for c in streams.values()]  # oldest stream first
    totals = totals or DeviceTotals()
    doc.update(records=totals.records, max_contiguous_seq=totals.max_contiguous_seq, gaps=totals.gaps,
               duplicates=totals.duplicates)
    return doc


def device_detail(tx: Transaction, fleet: str, device: str) -> dict[str, Any]:
    """One device as :func:`device_json` shows it, with every stream; NotFound if unknown."""
    d = tx.get_device(fleet, device)
    totals = tx.device_totals(fleet, device).get((fleet, device))
    return device_json(d, totals, tx.device_counters(fleet, device))


def _row(row: Any) -> dict[str, Any]:
    return dataclasses.asdict(row)


def _json_object(text: str | None, field: str) -> dict[str, Any] | None:
    if text is None or text == "":
        return None
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"{field} is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise InvalidInput(f"{field} must be a JSON object, got {type(value).__name__}")
    return value


def device_router(store: Store) -> APIRouter:
    router = APIRouter(tags=["devices"])

    @router.get("/v1/devices")
    def list_devices(fleet: str | None = None, online: bool | None = None) -> list[dict[str, Any]]:
        """Every registered device with its summed ingestion counters."""
        totals = store.device_totals(fleet)
        devices = [d for d in store.list_devices(fleet) if online is None or d.online == online]
        return [device_json(d, totals.get((d.fleet, d.device_id))) for d in devices]

    @router.get("/v1/devices/{fleet}/{device}")
    def show_device(fleet: str, device: str) -> dict[str, Any]:
        """A device: tags, hardware profile, status, reported state and ingestion counters.

        ``records``, ``gaps`` and ``duplicates`` are summed over the device's streams;
        ``max_contiguous_seq`` is the device's most recent stream's (latest ``last_seen``),
        since seqs restart at 1 in each stream (a reinstalled agent). ``streams`` lists
        every stream's own counters, oldest first."""
        _ids(fleet, device)
        with store.transaction() as tx:
            return device_detail(tx, fleet, device)

    @router.put("/v1/devices/{fleet}/{device}")
    def preregister_device(fleet: str, device: str, body: DeviceIn, response: Response) -> dict[str, Any]:
        """Pre-register a device (or update its tags / hardware profile). 201 when new.

        With ``ingest.policy: preregistered`` only pre-registered devices are ingested."""
        _ids(fleet, device)
        with store.transaction(write=True) as tx:
            created = tx.find_device(fleet, device) is None
            tx.upsert_device(fleet, device, tags=body.tags, hardware_profile=body.hardware_profile, pre_registered=True)
            doc = device_detail(tx, fleet, device)
        response.status_code = 201 if created else 200
        return doc

    @router.get("/v1/devices/{fleet}/{device}/telemetry")
    def device_telemetry(
        fleet: str, device: str, kind: str | None = None, since: float | None = None, stream: str | None = None,
        limit: Annotated[int, Query(ge=1, le=100_000)] = 1000,
    ) -> list[dict[str, Any]]:
        """A device's records, oldest first, from ``since`` (Unix seconds)."""
        _ids(fleet, device)
        store.get_device(fleet, device)
        rows = store.query_telemetry(fleet, device, kind=kind, since=since, stream=stream, limit=limit)
        return [_row(r) for r in rows]

    @router.get("/v1/events")
    def events(
        fleet: str | None = None, since: float | None = None, limit: Annotated[int, Query(ge=1, le=10_000)] = 100,
    ) -> list[dict[str, Any]]:
        """Event records across the fleet (or every fleet), newest first."""
        return [_row(r) for r in store.latest_telemetry(kind="event", fleet=fleet, since=since, limit=limit)]

    return router


def model_router(registry: ModelRegistry, max_upload_bytes: int) -> APIRouter:
    router = APIRouter(tags=["models"])

    @router.post("/v1/models", status_code=201)
    def register_model(
        file: Annotated[UploadFile, File(description="the .onnx or .tflite file")],
        name: Annotated[str, Form()],
        version: Annotated[str, Form()],
        metrics: Annotated[str | None, Form(description="JSON object")] = None,
        params: Annotated[str | None, Form(description="JSON object")] = None,
        parent: Annotated[str | None, Form(description="name@version of the model it derives from")] = None,
        dataset_hash: Annotated[str | None, Form()] = None,
    ) -> dict[str, Any]:
        """Register a model file: inspected, stored content-addressed and signed."""
        if file.size is not None and file.size > max_upload_bytes:
            raise InvalidInput(f"file is {file.size} bytes, more than the limit of {max_upload_bytes}")
        model = registry.register(
            file.file, name=name, version=version, metrics=_json_object(metrics, "metrics"),
            params=_json_object(params, "params"), parent=parent or None, dataset_hash=dataset_hash or None,
            filename=file.filename,
        )
        return model_json(model)

    @router.get("/v1/models")
    def list_models(name: str | None = None) -> list[dict[str, Any]]:
        return [model_json(m) for m in registry.list(name)]

    @router.get("/v1/models/{ref}")
    def show_model(ref: str) -> dict[str, Any]:
        """``name@version`` or ``name@alias``."""
        return model_json(registry.resolve(ref))

    @router.get("/v1/models/{name}/aliases")
    def list_aliases(name: str) -> dict[str, str]:
        return registry.aliases(name)

    @router.put("/v1/models/{name}/aliases/{alias}")
    def set_alias(name: str, alias: str, body: AliasIn) -> dict[str, Any]:
        """Create or move an alias (``champion``, ``challenger``…) to a registered version."""
        previous = registry.set_alias(name, alias, body.version)
        return {"name": name, "alias": alias, "version": body.version, "previous": previous}

    return router


__all__ = ["device_json", "device_router", "model_router", "parse_ref"]
