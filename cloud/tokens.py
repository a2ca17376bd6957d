"""API tokens, roles and the audit log of changes.

    tokens = Tokens(store)
    secret, record = tokens.create("ci", Role.OPERATOR, actor=ANONYMOUS)   # secret shown once
    tokens.verify(secret)          # -> Identity("ci", Role.OPERATOR) or None
    tokens.revoke("ci", actor=...)

A token is ``edgeml_`` + 32 random bytes (URL-safe base64); the store keeps only its
sha256, so a copy of the database does not let anyone in. Roles are ordered
``viewer < operator < admin``. A revoked token stays in the table (its name is not
reused), so the audit log keeps meaning and revoking the last token does not open the
API again. :func:`audit` writes one entry of ``audit_log`` (migration 5, with the
actor's role since migration 7); :func:`audit_entries` reads them back, filtered.
Raises :class:`~cloud._exceptions.InvalidInput` (bad name or role),
:class:`~cloud._exceptions.Conflict` (name taken) and :class:`~cloud._exceptions.NotFound`.
"""

from __future__ import annotations

import enum
import hashlib
import re
import secrets
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson

from ._exceptions import CloudError, Conflict, InvalidInput, NotFound

if TYPE_CHECKING:
    from .store import Store, Transaction

__all__ = [
    "ANONYMOUS", "AuthError", "Forbidden", "Identity", "Role", "TokenRecord", "Tokens", "Unauthorized",
    "audit", "audit_entries", "hash_token",
]

TOKEN_PREFIX = "edgeml_"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")


class Role(enum.IntEnum):
    """What a token may do; a higher role may do everything a lower one may."""

    VIEWER = 1  # read everything
    OPERATOR = 2  # + change the fleet: rollouts, desired states, models, devices, training
    ADMIN = 3  # + manage tokens

    @classmethod
    def parse(cls, text: str) -> Role:
        try:
            return cls[text.strip().upper()]
        except (KeyError, AttributeError):
            raise InvalidInput(f"role must be one of viewer, operator, admin, got {text!r}") from None

    def __str__(self) -> str:
        return self.name.lower()


class AuthError(CloudError):
    """A request is not allowed (see :mod:`cloud.api._auth` for the HTTP statuses)."""


class Unauthorized(AuthError):
    """No token, or a token that is unknown or revoked: HTTP 401."""


class Forbidden(AuthError):
    """A valid token whose role is too weak for the route: HTTP 403."""


@dataclass(frozen=True, slots=True)
class Identity:
    """Who makes a request: a token's name and role, or ``anonymous`` (the API is open)."""

    name: str
    role: Role


#: The actor when no token exists and ``auth.required`` is false: every request is admin.
ANONYMOUS = Identity("anonymous", Role.ADMIN)


@dataclass(frozen=True, slots=True)
class TokenRecord:
    name: str
    role: Role
    created_at: float
    created_by: str
    revoked_at: float | None

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "role": str(self.role), "created_at": self.created_at,
                "created_by": self.created_by, "revoked_at": self.revoked_at, "active": self.revoked_at is None}


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def _check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise InvalidInput(f"token name must be 1-64 of letters, digits and ._@- (starting with a letter "
                           f"or digit), got {name!r}")
    return name


def _record(row: Any) -> TokenRecord:
    return TokenRecord(name=row[0], role=Role.parse(row[1]), created_at=row[2], created_by=row[3], revoked_at=row[4])


