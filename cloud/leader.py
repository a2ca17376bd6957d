"""Leader election: exactly one coordinator replica writes desired states and drives rollouts.

    election = LeaderElection("postgresql://edgeml@db/edgeml", on_change=print).start()
    election.wait_leader(timeout=5)   # True once this replica leads
    ...
    election.stop()                   # releases the lock; another replica takes over

PostgreSQL
    A session-level advisory lock, ``pg_try_advisory_lock(key)`` with ``key`` derived
    from ``name``, held on a dedicated connection (never one of the store's pooled
    connections: the lock lives exactly as long as that session). A background thread
    (``edgeml-leader``) tries to take the lock every ``retry_s`` while it is not the
    leader, and, while it is, checks every ``retry_s`` that the connection is alive
    (``SELECT 1``). If the connection dies the server has already released the lock
    (another replica may hold it now): the replica steps down at once and calls
    ``on_change(False)``; it campaigns again after ``rejoin_after_s`` (3 retry
    periods by default), so a replica with a healthy connection wins first. The server notices a dead replica when its socket closes: at
    once for a crashed process (the kernel closes it), after the TCP keepalive probes
    below for a replica cut off by the network.

SQLite
    A SQLite store is one file on one host, used by one coordinator: the election is
    trivial and the replica is always the leader (``start()`` makes it leader and calls
    ``on_change(True)``). Running two coordinators on one SQLite file is not supported.

Threads
    ``on_change(bool)`` runs on the election thread (SQLite: on the caller of
    ``start()``/``stop()``); it must be quick and must not call ``stop()``. An exception
    it raises is logged and does not stop the election.

Fencing
    Leadership is observed, not enforced: between the loss of the lock and the next
    check (at most ``retry_s`` plus the TCP timeouts) the old leader still believes it
    leads. Writers that must never overlap check ``is_leader`` right before acting and
    keep their writes idempotent and ordered by the store (desired-state revisions are
    allocated under a row lock, so they stay unique and growing even then).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import threading
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from ._exceptions import ConfigError

log = logging.getLogger(__name__)

DEFAULT_NAME = "edgeml-coordinator"
#: libpq TCP settings of the lock connection: a silent peer is declared dead in ~10 s.
_PG_KEEPALIVE = {
    "keepalives": 1, "keepalives_idle": 5, "keepalives_interval": 2, "keepalives_count": 3,
    "tcp_user_timeout": 10_000,
}


def lock_key(name: str) -> int:
    """The signed 64-bit advisory lock key of an election ``name``."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)


class LeaderElection:
    """Become and stay the single leader among the replicas sharing ``db_url``."""

    def __init__(
        self, db_url: str, name: str = DEFAULT_NAME, retry_s: float = 1.0,
        on_change: Callable[[bool], Any] | None = None, *, connect_timeout_s: int = 5,
        rejoin_after_s: float | None = None,
    ) -> None:
        if retry_s <= 0:
            raise ConfigError(f"retry_s must be > 0, got {retry_s}")
        scheme = urlsplit(db_url).scheme
        if scheme in ("postgresql", "postgres"):
            self.dialect = "postgresql"
        elif scheme in ("sqlite", ""):
            self.dialect = "sqlite"
        else:
            raise ConfigError(f"unsupported store URL {db_url!r}: use sqlite:///path or postgresql://...")
        self.db_url = db_url
        self.name = name
        self.key = lock_key(name)
        self.retry_s = retry_s
        self.on_change = on_change
        self.connect_timeout_s = connect_timeout_s
        self.rejoin_after_s = 3 * retry_s if rejoin_after_s is None else rejoin_after_s
        self._leader = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._conn: Any = None  # election thread only (and stop() after joining it)

    # ------------------------------------------------------------------ public
    @property
    def is_leader(self) -> bool:
        return self._leader.is_set()

    def wait_leader(self, timeout: float | None = None) -> bool:
        """Wait until this replica leads; False if ``timeout`` passed first."""
        return self._leader.wait(timeout)

    def start(self) -> LeaderElection:
        if self._thread is not None:
            raise RuntimeError("election already started")
        self._stop.clear()
        if self.dialect == "sqlite":
            self._set(True)
            return self
        self._thread = threading.Thread(target=self._run, name="edgeml-leader", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop campaigning; a leader releases the lock (closing its connection) and steps down."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        self._close()
        self._set(False)

    def __enter__(self) -> LeaderElection:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ election thread
    def _run(self) -> None:
        while not self._stop.is_set():
            if self.is_leader:
                if not self._alive():
                    log.warning("leader connection lost: stepping down (%s)", self.name)
                    self._close()
                    self._set(False)
                    self._stop.wait(self.rejoin_after_s)  # let a healthy replica win first
                    continue
            elif self._try_acquire():
                log.info("became leader (%s, lock key %d)", self.name, self.key)
                self._set(True)
            self._stop.wait(self.retry_s)

    def _try_acquire(self) -> bool:
        import psycopg

        try:
            if self._conn is None:
                self._conn = psycopg.connect(
                    self.db_url, autocommit=True, connect_timeout=self.connect_timeout_s,
                    application_name=f"{self.name}-leader", **_PG_KEEPALIVE,
                )
            return bool(self._conn.execute("SELECT pg_try_advisory_lock(%s)", (self.key,)).fetchone()[0])
        except psycopg.Error as exc:
            log.warning("leader election: cannot reach the database (retrying in %.1fs): %s", self.retry_s, exc)
            self._close()
            return False

    def _alive(self) -> bool:
        import psycopg

        try:
            self._conn.execute("SELECT 1").fetchone()
            return True
        except psycopg.Error:
            return False

    def _close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            import psycopg

            with contextlib.suppress(psycopg.Error):  # closing ends the session: the lock goes with it
                conn.close()

    def _set(self, leader: bool) -> None:
        if leader == self.is_leader:
            return
        if leader:
            self._leader.set()
        else:
            self._leader.clear()
        if self.on_change is not None:
            try:
                self.on_change(leader)
            except Exception:
                log.exception("leader on_change callback failed")

    @property
    def backend_pid(self) -> int | None:
        """PID of the server process holding (or trying for) the lock; PostgreSQL only."""
        conn = self._conn
        return None if conn is None else conn.info.backend_pid
