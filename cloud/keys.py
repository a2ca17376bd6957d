"""The fleet signing key: ``fleet.key`` (private, mode 0600) and ``fleet.pub`` (public).

The coordinator signs desired states and artifacts with ``fleet.key``; devices trust
``fleet.pub``. To rotate, generate a new pair elsewhere, add its ``fleet.pub`` to the
devices' trusted keys, then switch the coordinator to the new key.
"""

from __future__ import annotations

import os
from pathlib import Path

from edgeml.protocol.signing import generate_keypair

from ._exceptions import KeyFileError, KeyFileExists

__all__ = ["PRIVATE_KEY_NAME", "PUBLIC_KEY_NAME", "generate_keys"]

PRIVATE_KEY_NAME = "fleet.key"
PUBLIC_KEY_NAME = "fleet.pub"


def generate_keys(out_dir: str | os.PathLike[str], *, force: bool = False) -> tuple[Path, Path]:
    """Write a new ed25519 pair to ``out_dir`` and return ``(key_path, pub_path)``.

    Refuses (:class:`KeyFileExists`) when ``fleet.key`` or ``fleet.pub`` exists, unless
    ``force``: replacing the key makes every device that trusts only the old one reject
    what the coordinator signs next. Each file is written to a temporary name, synced and
    renamed, so a crash never leaves a half-written key.
    """
    out = Path(out_dir)
    key_path, pub_path = out / PRIVATE_KEY_NAME, out / PUBLIC_KEY_NAME
    if not force:
        for path in (key_path, pub_path):
            if path.exists():
                raise KeyFileExists(
                    f"{path} already exists; devices trust the key it belongs to. "
                    "Pass force=True (--force) to replace it."
                )
    try:
        out.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise KeyFileError(f"cannot create key directory {out}: {exc.strerror}") from exc
    private_pem, public_pem = generate_keypair()
    _write_atomic(key_path, private_pem, 0o600)
    _write_atomic(pub_path, public_pem, 0o644)
    return key_path, pub_path


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fd, mode)  # O_CREAT's mode is umask-filtered and ignored if tmp existed
            fh.write(data)
            fh.flush()
            os.fsync(fd)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise KeyFileError(f"cannot write {path}: {exc.strerror}") from exc


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
