"""REST routes of training and drift: thin over :mod:`cloud.training` and :mod:`cloud.drift`.

    POST /v1/training/runs         {"recipe": "sensor-mlp.yaml" | {...inline recipe...},
                                    "parent": "name@version"?, "version": "V"?, "dry_run": false}
                                   -> 202 {"run_id", "status": "running", "url"}; the run trains on a
                                   background thread, one at a time (409 while another runs)
    GET  /v1/training/runs[?name=] every run (newest last), without per-epoch rows
    GET  /v1/training/runs/{id}    one run: recipe, dataset, per-epoch metrics, gate figures, artifacts
    GET  /v1/training/triggers     continuous training's triggers (kind, reason, evidence, outcome)
    POST /v1/training/check        run the continuous-training check now (leader only: 409 elsewhere)
    GET  /v1/drift[?fleet=&model=] the newest drift measurement per model/version/cohort, PSI figures
    POST /v1/drift/measure         measure now (every model seen in the window), store and return

Errors are the cloud's own (see ``_errors``): 400 a bad recipe (the key is named), 404
an unknown recipe file or run, 409 a run already in progress or not the leader, 500
training unavailable (no torch on this coordinator).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from .._exceptions import NotLeader


class RunIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    recipe: str | dict[str, Any] = Field(description="a file name under configs/recipes, or an inline recipe")
    parent: str | None = Field(None, description="name@version the result derives from (lineage)")
    version: str | None = Field(None, description="registry version (default: the next integer)")
    dry_run: bool = Field(False, description="train and record the run, register nothing")


def training_router(service: Any, continuous: Any, monitor: Any) -> APIRouter:
    router = APIRouter(tags=["training"])

    @router.post("/v1/training/runs", status_code=202)
    def start_run(body: RunIn) -> JSONResponse:
        recipe = service.load(body.recipe)
        run_id = service.submit(recipe, parent=body.parent, version=body.version, register=not body.dry_run)
        return JSONResponse({"run_id": run_id, "status": "running", "url": f"/v1/training/runs/{run_id}"},
                            status_code=202, headers={"Location": f"/v1/training/runs/{run_id}"})

    @router.get("/v1/training/runs")
    def list_runs(name: str | None = Query(None)) -> list[dict[str, Any]]:
        return [{k: v for k, v in r.as_json().items() if k != "epochs"} for r in service.list(name)]

    @router.get("/v1/training/runs/{run_id}")
    def show_run(run_id: str) -> dict[str, Any]:
        doc: dict[str, Any] = service.get(run_id).as_json()
        return doc

    @router.get("/v1/training/triggers")
    def list_triggers(model: str | None = Query(None), limit: int = Query(200, ge=1, le=10_000)) -> list[dict[str, Any]]:
        return continuous.triggers(model, limit)

    @router.post("/v1/training/check")
    def check_now() -> list[dict[str, Any]]:
        if not continuous.is_leader():
            raise NotLeader("continuous training runs on the leader replica only; send this to the leader")
        return continuous.check()

    @router.get("/v1/drift")
    def latest_drift(fleet: str | None = Query(None), model: str | None = Query(None)) -> list[dict[str, Any]]:
        return monitor.latest(fleet=fleet, model=model)

    @router.post("/v1/drift/measure")
    def measure_drift(fleet: str | None = Query(None), model: str | None = Query(None)) -> list[dict[str, Any]]:
        return monitor.measure(fleet=fleet, models=None if model is None else [model])

    return router
