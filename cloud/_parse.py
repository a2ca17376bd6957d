"""Turn MQTT messages into what the store writes, or into a :class:`PoisonMessage`.

Telemetry is validated in two layers, both fast enough for the ingest hot path:
the envelope (v, fleet, device, stream, sent_at, records) and, for every record, the
fields the store relies on (``seq`` an int >= 1, ``ts`` a number, ``kind`` a string).
Records of a kind this coordinator does not know are stored as they are: the protocol
lets devices add kinds within v1 and dropping them would show as false gaps.
``full=True`` also validates records of known kinds with the pydantic models of
``edgeml.protocol`` (about 3x slower). Status and reported-state documents are few
and always go through pydantic; the reported state strictly (``"1"`` is not a
revision), since the rollout engine compares and reads its fields as they are stored.
"""

from __future__ import annotations

import typing
from typing import Any

import orjson
from pydantic import TypeAdapter, ValidationError

from edgeml.protocol import (
    PROTOCOL_VERSION,
    ReportedState,
    Status,
    TelemetryRecord,
    check_id,
    parse_topic,
)

from ._exceptions import PoisonMessage
from ._text import has_nul
from .store import TelemetryBatchIn

# Counter names of rejected messages (``ingest_errors.reason``).
OVERSIZED = "oversized"
INVALID_JSON = "invalid_json"
WRONG_SCHEMA = "wrong_schema"
TOPIC_MISMATCH = "topic_mismatch"
BAD_TOPIC = "bad_topic"
UNKNOWN_DEVICE = "unknown_device"

#: Every kind of :data:`edgeml.protocol.TelemetryRecord` (``full`` validation checks these).
KNOWN_KINDS = frozenset(
    member.model_fields["kind"].default for member in typing.get_args(typing.get_args(TelemetryRecord)[0])
)
#: The largest seq both stores keep (SQLite INTEGER, PostgreSQL BIGINT).
MAX_SEQ = 2**63 - 1
_RECORDS = TypeAdapter(list[TelemetryRecord])
_NUMBER = (int, float)


def split_topic(topic: str) -> tuple[str, str, str]:
    """``(fleet, device, leaf)`` of a device topic, or PoisonMessage(bad_topic)."""
    try:
        fleet, device, leaf = parse_topic(topic)
        check_id(fleet, "fleet")
        check_id(device, "device")
    except ValueError as exc:
        raise PoisonMessage(BAD_TOPIC, str(exc)) from exc
    return fleet, device, leaf


def load_object(payload: bytes, limit: int) -> dict[str, Any]:
    """Parse a JSON object of at most ``limit`` bytes."""
    if len(payload) > limit:
        raise PoisonMessage(OVERSIZED, f"{len(payload)} bytes > {limit}")
    try:
        doc = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        raise PoisonMessage(INVALID_JSON, str(exc)) from exc
    if type(doc) is not dict:
        raise PoisonMessage(WRONG_SCHEMA, f"expected a JSON object, got {type(doc).__name__}")
    # What the store could not write would fail its flush forever (or kill the writer):
    if payload.count(b"[") + payload.count(b"{") > _FEW_BRACKETS and not _writable(doc):
        raise PoisonMessage(WRONG_SCHEMA, "nested deeper than the store writes (orjson: 254 levels)")
    if b"\\u0000" in payload and has_nul(doc):  # PostgreSQL cannot store it
        raise PoisonMessage(WRONG_SCHEMA, "a string holds a NUL character (\\u0000)")
    return doc


#: Fewer opening brackets than this cannot nest as deep as orjson refuses to write.
_FEW_BRACKETS = 200


def _writable(doc: dict[str, Any]) -> bool:
    try:
        orjson.dumps([[doc]])  # the store nests records two levels deeper (PostgreSQL)
    except orjson.JSONEncodeError:
        return False
    return True


def telemetry(fleet: str, device: str, payload: bytes, *, limit: int, full: bool = False) -> TelemetryBatchIn:
    doc = load_object(payload, limit)
    if doc.get("v") != PROTOCOL_VERSION:
        raise PoisonMessage(WRONG_SCHEMA, f"v must be {PROTOCOL_VERSION}, got {doc.get('v')!r}")
    stream, records = doc.get("stream"), doc.get("records")
    if type(stream) is not str or not stream or type(doc.get("sent_at")) not in _NUMBER:
        raise PoisonMessage(WRONG_SCHEMA, "stream must be a non-empty string and sent_at a number")
    if doc.get("fleet") != fleet or doc.get("device") != device:
        raise PoisonMessage(TOPIC_MISMATCH, f"payload is {doc.get('fleet')!r}/{doc.get('device')!r}")
    if type(records) is not list or not records:
        raise PoisonMessage(WRONG_SCHEMA, "records must be a non-empty list")
    for i, r in enumerate(records):
        if type(r) is not dict:
            raise PoisonMessage(WRONG_SCHEMA, f"records[{i}] is not an object")
        seq = r.get("seq")
        if type(seq) is not int or not 1 <= seq <= MAX_SEQ or type(r.get("ts")) not in _NUMBER \
                or type(r.get("kind")) is not str:
            raise PoisonMessage(WRONG_SCHEMA, f"records[{i}] needs seq (int 1..2^63-1), ts (number), kind (string)")
    if full:
        try:
            _RECORDS.validate_python([r for r in records if r["kind"] in KNOWN_KINDS])
        except ValidationError as exc:
            known = [i for i, r in enumerate(records) if r["kind"] in KNOWN_KINDS]  # only to name the record
            err = exc.errors()[0]
            where, rest = err["loc"][0], err["loc"][2:]  # (index among known, kind tag, field...)
            field = "".join(f".{p}" for p in rest)
            raise PoisonMessage(WRONG_SCHEMA, f"records[{known[int(where)]}]{field}: {err['msg']}") from exc
    return TelemetryBatchIn(fleet, device, stream, records)


def status(device: str, payload: bytes, *, limit: int) -> dict[str, Any]:
    doc = load_object(payload, limit)
    try:
        parsed = Status.model_validate(doc)
    except ValidationError as exc:
        raise PoisonMessage(WRONG_SCHEMA, str(exc).splitlines()[0]) from exc
    if parsed.device != device:
        raise PoisonMessage(TOPIC_MISMATCH, f"payload is for device {parsed.device!r}")
    return doc


def state(fleet: str, device: str, payload: bytes, *, limit: int) -> dict[str, Any]:
    """The reported state, checked strictly against ``ReportedState`` and against its topic;
    returned as sent (fields the model does not know are kept)."""
    doc = load_object(payload, limit)
    try:
        ReportedState.model_validate(doc, strict=True)
    except ValidationError as exc:
        raise PoisonMessage(WRONG_SCHEMA, str(exc).splitlines()[0] + ": " + _first_error(exc)) from exc
    if doc["fleet"] != fleet or doc["device"] != device:
        raise PoisonMessage(TOPIC_MISMATCH, f"payload is for {doc['fleet']!r}/{doc['device']!r}")
    return doc


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    return f"{'.'.join(str(p) for p in err['loc']) or '(root)'}: {err['msg']}"
