"""REST routes of rollouts: thin over :class:`cloud.rollouts.RolloutService`.

``POST /v1/rollouts`` starts one (``model``, ``strategy``, ``target``, ``steps``,
``policy`` as a JSON object, ``actor``, ``fleet``, ``reason``); ``GET /v1/rollouts``
lists them; ``GET /v1/rollouts/{id}`` shows one with cohorts, verdicts (evidence) and
its audit log; ``POST /v1/rollouts/{id}/{action}`` with ``{"actor", "reason"}`` for
pause, resume, abort, promote, approve and rollback. Statuses (see ``_errors``): 400 bad
policy or selector, 404 unknown rollout or model, 409 an action the state does not allow.
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from ..rollouts import RolloutService


class RolloutIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="name@version or name@alias")
    strategy: Literal["canary", "phased", "bluegreen", "ab", "shadow"] = "canary"
    target: str = Field("all", description="selector: k=v,hw=PROFILE,devices=a;b or all")
    steps: list[float] | None = None
    policy: dict[str, Any] | None = None
    fleet: str = "default"
    actor: str | None = Field(None, min_length=1, description="open API only: with tokens, the token's name")
    reason: str = ""
    salt: str | None = Field(None, description="fixes the cohorts (default: random per rollout)")


class ActionIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    actor: str | None = Field(None, min_length=1, description="open API only: with tokens, the token's name")
    reason: str = ""


def _actor(request: Request, claimed: str | None) -> str:
    """Who acts: the authenticated token's name; only an open API (no tokens) takes the
    body's word for it (an operator cannot approve in someone else's name)."""
    identity = getattr(request.state, "identity", None)
    if identity is not None and identity.name != "anonymous":
        return str(identity.name)
    return claimed or "anonymous"


def rollout_router(service: RolloutService) -> APIRouter:
    router = APIRouter(tags=["rollouts"])
    actions = {"pause": service.pause, "resume": service.resume, "abort": service.abort,
               "promote": service.promote, "approve": service.approve, "rollback": service.rollback}

    @router.post("/v1/rollouts", status_code=201)
    def start_rollout(body: RolloutIn, request: Request) -> dict[str, Any]:
        return service.start(body.model, body.strategy, body.target, steps=body.steps, policy=body.policy,
                             actor=_actor(request, body.actor), fleet=body.fleet, reason=body.reason, salt=body.salt)

    @router.get("/v1/rollouts")
    def list_rollouts() -> list[dict[str, Any]]:
        return service.list()

    @router.get("/v1/rollouts/{rollout_id}")
    def show_rollout(rollout_id: str) -> dict[str, Any]:
        return service.status(rollout_id)

    @router.post("/v1/rollouts/{rollout_id}/{action}")
    def act(rollout_id: str, action: Literal["pause", "resume", "abort", "promote", "approve", "rollback"],
            body: ActionIn, request: Request) -> dict[str, Any]:
        return actions[action](rollout_id, _actor(request, body.actor), body.reason)

    return router
