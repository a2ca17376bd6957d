"""schemathesis against ``/openapi.json`` of a real coordinator (Mosquitto, SQLite, a signing
key, a registered model, devices), mostly as admin so every route is reached.

Property: no request the schema allows (or nearly allows) makes the API answer 5xx, and
every error is the JSON ``{"detail", "error"}`` of ``cloud/api/_errors.py``. Budget:
``EDGEML_FUZZ_EXAMPLES // 12`` examples per operation (10 by default), mostly as admin,
some as a viewer, without a token and with a forged one.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error

from cloud import Coordinator
from cloud.tokens import Role, Tokens
from edgeml._testing import models as modelgen

from .._stores import cloud_db
from ..cloud.test_coordinator import cloud_config
from ..conftest import Broker, wait_until
from ._fuzz import DERANDOMIZE, EXAMPLES

#: A stream answers for up to 30 s: not something to fuzz request by request.
SLOW_ROUTES = ["/v1/stream"]
#: Starts a real training run (torch) in the background: not something to fire hundreds of.
HEAVY = [("POST", "/v1/training/runs")]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str, str]]:
    tmp = tmp_path_factory.mktemp("openapi")
    broker = Broker(tmp / "broker")
    db = cloud_db(tmp)
    try:
        with Coordinator(cloud_config(tmp, db, broker)) as c:
            wait_until(lambda: c.desired.is_leader, timeout=10, what="leadership")
            admin, _ = Tokens(c.store).create("fuzz-admin-7f3", Role.ADMIN)
            viewer, _ = Tokens(c.store).create("fuzz-viewer-7f3", Role.VIEWER)
            headers = {"Authorization": f"Bearer {admin}"}
            model = modelgen.build_onnx_mlp(tmp / "mlp.onnx")
            with httpx.Client(base_url=c.url, headers=headers, timeout=30) as http, model.open("rb") as fh:
                r = http.post("/v1/models", data={"name": "mlp", "version": "1.0.0"}, files={"file": ("m.onnx", fh)})
                assert r.status_code == 201, r.text
                for dev in ("dev-1", "dev-2"):
                    assert http.put(f"/v1/devices/default/{dev}", json={"tags": {"env": "prod"}}).status_code == 201
            yield c.url, admin, viewer
    finally:
        broker.stop()


@pytest.fixture(scope="module")
def api_schema(served: tuple[str, str, str]) -> Any:
    url = served[0]
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json").exclude(path=SLOW_ROUTES)
    for method, path in HEAVY:
        schema = schema.exclude(method=method, path=path)
    return schema


def test_no_request_makes_the_api_fail(api_schema: Any, served: tuple[str, str, str]) -> None:
    """Every operation in turn, each with its own bounded Hypothesis run (the schemathesis
    pytest plugin's lazy loader does not run under this pytest, so the loop is ours)."""
    _, admin, viewer = served
    callers = {"admin": {"Authorization": f"Bearer {admin}"}, "viewer": {"Authorization": f"Bearer {viewer}"},
               "nobody": {}, "forged": {"Authorization": "Bearer edgeml_forged"}}
    seen: dict[str, set[int]] = {}
    spent: dict[str, float] = {}

    def fuzz(operation: Any, name: str) -> Any:
        @given(case=operation.as_strategy(), who=st.sampled_from(["admin", "admin", "admin", "viewer", "nobody",
                                                                   "forged"]))
        @settings(max_examples=max(5, EXAMPLES // 12), deadline=None, database=None, derandomize=DERANDOMIZE,
                  suppress_health_check=list(HealthCheck))
        def call(case: Any, who: str) -> None:
            response = case.call_and_validate(headers=callers[who], checks=[not_a_server_error])
            seen.setdefault(name, set()).add(response.status_code)
            if response.status_code >= 400 and "json" in response.headers.get("content-type", ""):
                body = response.json()
                assert isinstance(body, dict) and "detail" in body, response.text

        return call

    for result in api_schema.get_all_operations():
        operation = result.ok()
        name = f"{operation.method.upper()} {operation.path}"
        call = fuzz(operation, name)
        t0 = time.perf_counter()
        call()
        spent[name] = time.perf_counter() - t0
    print("seconds per operation:", sorted(((round(v, 2), k) for k, v in spent.items()), reverse=True)[:8])
    assert len(seen) >= 20, sorted(seen)
    assert any(code < 400 for codes in seen.values() for code in codes)  # it got through, not only 4xx


def test_the_schema_reached_the_routes_that_change_things(api_schema: Any) -> None:
    operations = {f"{op.ok().method.upper()} {op.ok().path}" for op in api_schema.get_all_operations()}
    for expected in ("POST /v1/rollouts", "PUT /v1/devices/{fleet}/{device}/desired", "POST /v1/models",
                     "PUT /v1/models/{name}/aliases/{alias}", "POST /v1/tokens", "GET /v1/audit"):
        assert expected in operations
    assert "GET /v1/stream" not in operations and "POST /v1/training/runs" not in operations
