"""Payload schemas of the edgeml MQTT protocol, version 1.

These pydantic models are the specification: docs/protocol.md embeds their JSON
schemas and a test keeps the two in step. The agent's hot path writes the same
shapes with orjson (no pydantic per record); consumers validate with these models.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ._topics import PROTOCOL_VERSION


class _Message(BaseModel):
    # defer_build: the agent only validates what it receives (DesiredState); building the
    # validators of every message up front costs the device ~5 MB of RSS.
    model_config = ConfigDict(frozen=True, extra="allow", defer_build=True)


class _Record(_Message):
    seq: int = Field(ge=1, description="Per-device sequence number: strictly increasing within a stream, never reused.")
    ts: float = Field(description="When the record was made: Unix time in seconds (float).")


class OutputSummary(_Message):
    """A compact summary of a prediction's first output."""

    output: str = Field(description="Name of the summarised output tensor.")
    top1: int | None = Field(None, description="Arg-max over the last axis of the first row (classifiers).")
    score: float | None = Field(None, description="The value at top1 (null when not finite).")
    mean: float | None = Field(description="Mean of all output values (null when not finite).")


class PredictionRecord(_Record):
    kind: Literal["prediction"] = "prediction"
    model: str
    version: str
    latency_us: float = Field(ge=0, description="Inference time in microseconds.")
    batch: int = Field(1, ge=1, description="Rows in the request.")
    summary: OutputSummary | None = None


class SampleRecord(_Record):
    """Full inputs and outputs of a sampled prediction, captured for retraining."""

    kind: Literal["sample"] = "sample"
    model: str
    version: str
    prediction_id: str | None = Field(None, description="Id of the prediction (the predict answer's id): feedback naming it joins this sample.")
    inputs: dict[str, Any] = Field(description="Input name -> nested list.")
    outputs: dict[str, Any] = Field(description="Output name -> nested list.")


class MetricsRecord(_Record):
    kind: Literal["metrics"] = "metrics"
    cpu_percent: float = Field(description="Agent process CPU use since the previous metrics record.")
    rss_bytes: int
    uptime_s: float
    predictions_total: int
    prediction_errors_total: int
    buffer_records: int = Field(description="Records waiting in the buffer.")
    buffer_bytes: int
    dropped_total: int = Field(description="Records dropped by the buffer budget since the data dir was created.")
    dropped: dict[str, int] = Field(default_factory=dict, description="Dropped records by priority class.")


class FeedbackRecord(_Record):
    """A label an application fed back for one of its predictions (accuracy, retraining)."""

    kind: Literal["feedback"] = "feedback"
    model: str = Field(description="The model serving when the feedback arrived.")
    version: str
    label: int | float | str = Field(description="The true label / value.")
    predicted: int | float | str | None = Field(None, description="What the model answered, as the application saw it.")
    correct: bool | None = Field(None, description="label == predicted, when both are given.")
    inputs: dict[str, Any] | None = Field(None, description="The inputs, when the application sends them (a labeled sample).")
    prediction_id: str | None = Field(None, description="Id of the prediction this label is for (the predict answer's id), when the application sends it.")


class EventRecord(_Record):
    kind: Literal["event"] = "event"
    name: str = Field(description="Machine-readable event name, e.g. agent_started, model_loaded, model_load_failed, bad_message.")
    level: Literal["debug", "info", "warning", "error"] = "info"
    message: str = ""
    data: dict[str, Any] = Field(default_factory=dict)


class ShadowLatency(_Message):
    mean: float | None
    p95: float | None


class ShadowRecord(_Record):
    """Shadow-mode statistics since the previous shadow record."""

    kind: Literal["shadow"] = "shadow"
    model: str = Field(description="The active (serving) model.")
    version: str
    shadow_model: str
    shadow_version: str
    compared: int = Field(description="Predictions run by both models in this interval.")
    top1_agreement: float | None = Field(description="Share of compared predictions whose top-1 class matched.")
    mean_abs_diff: float | None = Field(description="Mean absolute difference of the first outputs.")
    latency_us_primary: ShadowLatency
    latency_us_shadow: ShadowLatency
    errors: int = Field(description="Shadow runs that failed.")
    skipped: int = Field(description="Sampled predictions not compared because the shadow was busy.")


