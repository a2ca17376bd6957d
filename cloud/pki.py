"""The fleet CA: device identities for mutual TLS with the broker, and their revocation.

    edgeml ca init --out ca/                                  # ca.key (0600), ca.crt, crl.pem
    edgeml ca broker --ca ca/ --out broker/ --host mqtt.example.com   # broker server cert
    edgeml ca coordinator --ca ca/ --out coordinator/          # the coordinator's client cert
    edgeml devices enroll dev-1 --ca ca/ --out dev-1/          # dev-1.key, dev-1.crt, ca.crt
    edgeml devices revoke dev-1 --ca ca/                       # crl.pem written again

Every certificate has an ECDSA P-256 key and is signed by the CA. A client certificate's
common name is the MQTT username (Mosquitto's ``use_identity_as_username``): a device's is
its device id, so the ACL patterns (``%u``) give it its own topics only; the coordinator's
is :data:`COORDINATOR_CN`, which no device may take. A device certificate carries the
``clientAuth`` extended key usage only, the broker's ``serverAuth`` only, so neither can
pose as the other.

The CA directory holds ``ca.key``, ``ca.crt``, ``crl.pem`` (the revocation list the broker
loads with ``crlfile``) and ``index.json`` (every certificate issued: serial, common name,
kind, expiry, revocation time). The CRL has a ``next_update`` (:data:`CRL_DAYS`): the broker
refuses every client once it has passed, so run ``edgeml ca crl`` before then (a timer).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from edgeml.protocol import check_id

from ._exceptions import KeyFileError, KeyFileExists
from .keys import _write_atomic

__all__ = [
    "BROKER_CN",
    "COORDINATOR_CN",
    "FleetCA",
    "Issued",
    "PkiError",
    "init_ca",
    "load_ca",
]

CA_KEY = "ca.key"
CA_CERT = "ca.crt"
CRL_FILE = "crl.pem"
INDEX_FILE = "index.json"
#: The coordinator's MQTT username (the common name of its client certificate).
COORDINATOR_CN = "edgeml-coordinator"
#: The broker's server certificate common name.
BROKER_CN = "edgeml-broker"
RESERVED_NAMES = frozenset({COORDINATOR_CN, BROKER_CN})
CA_DAYS = 3650
CERT_DAYS = 825
CRL_DAYS = 30

Kind = Literal["device", "coordinator", "broker"]


class PkiError(KeyFileError):
    """A CA operation cannot be done (no CA, a reserved or unknown name, a file exists)."""


@dataclass(frozen=True, slots=True)
class Issued:
    """Files written for one certificate."""

    common_name: str
    serial: int
    key: Path
    cert: Path
    ca_cert: Path


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _new_key() -> Any:
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _cert_pem(cert: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return cert.public_bytes(serialization.Encoding.PEM)


def _name(common_name: str, org: str = "edgeml") -> Any:
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, org),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def init_ca(out_dir: str | os.PathLike[str], *, name: str = "edgeml fleet CA", days: int = CA_DAYS,
            force: bool = False) -> FleetCA:
    """Create a CA in ``out_dir`` (key 0600, self-signed certificate, empty CRL)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    out = Path(out_dir)
    if not force and (out / CA_KEY).exists():
        raise KeyFileExists(f"{out / CA_KEY} already exists: every certificate of the fleet chains to it. "
                            "Pass --force to replace it.")
    try:
        out.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise PkiError(f"cannot create CA directory {out}: {exc.strerror}") from exc
    key = _new_key()
    subject = _name(name)
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject).issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_atomic(out / CA_KEY, _key_pem(key), 0o600)
    _write_atomic(out / CA_CERT, _cert_pem(cert), 0o644)
    _write_atomic(out / INDEX_FILE, b'{"certificates": []}\n', 0o644)
    ca = FleetCA(out, key, cert)
    ca.write_crl()
    return ca


def load_ca(ca_dir: str | os.PathLike[str]) -> FleetCA:
    """The CA in ``ca_dir``; :class:`PkiError` naming the missing or bad file."""
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    root = Path(ca_dir)
    try:
        key = load_pem_private_key((root / CA_KEY).read_bytes(), password=None)
        cert = x509.load_pem_x509_certificate((root / CA_CERT).read_bytes())
    except FileNotFoundError as exc:
        raise PkiError(f"no CA in {root}: {exc.filename} is missing (create one with: edgeml ca init --out DIR)") \
            from exc
    except (OSError, ValueError) as exc:
        raise PkiError(f"cannot load the CA in {root}: {exc}") from exc
    return FleetCA(root, key, cert)


