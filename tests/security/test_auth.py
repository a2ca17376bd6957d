"""REST API tokens and roles on a real coordinator (real Mosquitto, SQLite, uvicorn, ONNX models).

A viewer cannot start a rollout and an operator can, both attempts audited with their actor;
invalid and revoked tokens are 401; ``?access_token=`` works on GET only; routes mounted
later are covered by default; tokens are stored as sha256 only (SQLite and PostgreSQL).
"""

from __future__ import annotations

import hashlib
import json
import logging
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import APIRouter

from cloud import Coordinator, Store
from cloud._exceptions import Conflict, InvalidInput, NotFound
from cloud.api import create_app
from cloud.api._auth import required_role
from cloud.artifacts import ArtifactStore
from cloud.client import CloudClient, CoordinatorError
from cloud.registry.models import ModelRegistry
from cloud.tokens import Identity, Role, Tokens, audit_entries
from edgeml.cli import main

from .._stores import cloud_db
from ..cloud.conftest import make_store, store, store_url  # noqa: F401  (fixtures)
from ..cloud.test_coordinator import cloud_config
from ..conftest import Broker, wait_until


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def coordinator(broker: Broker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Coordinator]:
    db = cloud_db(tmp_path)
    monkeypatch.setenv("EDGEML_CLOUD_DB", db)  # `edgeml tokens` opens the same store
    with Coordinator(cloud_config(tmp_path, db, broker)) as c:
        assert wait_until(lambda: c.desired.is_leader, timeout=10, what="leadership")
        yield c


def test_viewer_cannot_start_a_rollout_operator_can_both_audited(
    coordinator: Coordinator, models: dict[str, Path], capsys: pytest.CaptureFixture[str],
) -> None:
    url = coordinator.url
    # open until the first token exists: every request is anonymous admin
    assert httpx.get(f"{url}/v1/auth/me").json() == {"name": "anonymous", "role": "admin", "enforced": False}

    code, out, err = cli(capsys, "tokens", "create", "--name", "root", "--role", "admin")
    assert code == 0, err
    admin = out.strip()
    assert admin.startswith("edgeml_") and "shown only now" in err
    http = httpx.Client(base_url=url, timeout=30)
    r = http.get("/v1/devices")
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert r.json()["error"] == "Unauthorized" and "token is needed" in r.json()["detail"]

    def token(name: str, role: str) -> str:
        r = http.post("/v1/tokens", json={"name": name, "role": role}, headers=bearer(admin))
        assert r.status_code == 201, r.text
        return r.json()["token"]

    viewer, operator = token("vera", "viewer"), token("otto", "operator")
    with models["onnx_float"].open("rb") as fh:
        r = http.post("/v1/models", data={"name": "mlp", "version": "1.0.0"}, files={"file": ("m.onnx", fh)},
                      headers=bearer(operator))
    assert r.status_code == 201, r.text
    sha = r.json()["sha256"]
    for dev in ("dev-1", "dev-2"):
        assert http.put(f"/v1/devices/plant/{dev}", json={"tags": {"env": "prod"}},
                        headers=bearer(operator)).status_code == 201
    assert http.get("/v1/devices?fleet=plant", headers=bearer(viewer)).status_code == 200

    start = {"model": "mlp@1.0.0", "strategy": "canary", "target": "env=prod", "steps": [50, 100],
             "fleet": "plant", "actor": "ui"}
    r = http.post("/v1/rollouts", json=start, headers=bearer(viewer))
    assert r.status_code == 403, r.text
    assert r.json()["error"] == "Forbidden" and "needs the operator role" in r.json()["detail"]
    assert http.get("/v1/rollouts", headers=bearer(viewer)).json() == []  # nothing started
    assert http.post("/v1/rollouts", json={**start, "model": "mlp@9.9.9"}, headers=bearer(operator)).status_code == 404
    r = http.post("/v1/rollouts", json=start, headers=bearer(operator))
    assert r.status_code == 201, r.text
    rollout_id = r.json()["id"]

    entries = http.get("/v1/audit", params={"action": "start_rollout"}, headers=bearer(viewer)).json()
    assert [(e["actor"], e["role"], e["evidence"]["status"]) for e in entries] == [
        ("otto", "operator", 200), ("otto", "operator", 404), ("vera", "viewer", 403)]  # newest first
    assert entries[2]["reason"].startswith("denied:") and entries[0]["reason"] == "done"
    assert entries[1]["reason"].startswith("failed: NotFound")
    assert entries[0]["evidence"]["method"] == "POST" and entries[0]["evidence"]["path"] == "/v1/rollouts"
    # a rollout action by path carries the rollout id in the audit entry
    r = http.post(f"/v1/rollouts/{rollout_id}/pause", json={"actor": "ui"}, headers=bearer(operator))
    assert r.status_code == 200, r.text
    by_rollout = http.get("/v1/audit", params={"rollout_id": rollout_id, "actor": "otto"},
                          headers=bearer(viewer)).json()
    assert [e["action"] for e in by_rollout] == ["act", "pause", "start"]  # the request, then the rollout's own
    # with tokens the rollout's history names the token, whatever the body claims ("ui")
    history = http.get(f"/v1/rollouts/{rollout_id}", headers=bearer(viewer)).json()["audit"]
    assert [(a["action"], a["actor"]) for a in history if a["actor"] != "engine"] == [("start", "otto"),
                                                                                    ("pause", "otto")]
    assert {e["actor"] for e in http.get("/v1/audit", params={"action": "token_create"},
                                          headers=bearer(admin)).json()} == {"cli:" + _user(), "root"}

    # open routes: health, metrics, artifact downloads by devices
    assert http.get("/v1/health").status_code == 200
    assert http.get("/metrics").status_code == 200
    assert http.get(f"/v1/artifacts/{sha}").status_code == 200
    # admin routes: not for an operator
    assert http.get("/v1/tokens", headers=bearer(operator)).status_code == 403
    listed = http.get("/v1/tokens", headers=bearer(admin)).json()
    assert {t["name"]: t["role"] for t in listed} == {"root": "admin", "vera": "viewer", "otto": "operator"}
    assert all("token" not in t and "token_sha256" not in t for t in listed)


