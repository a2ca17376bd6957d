"""Which devices a rollout targets, and which of them are in the canary cohort.

A selector is a small string, parsed once:

* ``env=prod,site=lyon``: every tag must match (``k=v``, comma-separated: AND);
* ``hw=jetson-nano``: the hardware profile (combine with tags: ``hw=pi4,env=prod``);
* ``devices=dev-1;dev-2``: an explicit list;
* ``all``: every device of the fleet.

Assignment is consistent: a device's bucket is ``sha256(device_id + salt) mod 10000``,
and the cohort of a step of ``p`` percent is ``bucket < p * 100``. Growing steps only
add devices; a device never leaves the cohort it joined; another rollout (another
salt) draws other devices.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field

from .._exceptions import PolicyError
from ..store import Device

BUCKETS = 10_000


@dataclass(frozen=True, slots=True)
class Selector:
    tags: dict[str, str] = field(default_factory=dict)
    hardware_profile: str | None = None
    devices: frozenset[str] | None = None
    text: str = "all"

    def matches(self, device: Device) -> bool:
        if self.devices is not None and device.device_id not in self.devices:
            return False
        if self.hardware_profile is not None and device.hardware_profile != self.hardware_profile:
            return False
        return all(str(device.tags.get(k)) == v for k, v in self.tags.items())

    def select(self, devices: Iterable[Device]) -> list[Device]:
        return [d for d in devices if self.matches(d)]


def parse_selector(text: str) -> Selector:
    text = text.strip()
    if text in ("", "all", "*"):
        return Selector(text="all")
    tags: dict[str, str] = {}
    hw: str | None = None
    devices: frozenset[str] | None = None
    for part in text.split(","):
        key, sep, value = part.strip().partition("=")
        if not sep or not key or not value:
            raise PolicyError(f"selector {text!r}: {part!r} is not key=value")
        if key in ("hw", "hardware_profile"):
            hw = value
        elif key == "devices":
            devices = frozenset(v for v in value.split(";") if v)
        else:
            tags[key] = value
    return Selector(tags=tags, hardware_profile=hw, devices=devices, text=text)


def bucket(device_id: str, salt: str) -> int:
    """The device's bucket in [0, 10000) for this salt."""
    digest = hashlib.sha256((device_id + salt).encode()).digest()
    return int.from_bytes(digest[:8], "big") % BUCKETS


def in_cohort(bucket_: int, percent: float) -> bool:
    return bucket_ < round(percent * 100)
