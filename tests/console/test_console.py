"""The web console in headless Chromium, against a real coordinator with simulated devices.

Every page is loaded and must show the fixture's data (device ids, versions, counts read
back through the REST API), a screenshot of each is saved, and the "Pause" button must
really pause the rollout (its state read back through the REST API).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from cloud._config import CloudConfig
from cloud.coordinator import Coordinator

from .._stores import cloud_db
from ..conftest import wait_until
from .conftest import FLEET, OFFLINE, N, Site


def _open(page: Any, site: Site, path: str) -> None:
    page.goto(site.url + path)
    page.wait_for_function("document.body.dataset.loaded !== undefined")


def _shot(page: Any, shots: Path, name: str) -> None:
    page.wait_for_timeout(300)  # let the last redraw settle
    page.screenshot(path=str(shots / f"{name}.png"), full_page=True)


def _card(page: Any, testid: str) -> str:
    return str(page.locator(f"[data-testid={testid}] .value").inner_text())


def _versions(site: Site) -> dict[str, int]:
    seen: dict[str, int] = {}
    for state in site.reported().values():
        ref = f"{state['active']['name']}@{state['active']['version']}"
        seen[ref] = seen.get(ref, 0) + 1
    return seen


# ---------------------------------------------------------------------- serving
def test_root_redirects_and_the_static_files_need_no_token(site: Site) -> None:
    r = site.http.get("/", follow_redirects=False)
    assert r.status_code in (302, 307) and r.headers["location"] == "/console/"
    for path, kind in (("/console/", "text/html"), ("/console/rollouts/abc", "text/html"),
                       ("/console/static/console.js", "text/javascript"), ("/console/static/console.css", "text/css")):
        r = httpx.get(site.url + path)  # no Authorization header
        assert r.status_code == 200 and r.headers["content-type"].startswith(kind), path
    assert httpx.get(site.url + "/console/static/nope.js").status_code == 404
    html = httpx.get(site.url + "/console/").text
    assert "http://" not in html and "https://" not in html  # nothing fetched from elsewhere


def test_the_stream_pushes_change_notices(site: Site) -> None:
    events: list[tuple[str, dict[str, Any]]] = []
    with httpx.stream("GET", site.url + "/v1/stream", timeout=20) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        name = ""
        for line in r.iter_lines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                events.append((name, orjson.loads(line[6:])))
                if name == "change" and "telemetry" in events[-1][1]["topics"]:
                    break
    assert events[0][0] == "ready" and "rollouts" in events[0][1]["topics"]
    assert events[-1][0] == "change"  # the simulated devices keep sending


# ---------------------------------------------------------------------- pages
def test_fleet_page_shows_the_fleet(site: Site, page: Any, shots: Path) -> None:
    _open(page, site, "/console/")
    devices = site.http.get("/v1/devices", params={"fleet": FLEET}).json()
    online = sum(d["online"] for d in devices)
    assert (len(devices), online) == (N, N - len(OFFLINE))
    wait_until(lambda: _card(page, "online") == str(online), 10, what="the online count")
    assert _card(page, "devices") == str(N) and _card(page, "offline") == str(len(OFFLINE))
    rows = page.locator("#devices tbody tr")
    assert rows.count() == N
    for d in devices:
        row = page.locator(f'#devices tr[data-device="{d["device_id"]}"]')
        assert row.locator("td").nth(2).inner_text() == ("online" if d["online"] else "offline")
    versions = page.locator("[data-testid=versions]").inner_text()
    for ref, count in _versions(site).items():  # e.g. mlp@1.0.0: 9 devices, mlp@1.1.0: 2
        assert ref in versions and f"{count} device" in versions, (ref, versions)
    assert site.running in page.locator("main").inner_text()  # the rollout in progress is listed
    _shot(page, shots, "fleet")

    page.fill("#filter", "1.1.0")  # the filter keeps the canaries only
    canaries = [d for d, s in site.reported().items() if s["active"]["version"] == "1.1.0"]
    wait_until(lambda: rows.count() == len(canaries), 5, what="filtered rows")


def test_device_page_plots_its_telemetry(site: Site, page: Any, shots: Path) -> None:
    canary = sorted(d for d, s in site.reported().items() if s["active"]["version"] == "1.1.0")[0]
    drift = site.http.post("/v1/drift/measure", params={"fleet": FLEET})  # where the coordinator measures drift
    # enough of the canary's predictions ingested to plot (the simulated fleet keeps sending)
    series = f"/v1/console/devices/{FLEET}/{canary}/series"
    wait_until(lambda: site.http.get(series).json()["predictions"] > 50, 30, what="the canary's predictions")
    _open(page, site, f"/console/devices/{FLEET}/{canary}")
    assert canary in page.locator("h1").inner_text()
    assert _card(page, "model") == "mlp@1.1.0"
    assert int(_card(page, "predictions")) > 50
    latency = page.locator("[data-testid=latency] svg")
    assert latency.locator("path").count() >= 2 and latency.locator("circle").count() > 5  # p50 and p95
    assert page.locator("[data-testid=distribution] svg rect").count() >= 2
    events = page.locator("#events").inner_text()
    assert "update_state" in events and "agent_started" in events  # its update history
    if drift.status_code == 200:  # the fleet's drift on 1.1.0 against its training reference
        [d] = [d for d in drift.json() if d["cohort"] == "*" and d["version"] == "1.1.0"]
        shown = _card(page, "training-drift")
        assert shown == (f"{d['psi']:.3f}" if d["psi"] is not None else d["status"].replace("_", " "))
    state = site.http.get(f"/v1/devices/{FLEET}/{canary}").json()["reported_state"]
    assert f'"applied_revision": {state["applied_revision"]}' in page.locator("pre").first.inner_text()
    _shot(page, shots, "device")


def test_models_page_shows_versions_lineage_and_metrics(site: Site, page: Any, shots: Path) -> None:
    drift = site.http.post("/v1/drift/measure", params={"fleet": FLEET})  # where the coordinator measures drift
    _open(page, site, "/console/models")
    models = site.http.get("/v1/models").json()
    assert page.locator("#models tbody tr").count() == len(models) == 4
    graph = page.locator("[data-testid=lineage] svg")
    assert sorted(graph.locator("g.node").evaluate_all("ns => ns.map(n => n.dataset.ref)")) == \
        ["mlp@1.0.0", "mlp@1.1.0", "mlp@1.1.0-int8", "mlp@2.0.0"]
    assert graph.locator("path[marker-end]").count() == 3  # 1.0.0 -> 1.1.0 -> 2.0.0 and 1.1.0 -> 1.1.0-int8
    row = page.locator('#models tr[data-ref="mlp@1.1.0"]').inner_text()
    assert "mlp@1.0.0" in row and "accuracy=0.93" in row and "signed" in row
    running = _versions(site).get("mlp@1.1.0", 0)
    assert re.search(rf"\b{running} \({running} online\)", row), row
    assert "champion" in page.locator('#models tr[data-ref="mlp@1.0.0"]').inner_text()
    if drift.status_code == 200:  # against each version's training reference
        for d in (d for d in drift.json() if d["cohort"] == "*"):
            row = page.locator(f'#drift tr[data-drift="mlp@{d["version"]}"][data-cohort="*"]').inner_text()
            assert d["status"].replace("_", " ") in row
            if d["psi"] is not None:
                assert f"{d['psi']:.4g}" in row
    _shot(page, shots, "models")


def test_rollouts_list_and_a_rolled_back_rollout_with_its_evidence(site: Site, page: Any, shots: Path) -> None:
    _open(page, site, "/console/rollouts")
    assert "rolled_back" in page.locator(f'#rollouts tr[data-rollout="{site.failed}"]').inner_text()
    assert "running" in page.locator(f'#rollouts tr[data-rollout="{site.running}"]').inner_text()
    _shot(page, shots, "rollouts")

    page.click(f'a[href="/console/rollouts/{site.failed}"]')
    page.wait_for_selector("#verdicts .verdict")
    status = site.http.get(f"/v1/rollouts/{site.failed}").json()
    failed = [v for v in status["verdicts"] if v["verdict"] == "fail"]
    assert failed and page.locator("#verdicts .verdict").count() == len(status["verdicts"])
    for verdict in failed:  # e.g. accuracy 55 % against 92 %, or p95 latency +60 %
        card = page.locator(f'#verdicts .verdict[data-gate="{verdict["gate"]}"]')
        assert card.locator(".badge").inner_text() == "fail"
        assert card.locator("svg rect").count() >= 2  # the canary's bar(s) against the baseline's
        assert f"canary {verdict['evidence']['samples']['canary']}" in card.inner_text()
        facts = dict(zip(card.locator("dt").all_inner_texts(), card.locator("dd").all_inner_texts(), strict=True))
        for key in ("p_value", "psi", "p95_growth"):
            if key in verdict["evidence"]:
                assert float(facts[key.replace("_", " ")]) == pytest.approx(verdict["evidence"][key], rel=1e-3)
    assert page.locator("#actions button[data-action=pause]").is_disabled()  # nothing to pause
    assert page.locator("#actions button[data-action=resume]").is_disabled()
    _shot(page, shots, "rollout-rolled-back")


def test_pause_button_pauses_the_rollout(site: Site, page: Any, shots: Path) -> None:
    rid = site.running
    _open(page, site, f"/console/rollouts/{rid}")
    status = site.http.get(f"/v1/rollouts/{rid}").json()
    assert status["state"] == "running"
    cohorts = page.locator("#cohorts").inner_text()
    assert str(status["cohorts"]["canary"]["devices"]) in cohorts
    assert page.locator("[data-testid=cohort-plots] svg circle").count() > 5  # live cohort curves
    _shot(page, shots, "rollout-running")

    page.fill("#actor", "operator-1")
    page.click("#actions button[data-action=pause]")
    paused = site.wait_state(rid, "paused", timeout=10)  # through the REST API, not the page
    assert any(a["action"] == "pause" and a["actor"] == "operator-1" for a in paused["audit"]), paused["audit"]
    page.wait_for_selector("#actions button[data-action=resume]:not([disabled])")
    assert "paused" in page.locator("h1 .badge").inner_text()

    r = site.http.post(f"/v1/rollouts/{rid}/resume", json={"actor": "ana", "reason": "checked"})
    assert r.status_code == 200 and r.json()["state"] == "running"
    # the page hears of it by itself (server-sent events), no reload
    page.wait_for_selector("#actions button[data-action=pause]:not([disabled])", timeout=10_000)
    assert "running" in page.locator("h1 .badge").inner_text()


def test_audit_log_lists_every_decision(site: Site, page: Any, shots: Path) -> None:
    _open(page, site, "/console/audit")
    entries = site.http.get("/v1/audit", params={"limit": 500}).json()
    assert page.locator("#audit tbody tr").count() == len(entries)
    rollback = next(e for e in entries if e["action"] == "rollback")
    assert rollback["rollout_id"] == site.failed and rollback["actor"] == "engine"
    row = page.locator("#audit tbody tr[data-action=rollback]").first.inner_text()
    assert "engine" in row and site.failed in row and rollback["reason"] in row  # "gate(s) failed at step 1: …"
    assert page.locator("#audit tbody tr[data-action=start]").count() == 2
    _shot(page, shots, "audit")


# ---------------------------------------------------------------------- auth and live updates
def test_every_request_carries_the_token(site: Site, page: Any) -> None:
    seen: list[tuple[str, str | None]] = []
    page.on("request", lambda req: seen.append((req.url, req.headers.get("authorization"))))
    _open(page, site, f"/console/rollouts/{site.running}?token=s3cret")
    page.wait_for_function("document.getElementById('live').textContent === 'live'")
    assert "token" not in page.url  # taken out of the address bar, kept in sessionStorage
    assert page.evaluate("sessionStorage.getItem('edgeml.token')") == "s3cret"
    api = [(u, h) for u, h in seen if "/v1/" in u and "/v1/stream" not in u]
    assert len(api) >= 2 and all(h == "Bearer s3cret" for _, h in api), api
    assert any(u.endswith("/v1/stream?access_token=s3cret") for u, _ in seen)
    static = [h for u, h in seen if "/console/static/" in u]
    assert static and not any(static)  # static files are fetched without it


def test_without_the_stream_the_page_polls(site: Site, page: Any) -> None:
    page.route("**/v1/stream*", lambda route: route.abort())
    _open(page, site, "/console/")
    page.wait_for_function("document.getElementById('live').textContent === 'polling'", timeout=15_000)
    first = page.evaluate("document.body.dataset.loaded")
    page.wait_for_function(f"document.body.dataset.loaded !== '{first}'", timeout=15_000)  # refreshed again


def test_with_tokens_enforced_the_pages_load_and_the_data_needs_the_token(browser: Any, tmp_path: Path) -> None:
    pytest.importorskip("cloud.api._auth")  # the API's token auth
    config = CloudConfig(broker_url="mqtt://127.0.0.1:1", db=cloud_db(tmp_path), http_addr="127.0.0.1:0",
                         artifact_dir=tmp_path / "artifacts", broker_wait_s=0.1)
    coordinator = Coordinator(config).start()
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    try:
        http = httpx.Client(base_url=coordinator.url)
        admin = http.post("/v1/tokens", json={"name": "admin-1", "role": "admin"}).json()["token"]  # enforced now
        headers = {"Authorization": f"Bearer {admin}"}
        viewer = http.post("/v1/tokens", json={"name": "viewer-1", "role": "viewer"}, headers=headers).json()["token"]
        assert http.put("/v1/devices/plant/press-7", json={"tags": {}}, headers=headers).status_code == 201
        assert http.get("/v1/console/overview").status_code == 401
        assert http.get("/console/").status_code == 200 and http.get("/", follow_redirects=True).status_code == 200

        page = context.new_page()
        page.goto(f"{coordinator.url}/console/?token={viewer}")
        page.wait_for_selector('#devices tr[data-device="press-7"]')
        page.wait_for_function("document.getElementById('live').textContent === 'live'")  # ?access_token= accepted

        stranger = browser.new_context().new_page()
        stranger.goto(f"{coordinator.url}/console/")
        stranger.wait_for_function("document.getElementById('live').textContent === 'polling'")  # the stream: 401
        assert "401" in stranger.locator("main").inner_text() or "token" in stranger.locator("main").inner_text()
        stranger.context.close()
    finally:
        context.close()
        coordinator.stop()