class FleetCA:
    """Issues and revokes certificates; keeps ``index.json`` and ``crl.pem`` up to date."""

    def __init__(self, root: Path, key: Any, cert: Any) -> None:
        self.root = root
        self.key = key
        self.cert = cert

    @property
    def cert_path(self) -> Path:
        return self.root / CA_CERT

    @property
    def crl_path(self) -> Path:
        return self.root / CRL_FILE

    # ------------------------------------------------------------------ index
    def index(self) -> list[dict[str, Any]]:
        try:
            data = json.loads((self.root / INDEX_FILE).read_text())
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as exc:
            raise PkiError(f"cannot read {self.root / INDEX_FILE}: {exc}") from exc
        return list(data.get("certificates", []))

    def _save_index(self, entries: list[dict[str, Any]]) -> None:
        text = json.dumps({"certificates": entries}, indent=1, sort_keys=True) + "\n"
        _write_atomic(self.root / INDEX_FILE, text.encode(), 0o644)

    # ------------------------------------------------------------------ issuing
    def enroll_device(self, device: str, out_dir: str | os.PathLike[str], *, days: int = CERT_DAYS,
                      force: bool = False) -> Issued:
        """Key and client certificate for ``device`` (CN = device id) in ``out_dir``."""
        try:
            check_id(device, "device")
        except ValueError as exc:
            raise PkiError(str(exc)) from None
        if device in RESERVED_NAMES:
            raise PkiError(f"{device!r} is reserved (the coordinator's or the broker's name), not a device id")
        return self.issue(device, "device", out_dir, days=days, force=force)

    def issue_coordinator(self, out_dir: str | os.PathLike[str], *, days: int = CERT_DAYS,
                          force: bool = False) -> Issued:
        """The coordinator's client certificate (CN :data:`COORDINATOR_CN`)."""
        return self.issue(COORDINATOR_CN, "coordinator", out_dir, days=days, force=force)

    def issue_broker(self, out_dir: str | os.PathLike[str], hosts: list[str], *, days: int = CERT_DAYS,
                     force: bool = False) -> Issued:
        """The broker's server certificate, valid for ``hosts`` (names or IP addresses)."""
        if not hosts:
            raise PkiError("the broker certificate needs at least one host name or address (--host)")
        return self.issue(BROKER_CN, "broker", out_dir, hosts=hosts, days=days, force=force)

    def issue(self, common_name: str, kind: Kind, out_dir: str | os.PathLike[str], *, hosts: Sequence[str] = (),
              days: int = CERT_DAYS, force: bool = False) -> Issued:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes
        from cryptography.x509.oid import ExtendedKeyUsageOID

        out = Path(out_dir)
        stem = "broker" if kind == "broker" else common_name
        key_path, cert_path = out / f"{stem}.key", out / f"{stem}.crt"
        if not force and (key_path.exists() or cert_path.exists()):
            raise KeyFileExists(f"{key_path} or {cert_path} already exists; pass --force to replace them")
        try:
            out.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:
            raise PkiError(f"cannot create {out}: {exc.strerror}") from exc
        key = _new_key()
        now = _now()
        not_after = min(now + dt.timedelta(days=days), self.cert.not_valid_after_utc)
        usage = ExtendedKeyUsageOID.SERVER_AUTH if kind == "broker" else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name)).issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=kind == "broker",
                                         key_cert_sign=False, crl_sign=False, encipher_only=False,
                                         decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False)
        )
        if hosts:
            builder = builder.add_extension(x509.SubjectAlternativeName([_san(h) for h in hosts]), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        _write_atomic(key_path, _key_pem(key), 0o600)
        _write_atomic(cert_path, _cert_pem(cert), 0o644)
        ca_copy = out / CA_CERT
        if ca_copy.resolve() != self.cert_path.resolve():
            _write_atomic(ca_copy, _cert_pem(self.cert), 0o644)
        entries = self.index()
        entries.append({"serial": format(cert.serial_number, "x"), "cn": common_name, "kind": kind,
                        "not_after": not_after.isoformat(), "revoked_at": None})
        self._save_index(entries)
        return Issued(common_name, cert.serial_number, key_path, cert_path, ca_copy)

    # ------------------------------------------------------------------ revocation
    def revoke(self, common_name: str) -> list[int]:
        """Revoke every certificate issued to ``common_name``; write the CRL. Returns the serials."""
        entries = self.index()
        now = _now().isoformat()
        serials = []
        for entry in entries:
            if entry["cn"] == common_name and entry["revoked_at"] is None:
                entry["revoked_at"] = now
                serials.append(int(entry["serial"], 16))
        if not serials and not any(e["cn"] == common_name for e in entries):
            raise PkiError(f"no certificate was issued to {common_name!r} by the CA in {self.root}")
        self._save_index(entries)
        self.write_crl()
        return serials

    def revoked(self) -> set[int]:
        return {int(e["serial"], 16) for e in self.index() if e["revoked_at"] is not None}

    def write_crl(self, days: int = CRL_DAYS) -> Path:
        """Write ``crl.pem``: every revoked serial, valid for ``days`` (the broker reloads it on SIGHUP)."""
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization

        now = _now()
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.cert.subject)
            .last_update(now - dt.timedelta(minutes=5))
            .next_update(now + dt.timedelta(days=days))
            .add_extension(x509.CRLNumber(int(now.timestamp() * 1000)), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False)
        )
        for entry in self.index():
            if entry["revoked_at"] is None:
                continue
            revoked = (x509.RevokedCertificateBuilder()
                       .serial_number(int(entry["serial"], 16))
                       .revocation_date(dt.datetime.fromisoformat(entry["revoked_at"]))
                       .build())
            builder = builder.add_revoked_certificate(revoked)
        crl = builder.sign(self.key, hashes.SHA256())
        _write_atomic(self.crl_path, crl.public_bytes(serialization.Encoding.PEM), 0o644)
        return self.crl_path


def _san(host: str) -> Any:
    from cryptography import x509

    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)
