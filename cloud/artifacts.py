"""Content-addressed artifact store on the filesystem, and its HTTP download route.

Layout under ``root``::

    sha256/ab/abcdef…(64 hex)        the artifact, read-only (0444)
    sha256/ab/abcdef….sig            its detached signature (JSON, see edgeml.protocol.signing)
    tmp/                             uploads in progress (same filesystem, so rename is atomic)

An artifact is written to ``tmp/``, hashed while it is written, synced, then renamed to
its address: a reader never sees a partial file, and putting the same bytes twice is a
no-op. Devices download with ``GET /v1/artifacts/{sha256}`` and resume an interrupted
download with ``Range: bytes={received}-`` (:func:`artifact_router`).
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import Response, StreamingResponse

from ._exceptions import ArtifactError, ArtifactNotFound, InvalidDigest, RangeNotSatisfiable

__all__ = ["CHUNK_SIZE", "Artifact", "ArtifactStore", "artifact_router", "parse_range"]

#: Bytes read and written at a time (hashing, copying, HTTP streaming).
CHUNK_SIZE = 1 << 20
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


@dataclass(frozen=True, slots=True)
class Artifact:
    """A stored artifact: its address, length in bytes and file path."""

    sha256: str
    size: int
    path: Path


def check_sha256(sha256: str) -> str:
    """Return ``sha256`` if it is 64 lowercase hex characters, else :class:`InvalidDigest`."""
    if not isinstance(sha256, str) or not _SHA256.match(sha256):
        raise InvalidDigest(f"not a sha256 (64 lowercase hex characters): {sha256!r}")
    return sha256


class ArtifactStore:
    """Immutable blobs addressed by their sha256, stored under ``root``."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self._tmp = self.root / "tmp"
        try:
            self._tmp.mkdir(parents=True, exist_ok=True)
            (self.root / "sha256").mkdir(exist_ok=True)
        except OSError as exc:
            raise ArtifactError(f"cannot create artifact store at {self.root}: {exc.strerror}") from exc

    def path(self, sha256: str) -> Path:
        """Where the artifact with this sha256 lives (whether or not it exists)."""
        check_sha256(sha256)
        return self.root / "sha256" / sha256[:2] / sha256

    def signature_path(self, sha256: str) -> Path:
        return self.path(sha256).with_name(sha256 + ".sig")

    def exists(self, sha256: str) -> bool:
        return self.path(sha256).is_file()

    def get(self, sha256: str) -> Artifact:
        """The stored artifact; :class:`ArtifactNotFound` if there is none."""
        path = self.path(sha256)
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise ArtifactNotFound(f"no artifact {sha256}") from None
        return Artifact(sha256, size, path)

    def open(self, sha256: str) -> IO[bytes]:
        """The artifact opened for binary reading; :class:`ArtifactNotFound` if there is none."""
        try:
            return self.path(sha256).open("rb")
        except FileNotFoundError:
            raise ArtifactNotFound(f"no artifact {sha256}") from None

    def put(self, source: bytes | str | os.PathLike[str] | IO[bytes]) -> Artifact:
        """Store bytes, a file path or a binary stream; return where it lives.

        Streams in :data:`CHUNK_SIZE` pieces (a 50 MB model is never held in memory).
        Idempotent: the same content gives the same :class:`Artifact`.
        """
        try:
            if isinstance(source, bytes | bytearray | memoryview):
                return self._put_stream(_chunks_of(bytes(source)))
            if isinstance(source, str | os.PathLike):
                with open(source, "rb") as fh:
                    return self._put_stream(_read_chunks(fh))
            return self._put_stream(_read_chunks(source))
        except FileNotFoundError as exc:
            raise ArtifactError(f"cannot store {source!r}: file not found") from exc
        except OSError as exc:
            raise ArtifactError(f"cannot store artifact in {self.root}: {exc.strerror or exc}") from exc

    def _put_stream(self, chunks: Iterator[bytes]) -> Artifact:
        digest, size = hashlib.sha256(), 0
        fd, tmp_name = tempfile.mkstemp(dir=self._tmp, prefix="put-")
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as out:
                for chunk in chunks:
                    digest.update(chunk)
                    out.write(chunk)
                    size += len(chunk)
                out.flush()
                os.fsync(out.fileno())
            sha256 = digest.hexdigest()
            final = self.path(sha256)
            if final.is_file() and final.stat().st_size == size:
                return Artifact(sha256, size, final)  # already stored: nothing to do
            final.parent.mkdir(exist_ok=True)
            os.chmod(tmp, 0o444)
            os.replace(tmp, final)
            _fsync_dir(final.parent)
            return Artifact(sha256, size, final)
        finally:
            tmp.unlink(missing_ok=True)

    def sign(self, sha256: str, private_key: Any) -> Path:
        """Write ``{sha256}.sig`` beside the artifact, after hashing it again, and return its path.

        ``private_key``: an ed25519 key, PEM bytes or a key file path.
        """
        from edgeml.protocol.signing import sign_digest

        with self.open(sha256) as fh:
            actual = _hash_file(fh)
        if actual != sha256:
            raise ArtifactError(f"artifact {sha256} is damaged on disk (its content hashes to {actual})")
        sig = sign_digest(sha256, private_key)
        path = self.signature_path(sha256)
        tmp_name = ""
        try:
            fd, tmp_name = tempfile.mkstemp(dir=self._tmp, prefix="sig-")
            with os.fdopen(fd, "wb") as out:
                out.write(sig)
                out.flush()
                os.fsync(out.fileno())
            os.chmod(tmp_name, 0o644)
            os.replace(tmp_name, path)
        except OSError as exc:
            if tmp_name:
                Path(tmp_name).unlink(missing_ok=True)
            raise ArtifactError(f"cannot write signature {path}: {exc.strerror}") from exc
        return path

    def read_signature(self, sha256: str) -> bytes:
        """The ``.sig`` file's bytes; :class:`ArtifactNotFound` if the artifact is not signed."""
        try:
            return self.signature_path(sha256).read_bytes()
        except FileNotFoundError:
            raise ArtifactNotFound(f"artifact {sha256} has no signature") from None


