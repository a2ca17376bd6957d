"""Domain errors -> HTTP responses, in this one place.

Handlers raise the cloud's own exceptions; :func:`install_error_handlers` turns them
into ``{"detail": "...", "error": "ClassName"}`` with the status below (the first class
that matches wins, so subclasses come first). A 503 of a transient error carries
``Retry-After``. :class:`NotLeader` is 409, not 503: retrying the same replica does not
help until it wins an election; send the request to the leader. Request validation
errors (a missing form field, a query parameter of the wrong type) are bad input: 400,
not FastAPI's 422, which is kept for a model file that is not a valid model.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from .._exceptions import (
    ArtifactError,
    ArtifactNotFound,
    CloudError,
    Conflict,
    InvalidDigest,
    InvalidInput,
    InvalidModel,
    InvalidTransition,
    NotFound,
    NotLeader,
    PolicyError,
    PublishError,
    RangeNotSatisfiable,
    SigningKeyMissing,
    StoreError,
    Unstorable,
)

#: (error class, HTTP status), most specific first.
STATUS: tuple[tuple[type[CloudError], int], ...] = (
    (NotFound, 404),
    (NotLeader, 409),  # not a retry here: the request belongs on the leader replica
    (ArtifactNotFound, 404),
    (Conflict, 409),
    (InvalidModel, 422),
    (PolicyError, 400),  # rollouts: a bad policy or selector
    (InvalidTransition, 409),  # rollouts: the action does not fit the rollout's state
    (InvalidInput, 400),
    (Unstorable, 400),  # before StoreError: bad input, not a database outage
    (InvalidDigest, 400),
    (RangeNotSatisfiable, 416),
    (PublishError, 503),  # the broker is down: the document is stored, retry to publish it
    (SigningKeyMissing, 503),  # configuration: desired states must be signed
    (StoreError, 503),  # transient: the database is down or locked; retry
    (ArtifactError, 503),
    (CloudError, 500),
)


def status_of(exc: CloudError) -> int:
    return next(code for cls, code in STATUS if isinstance(exc, cls))


def _error(status: int, exc: Exception, detail: str) -> JSONResponse:
    retry = status == 503 and getattr(exc, "transient", False)
    headers = {"Retry-After": "5"} if retry else None
    return JSONResponse({"detail": detail, "error": type(exc).__name__}, status_code=status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(CloudError)
    async def cloud_error(request: Request, exc: CloudError) -> JSONResponse:
        return _error(status_of(exc), exc, str(exc))

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err.get("loc", ()) if p not in ("body", "query", "path"))
            parts.append(f"{where}: {err.get('msg')}" if where else str(err.get("msg")))
        return _error(400, exc, "; ".join(parts) or "bad request")
