"""Resumable, verified artifact downloads with httpx."""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import shutil
import time
from pathlib import Path

from .._exceptions import EdgemlError

log = logging.getLogger(__name__)
CHUNK = 1 << 16


class UpdateRejected(EdgemlError):
    """The update cannot be applied; ``reason`` is machine-readable, the message explains."""

    def __init__(self, reason: str, message: str, *, transient: bool = False) -> None:
        self.reason = reason
        self.transient = transient
        super().__init__(message)


def check_disk(directory: Path, needed: int, keep_free: int) -> None:
    free = shutil.disk_usage(directory).free
    if free - needed < keep_free:
        raise UpdateRejected(
            "no_disk", f"{needed} bytes needed, {free} free on {directory}, {keep_free} must stay free",
            transient=True,  # space may be freed: the revision is retried, not applied
        )


def download(
    url: str,
    dest: Path,
    *,
    size: int | None,
    sha256: str | None,
    max_bytes: int,
    timeout_s: float,
    retries: int,
    backoff_s: float,
) -> str:
    """Download ``url`` into ``dest`` (resuming a partial file with Range); returns the
    sha256 of the whole file. Transient failures are retried ``retries`` times with
    exponential backoff; the partial file is kept between attempts and restarts."""
    if size is not None and size > max_bytes:
        raise UpdateRejected("too_large", f"artifact of {size} bytes exceeds the limit of {max_bytes}")
    resumed = dest.exists() and dest.stat().st_size > 0
    attempt = 0
    while True:
        try:
            _fetch(url, dest, size=size, max_bytes=max_bytes, timeout_s=timeout_s)
            break
        except UpdateRejected as exc:
            if not exc.transient or attempt >= retries:
                raise
            attempt += 1
            delay = backoff_s * 2 ** (attempt - 1)
            log.warning("download of %s failed (%s); retry %d/%d in %.1fs", url, exc, attempt, retries, delay)
            time.sleep(delay)
    digest = _hash(dest)
    if sha256 is not None and digest != sha256 and resumed:
        # the partial file kept from before may have a torn tail: start once from zero
        log.warning("resumed download of %s does not verify; downloading it again", url)
        dest.unlink(missing_ok=True)
        return download(url, dest, size=size, sha256=sha256, max_bytes=max_bytes, timeout_s=timeout_s,
                        retries=retries, backoff_s=backoff_s)
    if size is not None and dest.stat().st_size != size:
        raise UpdateRejected("truncated", f"downloaded {dest.stat().st_size} bytes, expected {size}")
    if sha256 is not None and digest != sha256:
        dest.unlink(missing_ok=True)  # a wrong file must not be resumed
        raise UpdateRejected("hash_mismatch", f"artifact sha256 is {digest}, the desired state says {sha256}")
    return digest


def _fetch(url: str, dest: Path, *, size: int | None, max_bytes: int, timeout_s: float) -> None:
    import httpx  # only a device that updates pays for it (~5 MB of RSS)

    have = dest.stat().st_size if dest.exists() else 0
    if size is not None and have > size:
        dest.unlink()
        have = 0
    if size is not None and have == size:
        return
    headers = {"Range": f"bytes={have}-"} if have else {}
    try:
        with httpx.stream("GET", url, headers=headers, timeout=timeout_s, follow_redirects=True) as response:
            if response.status_code == 416 and have:
                dest.unlink()  # our partial file does not fit the artifact: start again
                raise UpdateRejected("download_failed", "range not satisfiable; restarting", transient=True)
            if response.status_code == 404:
                raise UpdateRejected("not_found", f"artifact not found at {url}")
            if response.status_code >= 500:
                raise UpdateRejected("download_failed", f"HTTP {response.status_code} from {url}", transient=True)
            if response.status_code not in (200, 206):
                raise UpdateRejected("download_failed", f"HTTP {response.status_code} from {url}")
            mode = "ab" if response.status_code == 206 else "wb"
            written = have if mode == "ab" else 0
            # endless data: never read past the signed size (or the device's limit without one)
            limit, what = (max_bytes, "the limit of") if size is None or size > max_bytes else (size, "its signed size,")
            with dest.open(mode) as fh:
                for chunk in response.iter_bytes(CHUNK):
                    written += len(chunk)
                    if written > limit:
                        fh.close()
                        dest.unlink(missing_ok=True)  # never resume from a server that sends too much
                        raise UpdateRejected("too_large", f"artifact exceeds {what} {limit} bytes")
                    fh.write(chunk)
                fh.flush()
                os.fsync(fh.fileno())
    except httpx.HTTPError as exc:
        raise UpdateRejected("download_failed", f"{type(exc).__name__}: {exc}", transient=True) from exc
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            dest.unlink(missing_ok=True)
            raise UpdateRejected("no_disk", f"disk full while downloading {url}", transient=True) from exc
        raise UpdateRejected("io_error", f"cannot write {dest}: {exc}", transient=True) from exc


def fetch_small(url: str, *, timeout_s: float, limit: int = 64 * 1024) -> bytes:
    """A small document (an artifact's ``.sig``)."""
    import httpx

    try:
        with httpx.stream("GET", url, timeout=timeout_s, follow_redirects=True) as response:
            if response.status_code == 404:
                raise UpdateRejected("missing_signature", f"no signature at {url}")
            if response.status_code != 200:
                raise UpdateRejected("download_failed", f"HTTP {response.status_code} from {url}", transient=True)
            body = b""
            for chunk in response.iter_bytes():
                body += chunk
                if len(body) > limit:
                    raise UpdateRejected("too_large", f"{url} is larger than {limit} bytes")
            return body
    except httpx.HTTPError as exc:
        raise UpdateRejected("download_failed", f"{type(exc).__name__}: {exc}", transient=True) from exc


def _hash(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
