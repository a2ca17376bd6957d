"""Artifact download benchmarks (cloud artifact store). Prints one JSON document.

    python bench/bench_artifacts.py [--size-mb 50] [--runs 3]

A uvicorn child process serves a store holding one random artifact over loopback; an
httpx client streams it, hashing as it goes (what a device does). Figures:
1. ``put``: storing the artifact (hash + write + fsync + rename), MB/s
2. ``download``: full GET, MB/s (best and median of ``--runs``), against a baseline of
   reading + hashing the same file from disk in this process
3. ``resume``: a download cut at 50%, then ``Range: bytes=N-``: time to first byte of
   the resumed response and time to finish; the sha256 must match
4. server RSS before and after the downloads (streams from disk, so it should not grow
   by the artifact's size)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil

MB = 1 << 20


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(root: str, port: int) -> None:
    """Child process: serve ``root`` on ``port``."""
    import uvicorn
    from fastapi import FastAPI

    from cloud.artifacts import ArtifactStore, artifact_router

    app = FastAPI()
    app.include_router(artifact_router(ArtifactStore(root)))
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off")


def _wait_listening(port: int, proc: subprocess.Popen[bytes], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit("server did not start")


def _download(client: httpx.Client, url: str, headers: dict[str, str] | None = None, stop_at: int | None = None) -> tuple[bytes, float, float]:
    """Body (up to ``stop_at`` bytes, then the connection is dropped), time to first byte, total time."""
    body = bytearray()
    t0 = time.perf_counter()
    ttfb = 0.0
    with client.stream("GET", url, headers=headers) as r:
        r.raise_for_status()
        for chunk in r.iter_raw():
            if not body:
                ttfb = time.perf_counter() - t0
            body += chunk
            if stop_at is not None and len(body) >= stop_at:
                break
    return bytes(body), ttfb, time.perf_counter() - t0


def _hash_file(path: Path) -> tuple[str, float]:
    t0 = time.perf_counter()
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(MB):
            digest.update(chunk)
    return digest.hexdigest(), time.perf_counter() - t0


def bench(size_mb: int, runs: int) -> dict[str, object]:
    from cloud.artifacts import CHUNK_SIZE, ArtifactStore

    size = size_mb * MB
    with tempfile.TemporaryDirectory(prefix="edgeml-bench-art-") as tmp:
        data = os.urandom(size)
        store = ArtifactStore(Path(tmp) / "store")
        t0 = time.perf_counter()
        art = store.put(data)
        put_s = time.perf_counter() - t0
        del data
        _, disk_s = _hash_file(art.path)

        port = _free_port()
        proc = subprocess.Popen([sys.executable, __file__, "--serve", str(store.root), str(port)])
        try:
            _wait_listening(port, proc)
            server = psutil.Process(proc.pid)
            url = f"http://127.0.0.1:{port}/v1/artifacts/{art.sha256}"
            with httpx.Client(timeout=60) as client:
                _download(client, url, headers={"Range": "bytes=0-0"})  # warm-up
                rss_before = server.memory_info().rss
                times = []
                for _ in range(runs):
                    t0 = time.perf_counter()
                    digest = hashlib.sha256()
                    with client.stream("GET", url) as r:
                        for chunk in r.iter_raw():
                            digest.update(chunk)
                    times.append(time.perf_counter() - t0)
                    assert digest.hexdigest() == art.sha256, "full download corrupted"
                rss_after = server.memory_info().rss

                first, _, cut_s = _download(client, url, stop_at=size // 2)
                rest, ttfb, rest_s = _download(client, url, headers={"Range": f"bytes={len(first)}-"})
                resumed_ok = hashlib.sha256(first + rest).hexdigest() == art.sha256
        finally:
            proc.terminate()
            proc.wait(10)

    return {
        "artifact_mb": size_mb,
        "chunk_kib": CHUNK_SIZE // 1024,
        "put_mb_s": round(size_mb / put_s, 1),
        "disk_read_hash_mb_s": round(size_mb / disk_s, 1),
        "download_mb_s_best": round(size_mb / min(times), 1),
        "download_mb_s_median": round(size_mb / statistics.median(times), 1),
        "download_s_median": round(statistics.median(times), 3),
        "resume": {
            "cut_at_bytes": len(first),
            "first_half_s": round(cut_s, 3),
            "resume_ttfb_ms": round(ttfb * 1000, 2),
            "resume_rest_s": round(rest_s, 3),
            "sha256_matches": resumed_ok,
        },
        "server_rss_mb": {"before": round(rss_before / MB, 1), "after": round(rss_after / MB, 1)},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=50)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--serve", nargs=2, metavar=("ROOT", "PORT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve[0], int(args.serve[1]))
        return
    print(json.dumps(bench(args.size_mb, args.runs), indent=2))


if __name__ == "__main__":
    main()
