"""REST routes of desired states: thin over :class:`~cloud._desired_states.DesiredStates`.

``GET /v1/devices/{fleet}/{device}/desired``: the current signed document (404 if none).
``PUT`` the same path with ``{"model": "name@version|alias" | null, "shadow": ... | null,
"expires_in": seconds | null}``: issue the next revision; answers the signed document.
Statuses (see ``_errors``): 400 bad input, 404 unknown model (or device, with
``ingest.policy: preregistered``), 409 not the leader, 503 broker down or no signing key.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field

from .._desired_states import DesiredStates


class DesiredIn(BaseModel):
    """What to run on a device: model references, resolved through the registry."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(description="name@version or name@alias; null: no model")
    shadow: str | None = Field(None, description="a model run beside it on the same inputs, or null")
    expires_in: int | None = Field(None, gt=0, description="seconds until the document expires; null: never")
    if_revision: int | None = Field(None, ge=0, description="only if the device's current revision is this one "
                                    "(0: none yet), else 409: a read-modify-write never overwrites a newer document")


def desired_router(states: DesiredStates) -> APIRouter:
    router = APIRouter(tags=["desired states"])

    @router.get("/v1/devices/{fleet}/{device}/desired")
    def show_desired(fleet: str, device: str) -> dict[str, Any]:
        """The device's current signed desired state, as published (retained) to it."""
        return states.show(fleet, device)

    @router.put("/v1/devices/{fleet}/{device}/desired")
    def set_desired(fleet: str, device: str, body: DesiredIn) -> dict[str, Any]:
        """Issue the device's next desired state (revision + 1), sign, store and publish it.

        Only the leader replica writes (409 elsewhere). A 503 after the document was
        stored means the broker did not take it: retry, or a new leader republishes it."""
        return states.deploy(fleet, device, body.model, body.shadow, body.expires_in, if_revision=body.if_revision)

    return router
