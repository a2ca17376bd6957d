"""HIL routes: ``POST /v1/hil/runs`` stores one run (model ``name@version``, scenario,
hardware profile, target, passed, counts, JUnit summary); ``GET /v1/hil/runs?model=name@version``
lists runs, newest first; ``GET /v1/models/{name@version}/hil`` answers the gate's verdict per
(scenario, hardware profile). The domain (records and the gate) is :mod:`cloud.hil`.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Response

from ..hil import HilRunIn, hil_passed, list_runs, record_run, verdicts
from ..registry.models import parse_ref
from ..store import Store


def hil_router(store: Store) -> APIRouter:
    router = APIRouter(tags=["hil"])

    @router.post("/v1/hil/runs", status_code=201)
    def post_run(body: HilRunIn, response: Response) -> dict[str, Any]:
        """Record a HIL run (``edgeml hil run --report``)."""
        return record_run(store, body)

    @router.get("/v1/hil/runs")
    def get_runs(
        model: str | None = Query(None, description="name or name@version"),
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    ) -> list[dict[str, Any]]:
        """Recorded runs, newest first."""
        name, _, version = (model or "").partition("@")
        return list_runs(store, name or None, version or None, limit)

    @router.get("/v1/models/{ref}/hil")
    def model_hil(ref: str) -> dict[str, Any]:
        """The HIL gate's verdict for ``name@version``: overall and per (scenario, profile)."""
        name, version = parse_ref(ref)
        latest = verdicts(store, name, version)
        return {"model": f"{name}@{version}", "passed": hil_passed(store, name, version),
                "suites": [{"scenario": s, "hardware_profile": p, "passed": ok} for (s, p), ok in sorted(latest.items())]}

    return router


__all__ = ["hil_router"]
