"""Leader election: one leader among replicas on PostgreSQL; failover on stop and on a dead connection."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest

from cloud.leader import LeaderElection

from ..conftest import wait_until


class Recorder:
    """Collects on_change calls (they arrive on the election thread)."""

    def __init__(self) -> None:
        self.changes: list[bool] = []
        self._lock = threading.Lock()

    def __call__(self, leader: bool) -> None:
        with self._lock:
            self.changes.append(leader)


@pytest.fixture
def pg_url(store_url: str) -> str:
    if not store_url.startswith("postgresql"):
        pytest.skip("PostgreSQL election")
    return store_url


@pytest.fixture
def elections(pg_url: str) -> Iterator[Callable[..., LeaderElection]]:
    made: list[LeaderElection] = []

    def make(**kwargs: object) -> LeaderElection:
        made.append(LeaderElection(pg_url, retry_s=0.1, **kwargs))  # type: ignore[arg-type]
        return made[-1]

    yield make
    for e in made:
        e.stop()


@pytest.mark.parametrize("store_url", ["postgresql"], indirect=True)
def test_exactly_one_leader_and_failover_on_stop(elections: Callable[..., LeaderElection]) -> None:
    rec_a, rec_b = Recorder(), Recorder()
    a = elections(on_change=rec_a).start()
    assert a.wait_leader(10)
    b = elections(on_change=rec_b).start()
    for _ in range(5):  # b campaigns several times and loses every time
        assert not b.wait_leader(0.1)
    assert (a.is_leader, b.is_leader) == (True, False)
    a.stop()
    assert not a.is_leader and rec_a.changes == [True, False]
    assert b.wait_leader(10)
    assert rec_b.changes == [True]


@pytest.mark.parametrize("store_url", ["postgresql"], indirect=True)
def test_dead_leader_connection_steps_down_and_other_takes_over(
    elections: Callable[..., LeaderElection], pg_url: str
) -> None:
    rec_a = Recorder()
    a = elections(on_change=rec_a, rejoin_after_s=1.0).start()  # a dead replica would never rejoin
    assert a.wait_leader(10)
    b = elections().start()
    assert not b.wait_leader(0.3)
    pid = a.backend_pid
    with psycopg.connect(pg_url, autocommit=True) as admin:  # a third connection kills the leader's session
        assert admin.execute("SELECT pg_terminate_backend(%s)", (pid,)).fetchone()[0]
    assert b.wait_leader(10)
    wait_until(lambda: rec_a.changes == [True, False], 10, what="the old leader to step down")
    # the old leader campaigns again (after rejoin_after_s) and loses to the new one
    wait_until(lambda: a.backend_pid not in (None, pid), 20, what="the old leader to campaign again")
    assert not a.wait_leader(0.5)
    assert b.is_leader and not a.is_leader


@pytest.mark.parametrize("store_url", ["postgresql"], indirect=True)
def test_different_names_are_different_elections(elections: Callable[..., LeaderElection]) -> None:
    a = elections(name="rollouts").start()
    b = elections(name="drift").start()
    assert a.wait_leader(10) and b.wait_leader(10)


def test_sqlite_is_single_node_always_leader(tmp_path: Path) -> None:
    rec = Recorder()
    e = LeaderElection(f"sqlite://{tmp_path}/cloud.db", on_change=rec).start()
    assert e.is_leader and e.wait_leader(0)
    e.stop()
    assert not e.is_leader and rec.changes == [True, False]


def test_callback_errors_do_not_stop_the_election(tmp_path: Path) -> None:
    def boom(leader: bool) -> None:
        raise RuntimeError("callback bug")

    e = LeaderElection(f"sqlite://{tmp_path}/cloud.db", on_change=boom).start()
    assert e.is_leader
    e.stop()
