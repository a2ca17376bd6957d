"""The content-addressed artifact store and its Range-capable download route, over real HTTP."""

from __future__ import annotations

import hashlib
import io
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from cloud._exceptions import ArtifactNotFound, InvalidDigest, RangeNotSatisfiable
from cloud.artifacts import CHUNK_SIZE, ArtifactStore, artifact_router, parse_range
from edgeml.protocol.signing import generate_keypair, verify_bytes
from tests.conftest import free_port, wait_until

DATA = os.urandom(3 * CHUNK_SIZE + 12345)  # several chunks plus a partial one
SHA = hashlib.sha256(DATA).hexdigest()


def stored_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


# --------------------------------------------------------------------------- store


def test_put_is_content_addressed_and_idempotent(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "store")
    art = store.put(DATA)
    assert art.sha256 == SHA and art.size == len(DATA)
    assert art.path == tmp_path / "store" / "sha256" / SHA[:2] / SHA
    assert art.path.read_bytes() == DATA
    assert art.path.stat().st_mode & 0o222 == 0, "stored artifacts are read-only"
    src = tmp_path / "model.onnx"
    src.write_bytes(DATA)
    assert store.put(src) == art
    assert store.put(str(src)) == art
    assert store.put(io.BytesIO(DATA)) == art
    assert stored_files(tmp_path / "store") == [art.path], "one copy, no temp files left"
    assert store.exists(SHA) and store.get(SHA) == art
    with store.open(SHA) as fh:
        assert fh.read() == DATA


def test_empty_and_distinct_contents(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    empty = store.put(b"")
    assert empty.sha256 == hashlib.sha256(b"").hexdigest() and empty.size == 0
    assert store.put(b"a").sha256 != store.put(b"b").sha256


def test_unknown_and_malformed_digests(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    assert not store.exists("0" * 64)
    with pytest.raises(ArtifactNotFound):
        store.open("0" * 64)
    with pytest.raises(ArtifactNotFound):
        store.get("0" * 64)
    for bad in ("abc", "A" * 64, "../" + "0" * 61, "g" * 64):
        with pytest.raises(InvalidDigest):
            store.path(bad)


def test_sign_writes_a_verifiable_signature(tmp_path: Path) -> None:
    private_pem, public_pem = generate_keypair()
    store = ArtifactStore(tmp_path)
    with pytest.raises(ArtifactNotFound):
        store.read_signature(SHA)
    art = store.put(DATA)
    sig_path = store.sign(art.sha256, private_pem)
    assert sig_path == art.path.with_name(SHA + ".sig")
    verify_bytes(DATA, store.read_signature(SHA), [public_pem])


# --------------------------------------------------------------------------- parse_range


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, None),
        ("", None),
        ("bytes=0-99", (0, 99)),
        ("bytes=100-", (100, 999)),
        ("bytes=-100", (900, 999)),
        ("bytes=-5000", (0, 999)),  # suffix longer than the file: all of it
        ("bytes=990-5000", (990, 999)),  # end past the file is clipped
        ("bytes=999-999", (999, 999)),
        (" bytes=5-6 ", (5, 6)),
        ("bytes=9-3", None),  # invalid (last < first): ignored, not 416
        ("bytes=0-1,5-6", None),  # multi-range: served whole
        ("items=0-9", None),
        ("bytes=-", None),
        ("bytes=a-b", None),
        ("bytes=1", None),
    ],
)
def test_parse_range(header: str | None, expected: tuple[int, int] | None) -> None:
    assert parse_range(header, 1000) == expected


@pytest.mark.parametrize(("header", "size"), [("bytes=1000-", 1000), ("bytes=5000-6000", 1000), ("bytes=-0", 1000), ("bytes=0-", 0), ("bytes=-1", 0)])
def test_parse_range_unsatisfiable(header: str, size: int) -> None:
    with pytest.raises(RangeNotSatisfiable) as exc:
        parse_range(header, size)
    assert exc.value.size == size