class Tokens:
    """Create, list, revoke and verify API tokens in a store."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def create(self, name: str, role: Role | str, *, actor: Identity = ANONYMOUS) -> tuple[str, TokenRecord]:
        """A new token: the secret (returned here only) and its record. Audited."""
        _check_name(name)
        role = role if isinstance(role, Role) else Role.parse(role)
        secret = TOKEN_PREFIX + secrets.token_urlsafe(32)
        now = time.time()
        with self.store.transaction(write=True) as tx:
            if tx.execute("SELECT 1 FROM api_tokens WHERE name = ?", (name,)).fetchone():
                raise Conflict(f"a token named {name!r} exists (revoked names are not reused)")
            tx.execute("INSERT INTO api_tokens (name, role, token_sha256, created_at, created_by, revoked_at) "
                       "VALUES (?, ?, ?, ?, ?, NULL)", (name, str(role), hash_token(secret), now, actor.name))
            audit(tx, actor.name, str(actor.role), "token_create", f"token {name!r} created with role {role}",
                  {"token": name, "role": str(role)})
        return secret, TokenRecord(name, role, now, actor.name, None)

    def list(self) -> list[TokenRecord]:
        with self.store.transaction() as tx:
            rows = tx.execute("SELECT name, role, created_at, created_by, revoked_at FROM api_tokens "
                              "ORDER BY created_at, name").fetchall()
        return [_record(r) for r in rows]

    def revoke(self, name: str, *, actor: Identity = ANONYMOUS) -> TokenRecord:
        """Revoke a token at once (idempotent). Audited."""
        with self.store.transaction(write=True) as tx:
            row = tx.execute("SELECT name, role, created_at, created_by, revoked_at FROM api_tokens WHERE name = ?",
                             (name,)).fetchone()
            if row is None:
                raise NotFound(f"no token named {name!r}")
            record = _record(row)
            if record.revoked_at is None:
                now = time.time()
                tx.execute("UPDATE api_tokens SET revoked_at = ? WHERE name = ?", (now, name))
                audit(tx, actor.name, str(actor.role), "token_revoke", f"token {name!r} revoked",
                      {"token": name, "role": str(record.role)})
                record = TokenRecord(record.name, record.role, record.created_at, record.created_by, now)
        return record

    def verify(self, secret: str) -> Identity | None:
        """The identity of an active token, or None (unknown, revoked or malformed)."""
        found = self.lookup(secret)
        return None if found is None or found[1] is not None else found[0]

    def lookup(self, secret: str) -> tuple[Identity, float | None] | None:
        """The identity of a token and when it was revoked (None: active); None if unknown."""
        if not secret.startswith(TOKEN_PREFIX) or len(secret) > 200:
            return None
        with self.store.transaction() as tx:
            row = tx.execute("SELECT name, role, revoked_at FROM api_tokens WHERE token_sha256 = ?",
                             (hash_token(secret),)).fetchone()
        return None if row is None else (Identity(row[0], Role.parse(row[1])), row[2])

    def any(self) -> bool:
        """Whether any token was ever created (revoked ones count)."""
        with self.store.transaction() as tx:
            return tx.execute("SELECT 1 FROM api_tokens LIMIT 1").fetchone() is not None


# --------------------------------------------------------------------------- audit log


def audit(tx: Transaction, actor: str, role: str | None, action: str, reason: str,
          evidence: dict[str, Any] | None = None, rollout_id: str | None = None) -> None:
    """One audit entry, in the caller's transaction (``role`` None: the caller was not identified)."""
    tx.execute("INSERT INTO audit_log (ts, actor, role, action, rollout_id, reason, evidence) "
               "VALUES (?, ?, ?, ?, ?, ?, ?)",
               (time.time(), actor, role, action, rollout_id, reason,
                orjson.dumps(evidence or {}).decode()))


def audit_entries(store: Store, *, actor: str | None = None, action: str | None = None,
                  rollout_id: str | None = None, since: float | None = None, until: float | None = None,
                  limit: int = 100) -> list[dict[str, Any]]:
    """Audit entries, newest first, filtered by exact actor, action, rollout and time range."""
    where, params = [], []
    for column, value in (("actor", actor), ("action", action), ("rollout_id", rollout_id)):
        if value is not None:
            where.append(f"{column} = ?")
            params.append(value)
    if since is not None:
        where.append("ts >= ?")
        params.append(since)
    if until is not None:
        where.append("ts < ?")
        params.append(until)
    sql = "SELECT id, ts, actor, role, action, rollout_id, reason, evidence FROM audit_log"
    if where:
        sql += " WHERE " + " AND ".join(where)
    with store.transaction() as tx:
        rows = tx.execute(f"{sql} ORDER BY id DESC LIMIT ?", (*params, int(limit))).fetchall()
    return [{"id": r[0], "ts": r[1], "actor": r[2], "role": r[3], "action": r[4], "rollout_id": r[5],
             "reason": r[6], "evidence": orjson.loads(r[7]) if r[7] else {}} for r in rows]
