"""Checks that what the agent really sends is all in docs/protocol.md.

The message models allow extra fields (consumers must ignore what they do not know),
so validating a payload alone would accept a field the agent sends but the protocol
never names. :func:`undocumented` lists those, by path.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel


def undocumented(message: Any, path: str = "") -> list[str]:
    """Paths of the fields of a validated message (and its nested messages) that its
    model does not declare. Free-form dicts (``data``, ``metrics``) are not descended."""
    if isinstance(message, BaseModel):
        found = [f"{path}.{key}" for key in message.model_extra or {}]
        for name in type(message).model_fields:
            found += undocumented(getattr(message, name), f"{path}.{name}")
        return found
    if isinstance(message, list | tuple):
        return [p for i, item in enumerate(message) for p in undocumented(item, f"{path}[{i}]")]
    return []