def _chunks_of(data: bytes) -> Iterator[bytes]:
    view = memoryview(data)
    for i in range(0, len(view), CHUNK_SIZE):
        yield bytes(view[i : i + CHUNK_SIZE])


def _read_chunks(fh: IO[bytes], limit: int | None = None) -> Iterator[bytes]:
    """Chunks of ``fh`` from its current position, ``limit`` bytes at most."""
    remaining = limit
    while remaining is None or remaining > 0:
        chunk = fh.read(CHUNK_SIZE if remaining is None else min(CHUNK_SIZE, remaining))
        if not chunk:
            return
        if remaining is not None:
            remaining -= len(chunk)
        yield chunk


def _hash_file(fh: IO[bytes]) -> str:
    digest = hashlib.sha256()
    for chunk in _read_chunks(fh):
        digest.update(chunk)
    return digest.hexdigest()


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- HTTP


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The inclusive ``(start, end)`` byte range a ``Range`` header asks of a ``size``-byte file.

    ``None`` means "send the whole file": no header, a unit other than ``bytes``, a
    multi-range request, or a malformed value (RFC 9110 lets a server ignore those).
    :class:`RangeNotSatisfiable` (HTTP 416) when the range selects no byte: a start at
    or past the end, a zero-length suffix, or any range of an empty file.
    """
    if not header:
        return None
    match = _RANGE.match(header.strip())
    if match is None:
        return None
    first, last = match.groups()
    if not first and not last:
        return None
    if not first:  # suffix: the last n bytes
        n = int(last)
        if n == 0 or size == 0:
            raise RangeNotSatisfiable(header, size)
        return max(0, size - n), size - 1
    start = int(first)
    end = int(last) if last else size - 1
    if last and end < start:
        return None  # invalid, not unsatisfiable: ignore it
    if start >= size:
        raise RangeNotSatisfiable(header, size)
    return start, min(end, size - 1)


def _stream(fh: IO[bytes], start: int, length: int) -> Iterator[bytes]:
    """File chunks for a response; the file is closed when the stream ends or is dropped."""
    try:
        fh.seek(start)
        yield from _read_chunks(fh, length)
    finally:
        fh.close()


def artifact_router(store: ArtifactStore) -> APIRouter:
    """Routes serving ``store``: ``GET`` and ``HEAD`` of ``/v1/artifacts/{sha256}`` and ``…/{sha256}.sig``.

    Artifact responses carry ``ETag: "{sha256}"``, ``Accept-Ranges: bytes`` and an
    immutable ``Cache-Control``; ``Range: bytes=a-b``, ``bytes=a-`` and ``bytes=-n`` give
    206 with ``Content-Range``. Errors: 400 malformed sha256, 404 unknown, 416 unsatisfiable
    range (with ``Content-Range: bytes */{size}``).
    """
    router = APIRouter()

    def lookup(sha256: str, get: Any) -> Any:
        try:
            return get(sha256)
        except InvalidDigest as exc:
            raise HTTPException(400, str(exc)) from None
        except ArtifactNotFound as exc:
            raise HTTPException(404, str(exc)) from None

    # declared first: "{sha256}" alone would also match "abc….sig". GET and HEAD are
    # separate routes so that each has its own OpenAPI operation id.
    @router.get("/v1/artifacts/{sha256}.sig")
    def get_signature(sha256: str) -> Response:
        """The artifact's detached signature (JSON)."""
        return signature_response(sha256, head=False)

    @router.head("/v1/artifacts/{sha256}.sig")
    def head_signature(sha256: str) -> Response:
        """The signature's headers only."""
        return signature_response(sha256, head=True)

    @router.get("/v1/artifacts/{sha256}")
    def get_artifact(sha256: str, request: Request) -> Response:
        """Download the artifact, whole or a ``Range`` of it (resumable)."""
        return artifact_response(sha256, request, head=False)

    @router.head("/v1/artifacts/{sha256}")
    def head_artifact(sha256: str, request: Request) -> Response:
        """The artifact's headers (``Content-Length``, ``ETag``…) without its bytes."""
        return artifact_response(sha256, request, head=True)

    def signature_response(sha256: str, head: bool) -> Response:
        sig = lookup(sha256, store.read_signature)
        headers = {"Cache-Control": "no-cache"}
        if head:
            headers["Content-Length"] = str(len(sig))
            return Response(headers=headers, media_type="application/json")
        return Response(sig, media_type="application/json", headers=headers)

    def artifact_response(sha256: str, request: Request, head: bool) -> Response:
        fh = lookup(sha256, store.open)
        size = os.fstat(fh.fileno()).st_size
        etag = f'"{sha256}"'
        headers = {
            "Accept-Ranges": "bytes",
            "ETag": etag,
            "Cache-Control": "public, max-age=31536000, immutable",
        }
        status, start, end = 200, 0, size - 1
        if_range = request.headers.get("if-range")
        if if_range is None or if_range == etag:
            try:
                wanted = parse_range(request.headers.get("range"), size)
            except RangeNotSatisfiable:
                fh.close()
                raise HTTPException(416, "range not satisfiable", {"Content-Range": f"bytes */{size}"}) from None
            if wanted is not None:
                status, (start, end) = 206, wanted
                headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        length = end - start + 1
        headers["Content-Length"] = str(length)
        if head:
            fh.close()
            return Response(status_code=status, headers=headers, media_type="application/octet-stream")
        return StreamingResponse(
            _stream(fh, start, length), status_code=status, headers=headers, media_type="application/octet-stream"
        )

    return router
