"""The REST API on a real uvicorn (free port, in a thread) on both store backends.

(Starlette's httpx.Client warns about httpx, and warnings are errors here.)"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from cloud import Store
from cloud.api import create_app
from cloud.artifacts import ArtifactStore
from cloud.keys import generate_keys
from cloud.registry.models import ModelRegistry


@pytest.fixture
def client(store: Store, tmp_path: Path) -> Iterator[httpx.Client]:
    key, _ = generate_keys(tmp_path / "keys")
    artifacts = ArtifactStore(tmp_path / "artifacts")
    app = create_app(store, ModelRegistry(store, artifacts, signing_key=key), artifacts)
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


def _records(seqs: range | list[int], kind: str = "prediction", t0: float = 1000.0) -> list[dict]:
    return [{"seq": s, "ts": t0 + s, "kind": kind, "name": f"e{s}"} for s in seqs]


def ingest(store: Store, fleet: str, device: str, stream: str, records: list[dict]) -> None:
    """What the ingestor does with a batch: store it, register the device on first contact."""
    with store.transaction(write=True) as tx:
        tx.insert_telemetry(fleet, device, stream, records)
        tx.touch_device(fleet, device, time.time())


def metrics(client: httpx.Client) -> dict[str, float]:
    response = client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            label = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            out[sample.name + (f"{{{label}}}" if label else "")] = sample.value
    return out


def test_openapi_lists_every_route(client: httpx.Client) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    for path in ["/v1/devices", "/v1/devices/{fleet}/{device}", "/v1/devices/{fleet}/{device}/telemetry",
                 "/v1/events", "/v1/models", "/v1/models/{ref}", "/v1/models/{name}/aliases/{alias}",
                 "/v1/artifacts/{sha256}", "/v1/health", "/metrics"]:
        assert path in paths, path


def test_devices_preregister_list_show_with_counters(client: httpx.Client, store: Store) -> None:
    r = client.put("/v1/devices/plant/dev-1", json={"tags": {"site": "lyon"}, "hardware_profile": "rpi4"})
    assert r.status_code == 201 and r.json()["pre_registered"] is True
    assert client.put("/v1/devices/plant/dev-1", json={"tags": {"site": "paris"}}).status_code == 200
    store.insert_telemetry("plant", "dev-1", "s1", _records([1, 2, 3, 5]))
    store.insert_telemetry("plant", "dev-1", "s1", _records([2, 3]))  # duplicates
    store.insert_telemetry("plant", "dev-1", "s2", _records(range(1, 11)))
    ingest(store, "plant", "dev-2", "s3", _records(range(1, 4)))  # registers on first contact

    doc = client.get("/v1/devices/plant/dev-1").json()
    assert (doc["tags"], doc["hardware_profile"]) == ({"site": "paris"}, "rpi4")
    # max_contiguous_seq: the stream written to last (s2), not a sum over streams
    assert (doc["records"], doc["max_contiguous_seq"], doc["gaps"], doc["duplicates"]) == (14, 10, 1, 2)
    assert {s["stream"]: (s["records"], s["max_contiguous_seq"], s["gaps"]) for s in doc["streams"]} == {
        "s1": (4, 3, 1), "s2": (10, 10, 0)}

    listed = {d["device_id"]: d for d in client.get("/v1/devices", params={"fleet": "plant"}).json()}
    assert (listed["dev-1"]["records"], listed["dev-2"]["records"]) == (14, 3)
    assert listed["dev-2"]["pre_registered"] is False
    assert client.get("/v1/devices", params={"fleet": "other"}).json() == []

    assert client.get("/v1/devices/plant/nope").status_code == 404
    assert client.put("/v1/devices/plant/a+b", json={}).status_code == 400
    assert client.put("/v1/devices/plant/dev-3", json={"colour": "red"}).status_code == 400
    bad = client.put("/v1/devices/plant/dev-3", json={"tags": "not an object"})
    assert bad.status_code == 400 and "tags" in bad.json()["detail"]
    # A NUL character (PostgreSQL's jsonb refuses it): bad input on either store, nothing written
    nul = client.put("/v1/devices/plant/dev-1", content=b'{"tags": {"site": "a\\u0000b"}}',
                     headers={"content-type": "application/json"})
    assert (nul.status_code, nul.json()["error"]) == (400, "Unstorable"), nul.text
    assert "NUL" in nul.json()["detail"] and "Retry-After" not in nul.headers
    assert client.get("/v1/devices/plant/dev-1").json()["tags"] == {"site": "paris"}


def test_a_device_with_two_streams_reports_its_most_recent_streams_contiguous_seq(
        client: httpx.Client, store: Store) -> None:
    """A reinstalled agent starts a new stream at seq 1: the device's max_contiguous_seq is the
    current stream's, whichever stream was created first; records, gaps, duplicates are summed."""
    store.upsert_device("plant", "dev-1")
    store.insert_telemetry("plant", "dev-1", "before-reinstall", _records(range(1, 501)), received_at=1000.0)
    store.insert_telemetry("plant", "dev-1", "after-reinstall", _records([1, 2, 3, 4, 6]), received_at=2000.0)
    doc = client.get("/v1/devices/plant/dev-1").json()
    assert (doc["records"], doc["max_contiguous_seq"], doc["gaps"], doc["duplicates"]) == (505, 4, 1, 0)
    assert {s["stream"]: (s["max_contiguous_seq"], s["last_seen"]) for s in doc["streams"]} == {
        "before-reinstall": (500, 1000.0), "after-reinstall": (4, 2000.0)}
    assert [s["stream"] for s in doc["streams"]] == ["before-reinstall", "after-reinstall"]  # oldest first

    # the older stream written to again is the current one (latest last_seen, not first_seen)
    store.insert_telemetry("plant", "dev-1", "before-reinstall", _records([501]), received_at=3000.0)
    doc = client.get("/v1/devices/plant/dev-1").json()
    assert (doc["records"], doc["max_contiguous_seq"]) == (506, 501)
    # the fleet list (`edgeml fleet list`) says the same, from the store's per-device totals
    listed = next(d for d in client.get("/v1/devices", params={"fleet": "plant"}).json() if d["device_id"] == "dev-1")
    assert (listed["records"], listed["max_contiguous_seq"], listed["gaps"]) == (506, 501, 1)


