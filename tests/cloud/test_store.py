"""The store on both backends: idempotence, counters, concurrent writers, migrations."""

from __future__ import annotations

import random
import threading
from collections.abc import Callable, Iterable

import pytest

from cloud import ConfigError, NotFound, Store, Unstorable, open_store
from cloud.store import MIGRATIONS, StreamCounters, TelemetryBatchIn


def recs(seqs: Iterable[int], kind: str = "prediction") -> list[dict]:
    return [{"seq": s, "ts": 1000.0 + s, "kind": kind, "model": "mlp", "version": "1"} for s in seqs]


def rows(store: Store, fleet: str = "f", device: str = "d") -> list[int]:
    return [r.seq for r in store.query_telemetry(fleet, device, limit=1_000_000)]


def expected(batches: list[list[int]]) -> tuple[int, int, int, int]:
    """Reference counters: (records, max_contiguous_seq, gaps, duplicates)."""
    seen: set[int] = set()
    dups = 0
    for b in batches:
        for s in b:
            dups += s in seen
            seen.add(s)
    contiguous = 0
    while contiguous + 1 in seen:
        contiguous += 1
    return len(seen), contiguous, max(seen) - len(seen), dups


def test_insert_is_idempotent(store: Store) -> None:
    assert store.insert_telemetry("f", "d", "s1", recs(range(1, 101))) == (100, 0)
    assert store.insert_telemetry("f", "d", "s1", recs(range(1, 101))) == (0, 100)
    assert store.insert_telemetry("f", "d", "s1", recs(range(51, 151))) == (50, 50)
    assert rows(store) == list(range(1, 151))
    row = store.query_telemetry("f", "d", limit=1)[0]
    assert row.body == {"seq": 1, "ts": 1001.0, "kind": "prediction", "model": "mlp", "version": "1"}
    assert store.insert_telemetry("f", "d", "s2", recs([1])) == (1, 0)  # another stream, same seq
    assert set(store.device_counters("f", "d")) == {"s1", "s2"}


SCENARIOS = {
    "in order": [[1, 2, 3], [4, 5], [6]],
    "gap then filled": [[1, 2], [5, 6], [3], [4]],
    "out of order": [[7, 8, 9], [1, 2, 3], [4, 5, 6]],
    "duplicates": [[1, 2, 3], [2, 3, 4], [1], [4, 5]],
    "duplicate in one batch": [[1, 1, 2, 2, 3]],
    "lasting gap": [[1, 2], [4, 5], [7], [3]],
    "reverse": [[5], [4], [3], [2], [1]],
}


@pytest.mark.parametrize("name", SCENARIOS)
def test_counters(store: Store, name: str) -> None:
    batches = SCENARIOS[name]
    for i, b in enumerate(batches):
        store.insert_telemetry("f", "d", "s", recs(b))
        c = store.device_counters("f", "d")["s"]
        records, contiguous, gaps, dups = expected(batches[: i + 1])
        assert (c.records, c.max_contiguous_seq, c.gaps, c.duplicates) == (records, contiguous, gaps, dups), (i, c)
        assert c.max_seq == max(s for b in batches[: i + 1] for s in b)
    assert rows(store) == sorted({s for b in batches for s in b})


def test_counters_random_order(store: Store) -> None:
    rng = random.Random(5)
    seqs = list(range(1, 2001))
    batches = [rng.sample(seqs, rng.randint(1, 60)) for _ in range(80)]
    for b in batches:
        store.insert_telemetry("f", "d", "s", recs(b))
    c = store.device_counters("f", "d")["s"]
    assert (c.records, c.max_contiguous_seq, c.gaps, c.duplicates) == expected(batches)


@pytest.mark.parametrize("shared_store", [True, False], ids=["one-store", "two-stores"])
def test_concurrent_writers_keep_counters_exact(make_store: Callable[[], Store], shared_store: bool) -> None:
    first = make_store()
    stores = [first, first] if shared_store else [first, make_store()]
    batches = [list(range(i, i + 50)) for i in range(1, 3000, 25)]  # every batch overlaps the next
    work = [batches[0::2] + batches[1::2], batches[1::2] + batches[0::2]]  # both writers write everything
    random.Random(3).shuffle(work[1])
    errors: list[BaseException] = []

    def writer(store: Store, mine: list[list[int]]) -> None:
        try:
            for b in mine:
                store.insert_telemetry("f", "d", "s", recs(b))
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(s, w)) for s, w in zip(stores, work, strict=True)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    c = first.device_counters("f", "d")["s"]
    distinct = len({s for b in batches for s in b})
    total = 2 * sum(len(b) for b in batches)
    assert (c.records, c.max_seq, c.max_contiguous_seq, c.gaps) == (distinct, distinct, distinct, 0)
    assert c.duplicates == total - distinct
    assert len(rows(first)) == distinct


