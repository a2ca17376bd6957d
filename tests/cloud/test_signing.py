"""ed25519 signing of desired states and artifacts, and the fleet key files."""

from __future__ import annotations

import base64
import json
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from cloud._exceptions import KeyFileExists
from cloud.keys import generate_keys
from edgeml._exceptions import EdgemlError, SignatureError
from edgeml.protocol import DesiredState
from edgeml.protocol.signing import (
    canonical_json,
    generate_keypair,
    key_id,
    load_private_key,
    load_public_keys,
    sign_bytes,
    sign_document,
    verify_bytes,
    verify_digest,
    verify_document,
)

SHA = "ab" * 32


@pytest.fixture(scope="module")
def pair() -> tuple[bytes, bytes]:
    return generate_keypair()


@pytest.fixture(scope="module")
def other() -> tuple[bytes, bytes]:
    return generate_keypair()


def desired(revision: int = 3) -> dict:
    return {
        "v": 1,
        "revision": revision,
        "issued_at": 1700000000.25,
        "expires_at": None,
        "model": {"name": "mlp", "version": "1.2.0", "url": "https://c/v1/artifacts/" + SHA, "sha256": SHA, "size": 949},
    }


def reason(exc_info: pytest.ExceptionInfo[SignatureError]) -> str:
    return exc_info.value.reason


# --------------------------------------------------------------------------- canonical form


def test_canonical_json_is_sorted_compact_utf8_without_signature() -> None:
    doc = {"b": 1, "a": {"y": [1, 2], "x": "é"}, "signature": "zzz"}
    assert canonical_json(doc) == '{"a":{"x":"é","y":[1,2]},"b":1}'.encode()
    assert canonical_json(dict(reversed(doc.items()))) == canonical_json(doc)


def test_canonical_json_rejects_nan() -> None:
    with pytest.raises(SignatureError) as exc:
        canonical_json({"x": float("nan")})
    assert reason(exc) == "malformed"


# --------------------------------------------------------------------------- documents


def test_round_trip_through_json_and_the_model(pair: tuple[bytes, bytes]) -> None:
    private_pem, public_pem = pair
    doc = desired()
    signed = sign_document(doc, load_private_key(private_pem))
    assert "signature" not in doc, "the input is not modified"
    assert signed["key_id"] == key_id(load_private_key(private_pem).public_key())
    assert len(signed["key_id"]) == 16
    received = json.loads(json.dumps(signed, indent=2))  # any whitespace/order on the wire
    verify_document(received, [public_pem])
    assert DesiredState.model_validate(received).key_id == signed["key_id"]


def test_sign_document_accepts_pem_bytes_and_resigns(pair: tuple[bytes, bytes]) -> None:
    signed = sign_document(desired(), pair[0])
    again = sign_document(signed, pair[0])  # an old signature is replaced, not signed over
    verify_document(again, pair[1])


@pytest.mark.parametrize(
    ("path", "value"),
    [(("revision",), 4), (("model", "sha256"), "cd" * 32), (("expires_at",), 1.0), (("extra",), True)],
)
def test_tampered_field_fails(pair: tuple[bytes, bytes], path: tuple[str, ...], value: object) -> None:
    signed = sign_document(desired(), pair[0])
    target = signed
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    with pytest.raises(SignatureError) as exc:
        verify_document(signed, [pair[1]])
    assert reason(exc) == "bad_signature"


def test_tampered_signature_fails(pair: tuple[bytes, bytes]) -> None:
    signed = sign_document(desired(), pair[0])
    raw = bytearray(base64.b64decode(signed["signature"]))
    raw[10] ^= 0x01
    signed["signature"] = base64.b64encode(bytes(raw)).decode()
    with pytest.raises(SignatureError) as exc:
        verify_document(signed, [pair[1]])
    assert reason(exc) == "bad_signature"


@pytest.mark.parametrize("bad", ["not base64!", base64.b64encode(b"short").decode(), 42])
def test_malformed_signature_fails(pair: tuple[bytes, bytes], bad: object) -> None:
    signed = {**sign_document(desired(), pair[0]), "signature": bad}
    with pytest.raises(SignatureError) as exc:
        verify_document(signed, [pair[1]])
    assert reason(exc) == "malformed"


@pytest.mark.parametrize("signature", [None, ""])
def test_missing_signature_fails(pair: tuple[bytes, bytes], signature: str | None) -> None:
    doc = desired() if signature is None else {**desired(), "signature": signature}
    with pytest.raises(SignatureError, match="not signed") as exc:
        verify_document(doc, [pair[1]])
    assert reason(exc) == "missing_signature"
    assert isinstance(exc.value, EdgemlError)


def test_wrong_key_fails(pair: tuple[bytes, bytes], other: tuple[bytes, bytes]) -> None:
    signed = sign_document(desired(), pair[0])
    with pytest.raises(SignatureError, match="unknown key") as exc:
        verify_document(signed, [other[1]])
    assert reason(exc) == "unknown_key"
    # a forged key_id naming the trusted key does not help
    forged = sign_document(desired(), other[0])
    forged["key_id"] = signed["key_id"]
    with pytest.raises(SignatureError) as exc:
        verify_document(forged, [pair[1]])
    assert reason(exc) == "bad_signature"


