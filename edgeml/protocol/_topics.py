"""Topic names of the edgeml MQTT protocol, version 1."""

from __future__ import annotations

import re
from dataclasses import dataclass

PROTOCOL_VERSION = 1
TOPIC_ROOT = f"edgeml/v{PROTOCOL_VERSION}"

#: fleet and device ids: no MQTT wildcards, no slashes, at most 64 characters.
ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")

TELEMETRY = "telemetry"
STATUS = "status"
STATE = "state"
DESIRED = "desired"


def check_id(value: str, what: str = "id") -> str:
    """Return ``value`` if it is a valid fleet or device id, else raise ValueError."""
    if not ID_PATTERN.fullmatch(value):  # not match(): "$" also matches before a final "\n"
        raise ValueError(
            f"{what} {value!r} must be 1-64 characters of letters, digits, '.', '_' or '-' "
            "and start with a letter or digit"
        )
    return value


@dataclass(frozen=True, slots=True)
class Topics:
    """The topics of one device: ``edgeml/v1/{fleet}/{device}/{leaf}``."""

    fleet: str
    device: str

    def __post_init__(self) -> None:
        check_id(self.fleet, "fleet")
        check_id(self.device, "device")

    @property
    def base(self) -> str:
        return f"{TOPIC_ROOT}/{self.fleet}/{self.device}"

    @property
    def telemetry(self) -> str:
        return f"{self.base}/{TELEMETRY}"

    @property
    def status(self) -> str:
        return f"{self.base}/{STATUS}"

    @property
    def state(self) -> str:
        return f"{self.base}/{STATE}"

    @property
    def desired(self) -> str:
        return f"{self.base}/{DESIRED}"


def fleet_filter(leaf: str, fleet: str = "+") -> str:
    """A subscription filter for ``leaf`` on every device of ``fleet`` (default: all fleets)."""
    return f"{TOPIC_ROOT}/{fleet}/+/{leaf}"


def parse_topic(topic: str) -> tuple[str, str, str]:
    """Split a device topic into ``(fleet, device, leaf)``; ValueError if it is not one."""
    parts = topic.split("/")
    if len(parts) != 5 or f"{parts[0]}/{parts[1]}" != TOPIC_ROOT:
        raise ValueError(f"not an edgeml v{PROTOCOL_VERSION} device topic: {topic!r}")
    return parts[2], parts[3], parts[4]