def test_telemetry_and_events_queries(client: httpx.Client, store: Store) -> None:
    ingest(store, "plant", "dev-1", "s1", _records(range(1, 6)) + _records([6, 7], kind="event"))
    ingest(store, "plant", "dev-2", "s2", _records([1], kind="event", t0=1005.5))
    ingest(store, "lab", "dev-9", "s9", _records([1], kind="event", t0=2000))

    rows = client.get("/v1/devices/plant/dev-1/telemetry").json()
    assert [r["seq"] for r in rows] == [1, 2, 3, 4, 5, 6, 7]
    assert rows[0]["body"]["kind"] == "prediction" and rows[0]["stream"] == "s1"
    assert [r["seq"] for r in client.get("/v1/devices/plant/dev-1/telemetry", params={"kind": "event"}).json()] == [6, 7]
    assert [r["seq"] for r in client.get("/v1/devices/plant/dev-1/telemetry", params={"since": 1004, "limit": 2}).json()] == [4, 5]
    assert client.get("/v1/devices/plant/dev-1/telemetry", params={"limit": 0}).status_code == 400
    assert client.get("/v1/devices/plant/ghost/telemetry").status_code == 404

    events = client.get("/v1/events").json()  # newest first, every fleet
    assert [(e["device_id"], e["seq"]) for e in events] == [("dev-9", 1), ("dev-1", 7), ("dev-2", 1), ("dev-1", 6)]
    assert [e["device_id"] for e in client.get("/v1/events", params={"fleet": "plant", "limit": 2}).json()] == ["dev-1", "dev-2"]
    assert client.get("/v1/events", params={"since": 1006.6}).json()[-1]["seq"] == 7