def test_no_key_id_tries_every_trusted_key(pair: tuple[bytes, bytes], other: tuple[bytes, bytes]) -> None:
    signed = sign_document(desired(), pair[0])
    key = load_private_key(pair[0])
    legacy = {k: v for k, v in signed.items() if k not in ("key_id", "signature")}
    legacy["signature"] = base64.b64encode(key.sign(canonical_json(legacy))).decode()
    verify_document(legacy, [other[1], pair[1]])
    with pytest.raises(SignatureError) as exc:
        verify_document(legacy, [other[1]])
    assert reason(exc) == "bad_signature"


def test_no_trusted_keys_fails(pair: tuple[bytes, bytes]) -> None:
    with pytest.raises(SignatureError, match="no trusted"):
        verify_document(sign_document(desired(), pair[0]), [])


def test_key_rotation_with_two_trusted_keys(tmp_path: Path) -> None:
    old_key, old_pub = generate_keys(tmp_path / "old")
    new_key, new_pub = generate_keys(tmp_path / "new")
    by_old = sign_document(desired(5), load_private_key(old_key))
    by_new = sign_document(desired(6), load_private_key(new_key))
    bundle = tmp_path / "trusted.pem"  # one file holding both keys
    bundle.write_bytes(old_pub.read_bytes() + new_pub.read_bytes())
    for trusted in ([old_pub, new_pub], [str(old_pub), str(new_pub)], bundle, load_public_keys(bundle)):
        assert len(load_public_keys(trusted)) == 2
        verify_document(by_old, trusted)
        verify_document(by_new, trusted)
    # rotation done: the old key is retired
    verify_document(by_new, [new_pub])
    with pytest.raises(SignatureError) as exc:
        verify_document(by_old, [new_pub])
    assert reason(exc) == "unknown_key"


# --------------------------------------------------------------------------- keys


def test_bad_key_material_is_a_clear_error(tmp_path: Path, pair: tuple[bytes, bytes]) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    with pytest.raises(SignatureError, match="cannot read key file") as exc:
        load_private_key(tmp_path / "nope.key")
    assert reason(exc) == "bad_key"
    with pytest.raises(SignatureError, match="not an unencrypted PEM private key"):
        load_private_key(b"garbage")
    with pytest.raises(SignatureError, match="not a PEM public key"):
        load_public_keys([pair[0]])  # a private key where a public one is expected
    ec_pem = ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    with pytest.raises(SignatureError, match="expected an ed25519 key"):
        load_public_keys(ec_pem)


def test_generate_keys_permissions_and_no_overwrite(tmp_path: Path) -> None:
    key_path, pub_path = generate_keys(tmp_path / "keys")
    assert (key_path.name, pub_path.name) == ("fleet.key", "fleet.pub")
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(pub_path.stat().st_mode) == 0o644
    private = load_private_key(key_path)
    assert list(load_public_keys(pub_path)) == [key_id(private.public_key())]
    before = key_path.read_bytes()
    with pytest.raises(KeyFileExists, match="already exists.*force=True"):
        generate_keys(tmp_path / "keys")
    assert key_path.read_bytes() == before
    generate_keys(tmp_path / "keys", force=True)
    assert key_path.read_bytes() != before
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert sorted(p.name for p in key_path.parent.iterdir()) == ["fleet.key", "fleet.pub"]


# --------------------------------------------------------------------------- artifacts


def test_artifact_signature_round_trip(pair: tuple[bytes, bytes], other: tuple[bytes, bytes]) -> None:
    data = b"model bytes" * 1000
    sig = sign_bytes(data, pair[0])
    verify_bytes(data, sig, [pair[1]])
    import hashlib

    verify_digest(hashlib.sha256(data).hexdigest(), json.loads(sig), [pair[1]])
    with pytest.raises(SignatureError) as exc:
        verify_bytes(data + b"!", sig, [pair[1]])
    assert reason(exc) == "digest_mismatch"
    no_sha = {k: v for k, v in json.loads(sig).items() if k != "sha256"}
    with pytest.raises(SignatureError) as exc:
        verify_bytes(data + b"!", no_sha, [pair[1]])
    assert reason(exc) == "bad_signature"
    with pytest.raises(SignatureError) as exc:
        verify_bytes(data, sig, [other[1]])
    assert reason(exc) == "unknown_key"
    with pytest.raises(SignatureError) as exc:
        verify_bytes(data, b"not json", [pair[1]])
    assert reason(exc) == "malformed"


def test_artifact_and_document_signatures_are_not_interchangeable(pair: tuple[bytes, bytes]) -> None:
    sig = json.loads(sign_bytes(b"x", pair[0]))
    doc = {"sha256": sig["sha256"], "key_id": sig["key_id"], "v": 1, "signature": sig["signature"]}
    with pytest.raises(SignatureError) as exc:
        verify_document(doc, [pair[1]])
    assert reason(exc) == "bad_signature"


def test_importing_signing_does_not_import_cryptography() -> None:
    code = "import sys, edgeml.protocol.signing; sys.exit('cryptography' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_cli_keys_generate(tmp_path) -> None:
    import subprocess
    import sys

    from edgeml.protocol.signing import (
        load_private_key,
        load_public_keys,
        sign_document,
        verify_document,
    )

    cmd = [sys.executable, "-m", "edgeml.cli", "keys", "generate", "--out", str(tmp_path / "k")]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert first.returncode == 0, first.stderr
    key, pub = tmp_path / "k" / "fleet.key", tmp_path / "k" / "fleet.pub"
    assert key.stat().st_mode & 0o777 == 0o600
    doc = sign_document({"v": 1, "revision": 1}, load_private_key(key))
    verify_document(doc, load_public_keys([pub]))
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert again.returncode == 1 and "exist" in again.stderr
