"""ed25519 signatures for desired-state documents and model artifacts.

Shared by the coordinator (signs) and the agent (verifies). Only ``cryptography`` is
needed, and it is imported inside the functions, so importing this module is free.

**Documents** (``DesiredState``): the signature covers :func:`canonical_json` of the
document without its ``signature`` field (``key_id`` included), and is stored in the
document as ``signature`` (base64). ``key_id`` names the signing key
(:func:`key_id`: the first 16 hex characters of the sha256 of the raw 32-byte public
key), so a device that trusts several keys (during a rotation) picks the right one.
Verify the JSON object exactly as received (``json.loads`` of the payload), before
validating it into a model: re-serialising a model may add defaults and change the bytes.

**Artifacts**: a detached signature over the file's sha256 digest. The signed message
is ``b"edgeml-artifact-sha256\\0" + digest`` (32 raw bytes; the prefix keeps an artifact
signature from ever being valid for a document or vice versa). It travels as a small
JSON file (the ``.sig`` beside the artifact)::

    {"key_id": "…16 hex…", "sha256": "…64 hex…", "signature": "…base64…", "v": 1}

A device hashes while downloading and calls :func:`verify_digest` at the end.

Every failure raises :class:`~edgeml._exceptions.SignatureError` with a ``reason``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._exceptions import SignatureError

if TYPE_CHECKING:
    from typing import TypeAlias

    from cryptography.hazmat.primitives.asymmetric.ed25519 import (
        Ed25519PrivateKey,
        Ed25519PublicKey,
    )

    #: A PEM file path, or PEM text / bytes.
    KeySource: TypeAlias = str | os.PathLike[str] | bytes
    #: Trusted keys in any form :func:`load_public_keys` accepts.
    PublicKeys: TypeAlias = (
        Mapping[str, Ed25519PublicKey] | Iterable[Ed25519PublicKey | KeySource] | KeySource
    )

__all__ = [
    "ARTIFACT_CONTEXT",
    "canonical_json",
    "generate_keypair",
    "key_id",
    "load_private_key",
    "load_public_keys",
    "sign_bytes",
    "sign_digest",
    "sign_document",
    "verify_bytes",
    "verify_digest",
    "verify_document",
]

#: Prefix of the message signed for an artifact (domain separation from documents).
ARTIFACT_CONTEXT = b"edgeml-artifact-sha256\x00"
_SIGNATURE_LEN = 64
_PEM_END = b"-----END"


# --------------------------------------------------------------------------- keys


def generate_keypair() -> tuple[bytes, bytes]:
    """A new ed25519 key pair: ``(private_pem, public_pem)`` (PKCS#8, unencrypted / SPKI)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return private_pem, public_pem


def key_id(public_key: Ed25519PublicKey) -> str:
    """First 16 hex characters of the sha256 of the raw 32-byte public key."""
    from cryptography.hazmat.primitives import serialization

    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def load_private_key(source: Ed25519PrivateKey | KeySource) -> Ed25519PrivateKey:
    """An ed25519 private key from a PEM file path or PEM bytes (or a key, returned as is)."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    if isinstance(source, Ed25519PrivateKey):
        return source
    pem, where = _read_pem(source)
    try:
        key = load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise SignatureError("bad_key", f"{where}: not an unencrypted PEM private key ({exc})") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise SignatureError("bad_key", f"{where}: expected an ed25519 key, got {type(key).__name__}")
    return key


def load_public_keys(sources: PublicKeys) -> dict[str, Ed25519PublicKey]:
    """Trusted public keys by :func:`key_id`.

    ``sources``: one or several PEM file paths, PEM bytes (a file or bytes may hold
    several ``PUBLIC KEY`` blocks), key objects, or an existing ``{key_id: key}`` mapping.
    """
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    if isinstance(sources, Mapping):
        return {key_id(k): k for k in sources.values()}
    if isinstance(sources, str | bytes | os.PathLike | Ed25519PublicKey):
        sources = [sources]
    keys: dict[str, Ed25519PublicKey] = {}
    for source in sources:
        if isinstance(source, Ed25519PublicKey):
            keys[key_id(source)] = source
            continue
        pem, where = _read_pem(source)
        for block in _pem_blocks(pem):
            key = _load_public_pem(block, where)
            keys[key_id(key)] = key
    return keys


def _load_public_pem(pem: bytes, where: str) -> Ed25519PublicKey:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    try:
        key = load_pem_public_key(pem)
    except (ValueError, TypeError) as exc:
        raise SignatureError("bad_key", f"{where}: not a PEM public key ({exc})") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise SignatureError("bad_key", f"{where}: expected an ed25519 key, got {type(key).__name__}")
    return key


def _read_pem(source: KeySource) -> tuple[bytes, str]:
    """PEM bytes and a description of where they came from (for error messages)."""
    if isinstance(source, bytes):
        return source, "PEM data"
    if isinstance(source, str) and source.lstrip().startswith("-----BEGIN"):
        return source.encode(), "PEM data"
    path = Path(source)
    try:
        return path.read_bytes(), f"key file {path}"
    except OSError as exc:
        raise SignatureError("bad_key", f"cannot read key file {path}: {exc.strerror}") from exc


def _pem_blocks(pem: bytes) -> list[bytes]:
    """Split concatenated PEM blocks; data without a block is returned whole (to fail clearly)."""
    blocks, current = [], []
    for line in pem.splitlines(keepends=True):
        current.append(line)
        if line.startswith(_PEM_END):
            blocks.append(b"".join(current))
            current = []
    return blocks or [pem]


def _keyring(public_keys: PublicKeys) -> dict[str, Ed25519PublicKey]:
    keys = load_public_keys(public_keys)
    if not keys:
        raise SignatureError("unknown_key", "no trusted public keys configured")
    return keys


# --------------------------------------------------------------------------- documents


def canonical_json(obj: Any) -> bytes:
    """The signed bytes of ``obj``: sorted keys, no whitespace, UTF-8, no NaN/Infinity,
    and, for a mapping, without its top-level ``signature`` field."""
    if isinstance(obj, Mapping):
        obj = {k: v for k, v in obj.items() if k != "signature"}
    try:
        text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise SignatureError("malformed", f"document is not canonical JSON: {exc}") from exc
    except RecursionError:  # nesting deeper than the interpreter's stack allows
        raise SignatureError("malformed", "document is nested too deeply") from None
    return text.encode("utf-8")


def sign_document(doc: Mapping[str, Any], private_key: Ed25519PrivateKey | KeySource) -> dict[str, Any]:
    """A copy of ``doc`` with ``key_id`` and ``signature`` (base64) set. ``doc`` is not changed."""
    key = load_private_key(private_key)
    signed = {k: v for k, v in doc.items() if k != "signature"}
    signed["key_id"] = key_id(key.public_key())
    signed["signature"] = base64.b64encode(key.sign(canonical_json(signed))).decode("ascii")
    return signed


def verify_document(doc: Mapping[str, Any], public_keys: PublicKeys) -> None:
    """Check ``doc``'s signature against the trusted keys; :class:`SignatureError` if not valid.

    With a ``key_id`` only that key is tried (``unknown_key`` if it is not trusted);
    without one, every trusted key is tried.
    """
    if not isinstance(doc, Mapping):
        raise SignatureError("malformed", f"expected a JSON object, got {type(doc).__name__}")
    signature = _decode_signature(doc.get("signature"))
    _verify(signature, canonical_json(doc), doc.get("key_id"), public_keys, "document")


def _decode_signature(value: Any) -> bytes:
    if value is None or value == "":
        raise SignatureError("missing_signature", "the document is not signed (no 'signature' field)")
    if not isinstance(value, str):
        raise SignatureError("malformed", f"'signature' must be a base64 string, got {type(value).__name__}")
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise SignatureError("malformed", f"'signature' is not valid base64: {exc}") from exc
    if len(raw) != _SIGNATURE_LEN:
        raise SignatureError("malformed", f"'signature' is {len(raw)} bytes, an ed25519 signature is 64")
    return raw


def _verify(signature: bytes, message: bytes, kid: Any, public_keys: PublicKeys, what: str) -> None:
    from cryptography.exceptions import InvalidSignature

    keys = _keyring(public_keys)
    if kid is not None and not isinstance(kid, str):
        raise SignatureError("malformed", f"'key_id' must be a string, got {type(kid).__name__}")
    if kid is not None:
        if kid not in keys:
            trusted = ", ".join(sorted(keys))
            raise SignatureError("unknown_key", f"{what} signed by unknown key {kid!r} (trusted: {trusted})")
        candidates = [keys[kid]]
    else:
        candidates = list(keys.values())
    for key in candidates:
        try:
            key.verify(signature, message)
            return
        except InvalidSignature:
            continue
    names = f"key {kid!r}" if kid is not None else f"any of {len(candidates)} trusted key(s)"
    raise SignatureError("bad_signature", f"{what} signature does not match {names}: content altered or wrong key")


# --------------------------------------------------------------------------- artifacts


def sign_digest(sha256: str, private_key: Ed25519PrivateKey | KeySource) -> bytes:
    """The detached signature file (JSON bytes) for an artifact with this sha256 (hex)."""
    digest = _digest_bytes(sha256)
    key = load_private_key(private_key)
    doc = {
        "v": 1,
        "sha256": digest.hex(),
        "key_id": key_id(key.public_key()),
        "signature": base64.b64encode(key.sign(ARTIFACT_CONTEXT + digest)).decode("ascii"),
    }
    return _signature_file_bytes(doc)


def sign_bytes(data: bytes, private_key: Ed25519PrivateKey | KeySource) -> bytes:
    """The detached signature file (JSON bytes) for ``data``."""
    return sign_digest(hashlib.sha256(data).hexdigest(), private_key)


def verify_digest(sha256: str, signature_file: bytes | Mapping[str, Any], public_keys: PublicKeys) -> None:
    """Check a detached signature against the sha256 (hex) computed over the downloaded file."""
    digest = _digest_bytes(sha256)
    sig = _parse_signature_file(signature_file)
    if sig.get("sha256") is not None and sig["sha256"] != digest.hex():
        raise SignatureError(
            "digest_mismatch", f"signature is for sha256 {sig['sha256']}, the file has {digest.hex()}"
        )
    signature = _decode_signature(sig.get("signature"))
    _verify(signature, ARTIFACT_CONTEXT + digest, sig.get("key_id"), public_keys, "artifact")


def verify_bytes(data: bytes, signature_file: bytes | Mapping[str, Any], public_keys: PublicKeys) -> None:
    """Check a detached signature against ``data``."""
    verify_digest(hashlib.sha256(data).hexdigest(), signature_file, public_keys)


def _signature_file_bytes(doc: Mapping[str, Any]) -> bytes:
    """Compact sorted JSON of ``doc``, ``signature`` included: the signature file's content."""
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode("utf-8")


def _parse_signature_file(signature_file: bytes | Mapping[str, Any]) -> Mapping[str, Any]:
    if isinstance(signature_file, Mapping):
        return signature_file
    try:
        doc = json.loads(signature_file)
    except (ValueError, UnicodeDecodeError) as exc:
        raise SignatureError("malformed", f"signature file is not JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise SignatureError("malformed", "signature file must hold a JSON object")
    return doc


def _digest_bytes(sha256: str) -> bytes:
    if not isinstance(sha256, str) or len(sha256) != 64:
        raise SignatureError("malformed", f"expected a sha256 as 64 hex characters, got {sha256!r}")
    try:
        return bytes.fromhex(sha256.lower())
    except ValueError as exc:
        raise SignatureError("malformed", f"expected a sha256 as 64 hex characters, got {sha256!r}") from exc
