"""Checks on decoded JSON values that both stores share."""

from __future__ import annotations

from typing import Any


def has_nul(value: Any) -> bool:
    """Whether a string anywhere in ``value`` (keys included) holds U+0000."""
    if type(value) is str:
        return "\x00" in value
    if type(value) is dict:
        return any("\x00" in k or has_nul(v) for k, v in value.items())
    if type(value) is list:
        return any(has_nul(v) for v in value)
    return False