def test_models_upload_list_show_alias(client: httpx.Client, models: dict[str, Path], tmp_path: Path) -> None:
    def upload(path: Path, **form: str) -> object:
        with path.open("rb") as fh:
            return client.post("/v1/models", data=form, files={"file": (path.name, fh)})

    r = upload(models["onnx_float"], name="mlp", version="1.0.0", metrics='{"acc": 0.9}', params='{"lr": 0.1}',
               dataset_hash="sha256:abc")
    assert r.status_code == 201, r.text
    m = r.json()
    assert (m["ref"], m["format"], m["metrics"], m["params"], m["signed"]) == ("mlp@1.0.0", "onnx", {"acc": 0.9}, {"lr": 0.1}, True)
    assert m["artifact_url"] == f"/v1/artifacts/{m['sha256']}"
    assert upload(models["onnx_v2"], name="mlp", version="2.0.0", parent="mlp@1.0.0").status_code == 201

    assert upload(models["onnx_v2"], name="mlp", version="1.0.0").status_code == 409
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"definitely not a model")
    r = upload(junk, name="mlp", version="3.0.0")
    assert r.status_code == 422 and r.json()["error"] == "InvalidModel"
    assert upload(models["onnx_v2"], name="mlp", version="3.0.0", metrics="{bad").status_code == 400
    assert upload(models["onnx_v2"], name="mlp", version="3.0.0", metrics="[1]").status_code == 400
    assert upload(models["onnx_v2"], name="mlp", version="3.0.0", parent="mlp@0.0.1").status_code == 404
    assert client.post("/v1/models", data={"name": "mlp"}).status_code == 400

    assert [x["version"] for x in client.get("/v1/models").json()] == ["1.0.0", "2.0.0"]
    assert client.get("/v1/models/mlp@2.0.0").json()["parent"] == "mlp@1.0.0"
    r = client.put("/v1/models/mlp/aliases/champion", json={"version": "1.0.0"})
    assert r.json() == {"name": "mlp", "alias": "champion", "version": "1.0.0", "previous": None}
    assert client.get("/v1/models/mlp@champion").json()["version"] == "1.0.0"
    assert client.put("/v1/models/mlp/aliases/champion", json={"version": "2.0.0"}).json()["previous"] == "1.0.0"
    shown = client.get("/v1/models/mlp@champion").json()
    assert (shown["version"], shown["aliases"]) == ("2.0.0", ["champion"])
    assert client.get("/v1/models/mlp/aliases").json() == {"champion": "2.0.0"}
    assert client.put("/v1/models/mlp/aliases/champion", json={"version": "9.9"}).status_code == 404
    assert client.get("/v1/models/mlp@nothing").status_code == 404
    assert client.get("/v1/models/mlp").status_code == 400
    assert client.get(f"/v1/artifacts/{m['sha256']}").content == models["onnx_float"].read_bytes()


def test_metrics_parse_and_move(client: httpx.Client, store: Store) -> None:
    before = metrics(client)
    assert before["edgeml_ingest_records_total"] == 0 and before["edgeml_devices"] == 0
    now = time.time()
    store.insert_telemetry("plant", "dev-1", "s1", [{"seq": s, "ts": now - 2, "kind": "prediction"} for s in range(1, 51)],
                           received_at=now)
    store.set_status("plant", "dev-1", {"v": 1, "device": "dev-1", "state": "online", "ts": now})
    store.count_error("invalid_json", "edgeml/v1/plant/dev-1/telemetry", 10)
    after = metrics(client)
    assert after["edgeml_ingest_records_total"] == 50
    assert after["edgeml_devices_online"] == 1
    assert after["edgeml_ingest_errors_total{reason=invalid_json}"] == 1
    assert after["edgeml_ingest_lag_seconds"] == pytest.approx(2.0, abs=0.01)
