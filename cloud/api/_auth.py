"""Who may call which route: API tokens and roles, checked on every route, and the audit of changes.

:func:`install_auth` puts one dependency on the whole app, so a router mounted later is
covered too. The role a route needs is decided, first match wins, by:

1. ``openapi_extra={"x-edgeml-role": "open" | "viewer" | "operator" | "admin"}`` on the route;
2. :data:`RULES`: ``/v1/health``, ``/metrics``, the console's static files and artifact
   downloads (content-addressed and signed) are open; ``/v1/tokens`` needs admin;
3. the method: ``GET``/``HEAD``/``OPTIONS`` need viewer, every other method operator.

A token comes as ``Authorization: Bearer <token>`` or, on ``GET`` only (an EventSource
cannot set headers), as ``?access_token=<token>``. 401 without a token or with an
unknown or revoked one (``WWW-Authenticate: Bearer``), 403 with a role too weak; the
body is ``{"detail", "error"}`` like every error (see ``_errors``).

Open mode: while no token was ever created and ``auth.required`` is false, every request
is ``anonymous`` with the admin role (``create_app`` logs a warning). The first token
created (CLI or API) turns enforcement on; revoking every token does not turn it off.

Every request that is not a read (any method but GET/HEAD/OPTIONS) is written to the
audit log, allowed or not: the actor (token name, or ``anonymous``), its role, the
route's name as action, and the method, path and status in the evidence.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPBearer
from pydantic import BaseModel, ConfigDict, Field

from .._exceptions import CloudError
from ..tokens import (
    ANONYMOUS,
    AuthError,
    Forbidden,
    Identity,
    Role,
    Tokens,
    Unauthorized,
    audit,
    audit_entries,
)
from ._errors import status_of

if TYPE_CHECKING:
    from ..store import Store

log = logging.getLogger(__name__)

__all__ = ["RULES", "Authenticator", "install_auth", "required_role"]

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
ROLE_KEY = "x-edgeml-role"
#: (methods or None for any, path, role or None for open). A path ending in "/" is a
#: prefix; otherwise it matches itself and what lies below it.
RULES: tuple[tuple[frozenset[str] | None, str, Role | None], ...] = (
    (None, "/v1/health", None),
    (None, "/metrics", None),
    (frozenset({"GET", "HEAD"}), "/v1/artifacts/", None),
    (frozenset({"GET", "HEAD"}), "/console", None),
    (None, "/v1/tokens", Role.ADMIN),
)


def _matches(path: str, rule: str) -> bool:
    if rule.endswith("/"):
        return path.startswith(rule)
    return path == rule or path.startswith(rule + "/")


def required_role(method: str, path: str, route: Any = None) -> Role | None:
    """The role a request needs (None: open). ``path`` is the route's template."""
    extra = getattr(route, "openapi_extra", None) or {}
    if ROLE_KEY in extra:
        return None if extra[ROLE_KEY] == "open" else Role.parse(extra[ROLE_KEY])
    for methods, prefix, role in RULES:
        if (methods is None or method in methods) and _matches(path, prefix):
            return role
    return Role.VIEWER if method in SAFE_METHODS else Role.OPERATOR


class Authenticator:
    """Tokens of a store, and whether they are enforced (a token exists, or ``required``)."""

    def __init__(self, store: Store, *, required: bool = False) -> None:
        self.tokens = Tokens(store)
        self.store = store
        self.required = required
        self._enforced = required
        self._lock = threading.Lock()

    def enforced(self) -> bool:
        """True once a token exists (never goes back: revoking every token keeps the API closed)."""
        if not self._enforced and self.tokens.any():
            with self._lock:
                self._enforced = True
        return self._enforced

    def authenticate(self, request: Request) -> Identity:
        """The caller's identity; raises :class:`Unauthorized`."""
        header = request.headers.get("authorization")
        query = request.query_params.get("access_token")
        if query is not None and request.method != "GET":
            raise Unauthorized("access_token in the URL is accepted on GET only; send Authorization: Bearer <token>")
        secret = None
        if header is not None:
            scheme, _, value = header.partition(" ")
            if scheme.lower() != "bearer" or not value.strip():
                raise Unauthorized("the Authorization header must be 'Bearer <token>'")
            secret = value.strip()
        elif query:
            secret = query
        if not self.enforced():
            return ANONYMOUS
        if secret is None:
            raise Unauthorized("a token is needed: send Authorization: Bearer <token> (edgeml tokens create)")
        found = self.tokens.lookup(secret)
        if found is None:
            raise Unauthorized("unknown token")
        identity, revoked_at = found
        if revoked_at is not None:
            raise Unauthorized(f"token {identity.name!r} was revoked")
        return identity

    def record(self, request: Request, actor: str, role: str | None, status: int, detail: str) -> None:
        """Audit one change request; a failing audit write is logged, never turned into an answer."""
        route = request.scope.get("route")
        action = getattr(route, "name", None) or "unmatched"
        path = getattr(route, "path", request.url.path)
        evidence = {"method": request.method, "path": request.url.path, "route": path, "status": status}
        try:
            with self.store.transaction(write=True) as tx:
                audit(tx, actor, role, action, detail, evidence, rollout_id=request.path_params.get("rollout_id"))
        except CloudError as exc:
            log.error("audit entry of %s %s by %s not written: %s", request.method, request.url.path, actor, exc)