# --------------------------------------------------------------------------- HTTP


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real uvicorn serving a store holding DATA (signed) and an empty artifact."""
    import uvicorn
    from fastapi import FastAPI

    store = ArtifactStore(tmp_path_factory.mktemp("artifacts"))
    store.put(DATA)
    store.put(b"")
    store.sign(SHA, generate_keypair()[0])
    app = FastAPI()
    app.include_router(artifact_router(store))
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=srv.run, name="uvicorn-artifacts", daemon=True)
    thread.start()
    wait_until(lambda: srv.started, 10, what="uvicorn to start")
    yield f"http://127.0.0.1:{port}/v1/artifacts/"
    srv.should_exit = True
    thread.join(10)


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=10) as c:
        yield c


def test_full_download(server: str, client: httpx.Client) -> None:
    r = client.get(server + SHA)
    assert r.status_code == 200
    assert r.content == DATA
    assert r.headers["content-length"] == str(len(DATA))
    assert r.headers["etag"] == f'"{SHA}"'
    assert r.headers["accept-ranges"] == "bytes"
    assert "immutable" in r.headers["cache-control"]
    assert "content-range" not in r.headers


@pytest.mark.parametrize(
    ("header", "start", "end"),
    [("bytes=0-99", 0, 99), ("bytes=1000000-", 1000000, len(DATA) - 1), ("bytes=-777", len(DATA) - 777, len(DATA) - 1)],
)
def test_partial_downloads(server: str, client: httpx.Client, header: str, start: int, end: int) -> None:
    r = client.get(server + SHA, headers={"Range": header})
    assert r.status_code == 206
    assert r.headers["content-range"] == f"bytes {start}-{end}/{len(DATA)}"
    assert r.headers["content-length"] == str(end - start + 1)
    assert r.content == DATA[start : end + 1]


def test_unsatisfiable_range_is_416(server: str, client: httpx.Client) -> None:
    r = client.get(server + SHA, headers={"Range": f"bytes={len(DATA)}-"})
    assert r.status_code == 416
    assert r.headers["content-range"] == f"bytes */{len(DATA)}"
    empty = hashlib.sha256(b"").hexdigest()
    assert client.get(server + empty, headers={"Range": "bytes=0-"}).status_code == 416
    assert client.get(server + empty).content == b""


def test_if_range_mismatch_sends_the_whole_file(server: str, client: httpx.Client) -> None:
    r = client.get(server + SHA, headers={"Range": "bytes=0-9", "If-Range": '"other"'})
    assert r.status_code == 200 and len(r.content) == len(DATA)


def test_errors_and_signature(server: str, client: httpx.Client) -> None:
    assert client.get(server + "0" * 64).status_code == 404
    assert client.get(server + "0" * 64 + ".sig").status_code == 404
    assert client.get(server + "not-a-sha").status_code == 400
    assert client.get(server + SHA.upper()).status_code == 400
    sig = client.get(server + SHA + ".sig")
    assert sig.status_code == 200 and sig.json()["sha256"] == SHA


def test_head_gives_size_without_body(server: str, client: httpx.Client) -> None:
    r = client.head(server + SHA)
    assert r.status_code == 200 and r.content == b""
    assert r.headers["content-length"] == str(len(DATA))


def test_resume_after_a_cut(server: str, client: httpx.Client) -> None:
    received = bytearray()
    with client.stream("GET", server + SHA) as r:  # the connection is dropped half-way
        assert r.status_code == 200
        etag = r.headers["etag"]
        for chunk in r.iter_bytes():
            received += chunk
            if len(received) >= len(DATA) // 2:
                break
    assert len(received) < len(DATA)
    headers = {"Range": f"bytes={len(received)}-", "If-Range": etag}
    with client.stream("GET", server + SHA, headers=headers) as r:
        assert r.status_code == 206
        assert r.headers["content-range"] == f"bytes {len(received)}-{len(DATA) - 1}/{len(DATA)}"
        for chunk in r.iter_bytes():
            received += chunk
    assert hashlib.sha256(received).hexdigest() == SHA