def test_insert_many_streams_with_duplicates_inside_and_across_batches(store: Store) -> None:
    """One flush of several streams, the same stream twice, seqs repeated in a batch and across flushes."""
    flushes = [
        [TelemetryBatchIn("f", "d", "a", recs([1, 2, 2, 3])), TelemetryBatchIn("f", "e", "a", recs([5, 5])),
         TelemetryBatchIn("f", "d", "a", recs([3, 4])), TelemetryBatchIn("f", "d", "b", recs([1]))],
        [TelemetryBatchIn("f", "d", "b", recs([1, 2, 1])), TelemetryBatchIn("f", "d", "a", recs([4, 6, 6]))],
        [TelemetryBatchIn("f", "e", "a", recs([1, 2, 3, 4, 4]))],
    ]
    results = [store.insert_many(f, received_at=10.0 + i) for i, f in enumerate(flushes)]
    assert results[0] == {("f", "d", "a"): (4, 2), ("f", "d", "b"): (1, 0), ("f", "e", "a"): (1, 1)}
    assert results[1] == {("f", "d", "a"): (1, 2), ("f", "d", "b"): (1, 2)}
    assert results[2] == {("f", "e", "a"): (4, 1)}
    per_stream: dict[tuple[str, str], list[list[int]]] = {}
    for f in flushes:
        for b in f:
            per_stream.setdefault((b.device, b.stream), []).append([r["seq"] for r in b.records])
    for (device, stream), batches in per_stream.items():
        c = store.device_counters("f", device)[stream]
        assert (c.records, c.max_contiguous_seq, c.gaps, c.duplicates) == expected(batches), (device, stream, c)
    assert rows(store) == [1, 1, 2, 2, 3, 4, 6]  # d: a 1,2,3,4,6 and b 1,2, ordered by ts
    row = store.query_telemetry("f", "e", stream="a", limit=1)[0]
    assert (row.seq, row.ts, row.kind, row.received_at) == (1, 1001.0, "prediction", 12.0)
    assert row.body == recs([1])[0]
    assert store.insert_many([]) == {}
    with pytest.raises(ValueError):
        store.insert_many([TelemetryBatchIn("f", "d", "a", recs([7])), TelemetryBatchIn("f", "d", "c", recs([0]))])
    assert store.device_counters("f", "d")["a"].max_seq == 6  # nothing of the failed flush stayed