def _auth_error(request: Request, exc: Exception) -> JSONResponse:
    status = 401 if isinstance(exc, Unauthorized) else 403
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse({"detail": str(exc), "error": type(exc).__name__}, status_code=status, headers=headers)


def _status(exc: BaseException) -> int:
    if isinstance(exc, CloudError):
        return status_of(exc)
    if isinstance(exc, RequestValidationError):
        return 400
    return getattr(exc, "status_code", 500)


def install_auth(app: FastAPI, auth: Authenticator) -> None:
    """Check the role on every route of ``app`` (present and future), audit changes, mount
    ``/v1/tokens`` (admin), ``/v1/audit`` and ``/v1/auth/me`` (viewer)."""
    bearer = HTTPBearer(auto_error=False, description="an API token (edgeml tokens create)")

    def authorize(request: Request, _: Any = Depends(bearer)) -> Iterator[Identity | None]:  # noqa: B008
        route = request.scope.get("route")
        needed = required_role(request.method, getattr(route, "path", request.url.path), route)
        if needed is None:
            yield None
            return
        change = request.method not in SAFE_METHODS
        actor, role = "unauthenticated", None
        try:
            identity = auth.authenticate(request)
            actor, role = identity.name, str(identity.role)
            if identity.role < needed:
                raise Forbidden(f"{request.method} {getattr(route, 'path', request.url.path)} needs the {needed} "
                                f"role; token {identity.name!r} is {identity.role}")
        except AuthError as exc:
            if change:
                auth.record(request, actor, role, 401 if isinstance(exc, Unauthorized) else 403, f"denied: {exc}")
            raise
        request.state.identity = identity
        if not change:
            yield identity
            return
        try:
            yield identity
        except BaseException as exc:
            auth.record(request, actor, role, _status(exc), f"failed: {type(exc).__name__}: {exc}"[:500])
            raise
        auth.record(request, actor, role, 200, "done")

    app.router.dependencies.append(Depends(authorize))
    app.add_exception_handler(AuthError, _auth_error)  # before CloudError's handler: MRO lookup
    app.include_router(_auth_router(auth))


class TokenIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=64)
    role: str = Field(description="viewer, operator or admin")


def _identity(request: Request) -> Identity:
    return getattr(request.state, "identity", ANONYMOUS)


def _auth_router(auth: Authenticator) -> APIRouter:
    router = APIRouter(tags=["auth"])

    @router.get("/v1/auth/me")
    def whoami(request: Request) -> dict[str, Any]:
        """The caller's token name and role (``anonymous``/admin while the API is open)."""
        identity = _identity(request)
        return {"name": identity.name, "role": str(identity.role), "enforced": auth.enforced()}

    @router.get("/v1/tokens")
    def list_tokens() -> list[dict[str, Any]]:
        """Every token ever created (never the secret): name, role, creator, revocation."""
        return [t.as_json() for t in auth.tokens.list()]

    @router.post("/v1/tokens", status_code=201)
    def create_token(body: TokenIn, request: Request) -> dict[str, Any]:
        """A new token; the answer holds its secret, shown this once."""
        secret, record = auth.tokens.create(body.name, Role.parse(body.role), actor=_identity(request))
        return {**record.as_json(), "token": secret}

    @router.delete("/v1/tokens/{name}")
    def revoke_token(name: str, request: Request) -> dict[str, Any]:
        """Revoke a token at once."""
        return auth.tokens.revoke(name, actor=_identity(request)).as_json()

    @router.get("/v1/audit")
    def audit_log(
        actor: str | None = None, action: str | None = None, rollout_id: str | None = None,
        since: float | None = None, until: float | None = None,
        limit: Annotated[int, Query(ge=1, le=10_000)] = 100,
    ) -> list[dict[str, Any]]:
        """The audit log, newest first: rollout actions and every change made through the API,
        each with its actor and role; filter by exact actor, action, rollout and time range."""
        return audit_entries(auth.store, actor=actor, action=action, rollout_id=rollout_id, since=since,
                             until=until, limit=limit)

    return router