TelemetryRecord = Annotated[
    PredictionRecord | SampleRecord | MetricsRecord | EventRecord | ShadowRecord | FeedbackRecord,
    Field(discriminator="kind"),
]


class TelemetryBatch(_Message):
    """Payload of ``edgeml/v1/{fleet}/{device}/telemetry`` (QoS 1, not retained)."""

    v: Literal[1] = PROTOCOL_VERSION
    fleet: str
    device: str
    stream: str = Field(description="Id of the device's record stream; changes only when the data dir is wiped. Deduplicate on (device, stream, seq).")
    sent_at: float = Field(description="When this batch was first published (Unix seconds). A resent batch carries a newer value.")
    records: list[TelemetryRecord] = Field(min_length=1, description="Records in seq order.")


class Status(_Message):
    """Payload of ``edgeml/v1/{fleet}/{device}/status`` (QoS 1, retained, also the last will)."""

    v: Literal[1] = PROTOCOL_VERSION
    device: str
    state: Literal["online", "offline"]
    ts: float = Field(description="Unix seconds. For the last will: the time of the connection it belongs to.")
    reason: Literal["connected", "shutdown", "connection_lost"]
    agent_version: str
    stream: str


class ModelRef(_Message):
    name: str
    version: str
    url: str | None = None
    sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")
    size: int | None = Field(None, ge=0)


class DesiredState(_Message):
    """Payload of ``edgeml/v1/{fleet}/{device}/desired`` (QoS 1, retained; written by the coordinator only)."""

    v: Literal[1] = PROTOCOL_VERSION
    fleet: str | None = Field(None, description="The device this document is for; an agent rejects a document for another device.")
    device: str | None = None
    revision: int = Field(ge=1, description="Grows with every change; the agent ignores a revision not newer than the last one applied.")
    issued_at: float
    expires_at: float | None = None
    model: ModelRef | None = None
    shadow: ModelRef | None = None
    key_id: str | None = Field(None, description="Id of the signing key: first 16 hex characters of the sha256 of the raw ed25519 public key.")
    signature: str | None = Field(None, description="ed25519 signature (base64) over the canonical document without this field (sorted keys, no whitespace, UTF-8; key_id included).")


class ModelSlot(_Message):
    """A model on the device: what the A/B pointer records."""

    name: str
    version: str
    sha256: str
    size: int
    engine: str


class UpdateStatus(_Message):
    state: Literal["idle", "downloading", "verifying", "installing", "switching", "probation", "rolling_back"]
    revision: int | None = Field(None, description="Desired revision being (or last) worked on.")
    target: ModelRef | None = None
    result: Literal["success", "rejected", "failed", "rolled_back"] | None = Field(
        None, description="Outcome of the last finished update (null while one runs)."
    )
    reason: str | None = Field(None, description="Why it was rejected, failed or rolled back.")
    started_at: float | None = None
    updated_at: float | None = None


class Rejection(_Message):
    """A desired document, or a shadow model, refused before any update started."""

    reason: str = Field(description="Machine-readable: replayed, expired, wrong_device, a signature reason, ...")
    message: str = Field(description="What was wrong, for people.")
    revision: int | None = Field(description="The refused document's revision (null for a shadow model).")
    ts: float = Field(description="When it was refused: Unix time in seconds.")
    shadow: bool = Field(False, description="True when the refused part was the shadow model.")


class ReportedState(_Message):
    """Payload of ``edgeml/v1/{fleet}/{device}/state`` (QoS 1, retained): what the device runs."""

    v: Literal[1] = PROTOCOL_VERSION
    fleet: str
    device: str
    ts: float
    applied_revision: int | None = Field(None, description="Highest desired revision the device has acted on.")
    active: ModelSlot | None = None
    previous: ModelSlot | None = Field(None, description="The rollback target.")
    update: UpdateStatus
    last_rejection: Rejection | None = Field(None, description="The last refusal since the agent started.")
    hardware_profile: str | None = None


#: Every message type, by the topic leaf it travels on.
MESSAGES: dict[str, type[BaseModel]] = {
    "telemetry": TelemetryBatch,
    "status": Status,
    "desired": DesiredState,
    "state": ReportedState,
}
