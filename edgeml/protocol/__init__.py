"""The edgeml MQTT wire protocol (version 1), shared by the agent and the coordinator.

See docs/protocol.md for the specification; it embeds the JSON schemas of these models.
"""

from ._messages import (
    MESSAGES,
    DesiredState,
    EventRecord,
    FeedbackRecord,
    MetricsRecord,
    ModelRef,
    ModelSlot,
    OutputSummary,
    PredictionRecord,
    ReportedState,
    SampleRecord,
    ShadowRecord,
    Status,
    TelemetryBatch,
    TelemetryRecord,
    UpdateStatus,
)
from ._topics import (
    DESIRED,
    PROTOCOL_VERSION,
    STATE,
    STATUS,
    TELEMETRY,
    TOPIC_ROOT,
    Topics,
    check_id,
    fleet_filter,
    parse_topic,
)

__all__ = [
    "DESIRED",
    "MESSAGES",
    "PROTOCOL_VERSION",
    "STATE",
    "STATUS",
    "TELEMETRY",
    "TOPIC_ROOT",
    "DesiredState",
    "EventRecord",
    "FeedbackRecord",
    "MetricsRecord",
    "ModelRef",
    "ModelSlot",
    "OutputSummary",
    "PredictionRecord",
    "ReportedState",
    "SampleRecord",
    "ShadowRecord",
    "Status",
    "TelemetryBatch",
    "TelemetryRecord",
    "UpdateStatus",
    "Topics",
    "check_id",
    "fleet_filter",
    "parse_topic",
]