def test_concurrent_multi_stream_writers_keep_counters_exact(make_store: Callable[[], Store]) -> None:
    """Two replicas flush overlapping batches of the same streams, listed in opposite orders."""
    stores = [make_store(), make_store()]
    streams = [("d1", "s"), ("d2", "s"), ("d3", "t")]
    batches = [list(range(i, i + 40)) + [i + 5] for i in range(1, 1500, 30)]  # overlapping, a duplicate inside
    errors: list[BaseException] = []

    def writer(store: Store, order: list[tuple[str, str]], mine: list[list[int]]) -> None:
        try:
            for b in mine:
                store.insert_many([TelemetryBatchIn("f", d, s, recs(b)) for d, s in order])
        except BaseException as exc:  # reported below
            errors.append(exc)

    work = [batches, list(reversed(batches))]
    threads = [
        threading.Thread(target=writer, args=(stores[0], streams, work[0])),
        threading.Thread(target=writer, args=(stores[1], streams[::-1], work[1])),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    distinct = len({s for b in batches for s in b})
    total = 2 * sum(len(b) for b in batches)
    for d, s in streams:
        c = stores[0].device_counters("f", d)[s]
        assert (c.records, c.max_seq, c.max_contiguous_seq, c.gaps) == (distinct, distinct, distinct, 0)
        assert c.duplicates == total - distinct
        assert len(rows(stores[0], device=d)) == distinct


def test_migrations_apply_once(store_url: str) -> None:
    versions = [m.version for m in MIGRATIONS]
    stores: list[Store] = []
    threads = [threading.Thread(target=lambda: stores.append(open_store(store_url))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(stores) == 3
    store = stores[0]
    assert store.migrations.pending() == []
    assert store.migrations.applied() == versions
    assert store.migrations.apply() == []
    with store.transaction() as tx:
        assert tx.execute("SELECT COUNT(*) FROM schema_version").fetchone()[0] == len(versions)
    for s in stores:
        s.close()


def test_migrations_pending_before_apply(store_url: str) -> None:
    store = open_store(store_url, migrate=False)
    try:
        assert [m.version for m in store.migrations.pending()] == [m.version for m in MIGRATIONS]
        assert store.migrations.apply() == [m.version for m in MIGRATIONS]
        assert store.migrations.pending() == []
    finally:
        store.close()


def test_devices(store: Store) -> None:
    with pytest.raises(NotFound):
        store.get_device("f", "d")
    d = store.upsert_device("f", "d", tags={"site": "a"}, hardware_profile="rpi4", pre_registered=True)
    assert (d.tags, d.hardware_profile, d.pre_registered, d.online, d.last_seen) == ({"site": "a"}, "rpi4", True, False, None)
    store.set_status("f", "d", {"state": "online", "ts": 1.0}, seen_at=100.0)
    d = store.get_device("f", "d")
    assert (d.online, d.last_seen, d.status, d.tags) == (True, 100.0, {"state": "online", "ts": 1.0}, {"site": "a"})
    store.set_status("f", "d", {"state": "offline"}, seen_at=50.0)  # an older clock never moves last_seen back
    d = store.get_device("f", "d")
    assert (d.online, d.last_seen) == (False, 100.0)
    store.upsert_device("f", "d", tags={"site": "b"})  # other fields kept
    assert store.get_device("f", "d").hardware_profile == "rpi4"
    store.upsert_device("g", "x")
    assert [x.device_id for x in store.list_devices()] == ["d", "x"]
    assert [x.device_id for x in store.list_devices("g")] == ["x"]


def test_values_no_store_can_keep_are_refused_alike(store: Store) -> None:
    """A NUL character in JSON (PostgreSQL's jsonb refuses it) and a lone surrogate (not
    UTF-8) are Unstorable on both backends: bad input (HTTP 400), not a database outage."""
    store.upsert_device("f", "d", tags={"site": "a"}, hardware_profile="rpi4")
    for tags in ({"site": "a\x00b"}, {"\x00": "x"}, {"site": ["ok", {"deep": "\x00"}]}, {"site": "\ud800"}):
        with pytest.raises(Unstorable):
            store.upsert_device("f", "d", tags=tags)
    with pytest.raises(Unstorable):
        store.upsert_device("f", "d", hardware_profile="rpi\udfff")
    with pytest.raises(Unstorable), store.transaction(write=True) as tx:
        tx.set_reported_state("f", "d", {"model": "m\x00"})
    store.upsert_device("f", "d", tags={"path": "C:\\u0000"})  # a backslash then "u0000": no NUL, kept
    d = store.get_device("f", "d")
    assert (d.tags, d.hardware_profile) == ({"path": "C:\\u0000"}, "rpi4")
    if store.dialect == "postgresql":  # its text type refuses NUL too (SQLite keeps it)
        with pytest.raises(Unstorable):
            store.upsert_device("f", "d", hardware_profile="rpi\x004")
    assert store.get_device("f", "d").hardware_profile in ("rpi4", "rpi\x004")


def test_errors_are_counted_and_the_last_kept(store: Store) -> None:
    for i in range(5):
        with store.transaction(write=True) as tx:
            tx.count_error("invalid_json", f"t/{i}", 10 + i, keep=3)
    store.count_error("oversized", "t/x", 2 << 20)
    assert store.error_counts() == {"invalid_json": 5, "oversized": 1}
    recent = store.recent_errors()
    assert [(r.reason, r.topic, r.size) for r in recent][:2] == [("oversized", "t/x", 2 << 20), ("invalid_json", "t/4", 14)]
    assert len(recent) <= 4


def test_query_filters(store: Store) -> None:
    store.insert_telemetry("f", "d", "s", recs([1, 2, 3]) + recs([4, 5], kind="metrics"))
    assert [r.seq for r in store.query_telemetry("f", "d", kind="metrics")] == [4, 5]
    assert [r.seq for r in store.query_telemetry("f", "d", since=1002.0)] == [2, 3, 4, 5]
    assert [r.seq for r in store.query_telemetry("f", "d", limit=2)] == [1, 2]


def test_transaction_rolls_back(store: Store) -> None:
    with pytest.raises(ValueError), store.transaction(write=True) as tx:
        tx.insert_telemetry("f", "d", "s", recs([1, 2]))
        raise ValueError("boom")
    assert rows(store) == []
    assert store.device_counters("f", "d") == {}
    assert isinstance(store.insert_telemetry("f", "d", "s", recs([1])), tuple)
    assert isinstance(store.device_counters("f", "d")["s"], StreamCounters)


def test_bad_urls() -> None:
    for url in ["mysql://x/y", "sqlite://"]:
        with pytest.raises(ConfigError):
            open_store(url)



def test_closing_the_store_never_closes_a_connection_under_a_running_transaction(
        make_store: Callable[[], Store]) -> None:
    import threading

    from cloud._exceptions import StoreError

    store = make_store()
    store.upsert_device("f", "dev-1")
    inside, closed, done = threading.Event(), threading.Event(), threading.Event()
    seen: list[object] = []

    def worker() -> None:
        try:
            with store.transaction() as tx:
                inside.set()
                closed.wait(10)
                seen.append(tx.execute("SELECT COUNT(*) FROM devices").fetchone()[0])  # still usable
        except Exception as exc:  # the assertion below names it
            seen.append(exc)
        finally:
            done.set()

    t = threading.Thread(target=worker)
    t.start()
    assert inside.wait(10)
    store.close()  # a shutdown while another thread is mid-transaction
    closed.set()
    assert done.wait(10)
    t.join()
    assert seen == [1]
    with pytest.raises(StoreError, match="closed"), store.transaction() as tx:
        tx.execute("SELECT 1")