def _user() -> str:
    import getpass
    import os

    return os.environ.get("USER") or getpass.getuser()


def test_invalid_and_revoked_tokens_are_401_and_access_token_works_on_get_only(
    coordinator: Coordinator, capsys: pytest.CaptureFixture[str],
) -> None:
    tokens = Tokens(coordinator.store)
    operator, _ = tokens.create("otto", Role.OPERATOR)
    http = httpx.Client(base_url=coordinator.url, timeout=30)
    assert http.get("/v1/devices", headers=bearer(operator)).status_code == 200
    for headers in (bearer("edgeml_not-a-token"), bearer("garbage"), {"Authorization": f"Basic {operator}"},
                    {"Authorization": "Bearer"}):
        r = http.get("/v1/devices", headers=headers)
        assert r.status_code == 401, headers
        assert r.json()["error"] == "Unauthorized"

    # ?access_token= for GET (an EventSource cannot send headers), never for a change
    assert http.get("/v1/devices", params={"access_token": operator}).status_code == 200
    assert http.get("/v1/devices", params={"access_token": "edgeml_wrong"}).status_code == 401
    r = http.put("/v1/devices/plant/dev-9", params={"access_token": operator}, json={})
    assert r.status_code == 401 and "GET only" in r.json()["detail"]
    assert http.put("/v1/devices/plant/dev-9", json={}, headers=bearer(operator)).status_code == 201
    denied = audit_entries(coordinator.store, action="preregister_device")
    assert [(e["actor"], e["evidence"]["status"]) for e in denied] == [("otto", 200), ("unauthenticated", 401)]

    # revoked through the CLI: refused at once, and the API stays closed
    code, out, err = cli(capsys, "tokens", "revoke", "otto")
    assert code == 0 and "revoked" in out, err
    r = http.get("/v1/devices", headers=bearer(operator))
    assert r.status_code == 401 and "revoked" in r.json()["detail"]
    assert http.get("/v1/devices").status_code == 401
    code, out, _ = cli(capsys, "tokens", "list", "--json")
    assert [(t["name"], t["active"]) for t in json.loads(out)] == [("otto", False)]
    code, _, err = cli(capsys, "tokens", "create", "--name", "otto", "--role", "viewer")
    assert code == 1 and "exists" in err  # a revoked name is not reused
    code, _, err = cli(capsys, "tokens", "revoke", "nobody")
    assert code == 1 and "no token" in err


