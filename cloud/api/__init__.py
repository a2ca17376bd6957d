"""The coordinator's REST API (FastAPI; OpenAPI at ``/openapi.json``, docs at ``/docs``).

    app = create_app(store, registry, artifacts, ingestor=ingestor)

Routes: ``/v1/devices`` (list, show with ingestion counters, ``PUT`` to pre-register),
``/v1/devices/{fleet}/{device}/telemetry``, ``/v1/events``, ``/v1/models`` (upload,
list, show ``name@version`` or ``name@alias``, aliases), ``/v1/artifacts/{sha256}``
(Range downloads and ``.sig``), ``/v1/health`` and ``/metrics``, ``/v1/tokens``,
``/v1/audit`` and ``/v1/auth/me`` (``_auth``: roles on every route); the coordinator mounts
``/v1/devices/{fleet}/{device}/desired`` (``_desired``). Domain errors become HTTP
statuses in ``_errors`` only.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, FastAPI, Response

from ..artifacts import ArtifactStore, artifact_router
from ._auth import Authenticator, install_auth
from ._errors import install_error_handlers, status_of
from ._metrics import CONTENT_TYPE_LATEST, metrics_registry, render
from ._routes import device_json, device_router, model_router

if TYPE_CHECKING:
    from ..ingest import Ingestor
    from ..registry.models import ModelRegistry
    from ..store import Store

__all__ = ["create_app", "device_json", "status_of"]

log = logging.getLogger(__name__)


def create_app(
    store: Store, registry: ModelRegistry, artifacts: ArtifactStore, *, ingestor: Ingestor | None = None,
    max_upload_bytes: int = 1 << 30, metrics: bool = True, lag_window_s: float = 300.0,
    routers: Sequence[APIRouter] = (), auth_required: bool = False,
) -> FastAPI:
    """The API over a store, a model registry and an artifact store.

    ``routers``: more routes mounted as they are, e.g. desired states (see the hook in
    :mod:`cloud.coordinator`); they raise domain errors and get the same translation.
    Every route, these included, checks the caller's token and role (``_auth``); while no
    token exists and ``auth_required`` is false the API is open (a warning is logged).
    """
    app = FastAPI(title="edgeml coordinator", version=_version(), openapi_url="/openapi.json")
    install_error_handlers(app)
    auth = Authenticator(store, required=auth_required)
    install_auth(app, auth)  # first: the role check applies to every route added after it
    if not auth.enforced():
        log.warning("no API token exists and auth.required is false: every request is admin "
                    "(create one with: edgeml tokens create --name NAME --role admin)")
    app.include_router(device_router(store))
    app.include_router(model_router(registry, max_upload_bytes))
    app.include_router(artifact_router(artifacts), tags=["artifacts"])
    for router in routers:
        app.include_router(router)

    @app.get("/v1/health", tags=["coordinator"])
    def health() -> dict[str, Any]:
        """Liveness and what this coordinator is connected to."""
        return {
            "status": "ok",
            "store": store.dialect,
            "broker_connected": bool(ingestor and ingestor.subscribed.is_set()),
            "signing_key_id": registry.key_id,
        }

    if metrics:
        prometheus = metrics_registry(store, ingestor, lag_window_s=lag_window_s)

        @app.get("/metrics", tags=["coordinator"], response_class=Response)
        def metrics_text() -> Response:
            """Prometheus text exposition."""
            return Response(render(prometheus), media_type=CONTENT_TYPE_LATEST)

    return app


def _version() -> str:
    from edgeml import __version__

    return __version__