def test_the_cli_and_client_send_edgeml_api_token(
    coordinator: Coordinator, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    viewer, _ = Tokens(coordinator.store).create("vera", Role.VIEWER)
    monkeypatch.setenv("EDGEML_CLOUD_URL", coordinator.url)
    monkeypatch.delenv("EDGEML_API_TOKEN", raising=False)
    code, _, err = cli(capsys, "fleet", "list")
    assert code == 1 and "HTTP 401" in err
    monkeypatch.setenv("EDGEML_API_TOKEN", viewer)
    code, out, err = cli(capsys, "fleet", "list", "--json")
    assert code == 0 and json.loads(out) == [], err
    code, _, err = cli(capsys, "fleet", "register", "dev-1", "--fleet", "plant")
    assert code == 1 and "HTTP 403" in err and "operator" in err
    with CloudClient(coordinator.url) as client, pytest.raises(CoordinatorError) as exc:
        client.preregister("plant", "dev-1")
    assert exc.value.status == 403


# --------------------------------------------------------------------------- the app alone


def serve(app: Any) -> Iterator[httpx.Client]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, access_log=False, lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        thread.join(0.01)
        assert thread.is_alive(), "uvicorn did not start"
    with httpx.Client(base_url=f"http://127.0.0.1:{sock.getsockname()[1]}", timeout=30) as c:
        yield c
    server.should_exit = True
    thread.join(10)
    sock.close()


def later_router() -> APIRouter:
    """Routes another module mounts later, declaring no role at all."""
    router = APIRouter()

    @router.get("/v1/later")
    def read() -> dict[str, str]:
        return {"ok": "read"}

    @router.post("/v1/later")
    def change() -> dict[str, str]:
        return {"ok": "changed"}

    @router.delete("/v1/later/{thing}")
    def remove(thing: str) -> dict[str, str]:
        return {"ok": thing}

    @router.get("/v1/later/public", openapi_extra={"x-edgeml-role": "open"})
    def public() -> dict[str, str]:
        return {"ok": "public"}

    return router


@pytest.fixture
def app_client(store: Store, tmp_path: Path) -> Iterator[httpx.Client]:  # noqa: F811
    artifacts = ArtifactStore(tmp_path / "artifacts")
    app = create_app(store, ModelRegistry(store, artifacts, None), artifacts, routers=[later_router()])
    yield from serve(app)


def test_routes_mounted_later_need_a_role_by_method(app_client: httpx.Client, store: Store) -> None:  # noqa: F811
    assert app_client.post("/v1/later").json() == {"ok": "changed"}  # open mode
    tokens = Tokens(store)
    viewer, _ = tokens.create("vera", Role.VIEWER)
    operator, _ = tokens.create("otto", Role.OPERATOR)
    assert app_client.get("/v1/later").status_code == 401
    assert app_client.get("/v1/later", headers=bearer(viewer)).json() == {"ok": "read"}
    assert app_client.post("/v1/later", headers=bearer(viewer)).status_code == 403
    assert app_client.delete("/v1/later/x", headers=bearer(viewer)).status_code == 403
    assert app_client.delete("/v1/later/x", headers=bearer(operator)).json() == {"ok": "x"}
    assert app_client.get("/v1/later/public").json() == {"ok": "public"}
    assert app_client.post("/v1/tokens", json={"name": "x", "role": "admin"}, headers=bearer(operator)).status_code == 403
    # the first (anonymous) change and the denied ones are in the log with their actors
    log = audit_entries(store, action="change")
    assert [(e["actor"], e["role"], e["evidence"]["status"]) for e in log] == [
        ("vera", "viewer", 403), ("anonymous", "admin", 200)]
    # the OpenAPI document tells clients how to authenticate
    spec = app_client.get("/openapi.json").json()
    assert spec["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"


def test_auth_required_closes_the_api_before_any_token(store: Store, tmp_path: Path,  # noqa: F811
                                                       caplog: pytest.LogCaptureFixture) -> None:
    artifacts = ArtifactStore(tmp_path / "artifacts")
    with caplog.at_level(logging.WARNING, logger="cloud.api"):
        open_app = create_app(store, ModelRegistry(store, artifacts, None), artifacts)
    assert open_app is not None and "every request is admin" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="cloud.api"):
        app = create_app(store, ModelRegistry(store, artifacts, None), artifacts, auth_required=True)
    assert "every request is admin" not in caplog.text
    for client in serve(app):
        assert client.get("/v1/devices").status_code == 401
        assert client.get("/v1/health").status_code == 200
        assert client.get("/v1/auth/me").status_code == 401


def test_tokens_are_stored_hashed_and_audited(store: Store) -> None:  # noqa: F811
    tokens = Tokens(store)
    admin = Identity("root", Role.ADMIN)
    secret, record = tokens.create("ci", "operator", actor=admin)
    assert record.role is Role.OPERATOR and tokens.verify(secret) == Identity("ci", Role.OPERATOR)
    with store.transaction() as tx:
        rows = tx.execute("SELECT name, role, token_sha256, created_by FROM api_tokens").fetchall()
    assert [tuple(r) for r in rows] == [("ci", "operator", hashlib.sha256(secret.encode()).hexdigest(), "root")]
    assert secret not in repr(rows)
    assert tokens.verify(secret + "x") is None and tokens.verify("") is None
    with pytest.raises(Conflict):
        tokens.create("ci", "viewer")
    with pytest.raises(InvalidInput):
        tokens.create("bad name", "viewer")
    with pytest.raises(InvalidInput):
        tokens.create("ok", "root")
    tokens.revoke("ci", actor=admin)
    tokens.revoke("ci", actor=admin)  # idempotent, audited once
    assert tokens.verify(secret) is None and tokens.any()
    with pytest.raises(NotFound):
        tokens.revoke("nobody")
    log = audit_entries(store, actor="root")
    assert [(e["action"], e["role"], e["evidence"]["token"]) for e in log] == [
        ("token_revoke", "admin", "ci"), ("token_create", "admin", "ci")]
    assert audit_entries(store, actor="root", limit=1)[0]["action"] == "token_revoke"
    assert audit_entries(store, since=log[0]["ts"] + 1) == []


@pytest.mark.parametrize(("method", "path", "role"), [
    ("GET", "/v1/devices", Role.VIEWER), ("PUT", "/v1/devices/{fleet}/{device}", Role.OPERATOR),
    ("POST", "/v1/rollouts", Role.OPERATOR), ("POST", "/v1/models", Role.OPERATOR),
    ("PUT", "/v1/devices/{fleet}/{device}/desired", Role.OPERATOR), ("GET", "/v1/audit", Role.VIEWER),
    ("GET", "/v1/tokens", Role.ADMIN), ("DELETE", "/v1/tokens/{name}", Role.ADMIN),
    ("GET", "/v1/health", None), ("GET", "/metrics", None), ("GET", "/v1/artifacts/{sha256}", None),
    ("HEAD", "/v1/artifacts/{sha256}", None), ("POST", "/v1/artifacts/{sha256}", Role.OPERATOR),
    ("GET", "/console/app.js", None), ("POST", "/v1/training/runs", Role.OPERATOR),
])
def test_role_table(method: str, path: str, role: Role | None) -> None:
    assert required_role(method, path) == role
