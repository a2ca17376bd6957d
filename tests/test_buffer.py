"""The SQLite telemetry buffer: seq, durability, budget policy, disk full."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import numpy as np
import orjson
import pytest

from edgeml import StorageError
from edgeml.buffer import ROW_OVERHEAD, TelemetryBuffer, inspect, iter_records

OUT = np.array([[0.1, 0.7, 0.2]], dtype=np.float32)


def _all(buf: TelemetryBuffer) -> list[dict]:
    batch = buf.read_batch(0, 1_000_000, 1 << 40)
    return iter_records(batch.bodies) if batch else []


def test_seq_is_contiguous_and_survives_reopen(tmp_path: Path) -> None:
    path = tmp_path / "t.db"
    with TelemetryBuffer(path) as buf:
        stream = buf.stream
        for _ in range(10):
            buf.append_prediction("m", "1", 5.0, "probs", OUT)
        buf.flush()
        first = _all(buf)
        buf.ack(1, 10)  # everything acknowledged: the table is empty now
    with TelemetryBuffer(path) as buf:
        assert buf.stream == stream
        buf.append("event", {"name": "x", "level": "info", "message": "", "data": {}})
        buf.flush()
        assert [r["seq"] for r in _all(buf)] == [11]  # never reused, although rows were deleted
    assert [r["seq"] for r in first] == list(range(1, 11))
    assert first[0]["summary"] == {"output": "probs", "top1": 1, "score": pytest.approx(0.7), "mean": pytest.approx(1 / 3)}


def test_durability_window(tmp_path: Path) -> None:
    """A record is readable by another connection within the flush interval."""
    path = tmp_path / "t.db"
    buf = TelemetryBuffer(path, flush_interval_ms=20)
    buf.start()
    try:
        buf.append("event", {"name": "x", "level": "info", "message": "", "data": {}})
        t0 = time.monotonic()
        other = sqlite3.connect(path)
        while other.execute("SELECT count(*) FROM segments").fetchone()[0] == 0:
            assert time.monotonic() - t0 < 10.0  # 20 ms expected; room for a loaded machine
            time.sleep(0.002)
        other.close()
    finally:
        buf.close()


def test_a_burst_wakes_the_flusher_before_its_interval(tmp_path: Path) -> None:
    """FLUSH_AT queued records are committed without waiting for a (here: one minute) interval."""
    from edgeml.buffer import FLUSH_AT

    buf = TelemetryBuffer(tmp_path / "t.db", flush_interval_ms=60_000)
    buf.start()
    try:
        time.sleep(0.05)  # the flusher is now waiting out its interval
        for _ in range(FLUSH_AT - 1):
            buf.append_prediction("m", "1", 5.0, "probs", OUT)
        time.sleep(0.2)
        assert buf.stats().records == 0  # below the mark: still queued
        buf.append_prediction("m", "1", 5.0, "probs", OUT)
        deadline = time.monotonic() + 10
        while buf.stats().records < FLUSH_AT and time.monotonic() < deadline:
            time.sleep(0.01)
        assert buf.stats().records == FLUSH_AT
    finally:
        buf.close()


def test_budget_drops_lowest_priority_oldest_first_and_counts(tmp_path: Path) -> None:
    path = tmp_path / "t.db"
    with TelemetryBuffer(path, max_bytes=64 * 1024) as buf:
        for i in range(50):
            buf.append("event", {"name": f"e{i}", "level": "info", "message": "", "data": {}})
        buf.flush()
        for _ in range(100):
            buf.append("sample", {"model": "m", "version": "1", "inputs": {"x": np.zeros((4, 8))}, "outputs": {}})
        for _ in range(3000):  # packed: 40 bytes of numbers each, plus the row overhead
            buf.append_prediction("m", "1", 5.0, "probs", OUT)
        buf.flush()
        stats = buf.stats()
        records = _all(buf)
    assert stats.bytes <= 64 * 1024
    assert stats.dropped["sample"] == 100  # every sample went before any prediction
    assert stats.dropped["prediction"] > 0 and "event" not in stats.dropped
    kinds = [r["kind"] for r in records]
    assert kinds.count("event") == 50 and "sample" not in kinds
    preds = [r["seq"] for r in records if r["kind"] == "prediction"]
    assert preds == sorted(preds) and preds[-1] == stats.next_seq - 1  # the newest are kept
    assert stats.records == len(records)
    assert stats.bytes == sum(len(b) for b in buf_bodies(path)) + ROW_OVERHEAD * len(records)
    again = inspect(path)
    assert again is not None and again.dropped == stats.dropped  # persisted


def buf_bodies(path: Path) -> list[bytes]:
    conn = sqlite3.connect(path)
    try:
        return [r[0] for r in conn.execute("SELECT body FROM segments")]
    finally:
        conn.close()


def test_disk_full_keeps_records_in_memory_and_retries(tmp_path: Path) -> None:
    path = tmp_path / "t.db"
    buf = TelemetryBuffer(path)
    pages = buf._conn.execute("PRAGMA page_count").fetchone()[0]
    buf._conn.execute(f"PRAGMA max_page_count = {pages + 1}")  # the "disk" is now full
    for _ in range(2000):
        buf.append_prediction("m", "1", 5.0, "probs", OUT)
    with pytest.raises(StorageError, match="full"):
        buf.flush()
    assert buf.stats().pending == 2000 and buf.stats().storage_errors == 1
    buf._conn.execute("PRAGMA max_page_count = 1073741823")  # space freed
    assert buf.flush() == 2000
    assert [r["seq"] for r in _all(buf)] == list(range(1, 2001))
    buf.close()


def test_ack_deletes_exactly_the_acknowledged_range(tmp_path: Path) -> None:
    with TelemetryBuffer(tmp_path / "t.db", segment_max_records=10) as buf:
        for _ in range(30):
            buf.append_prediction("m", "1", 5.0, "probs", OUT)
        buf.flush()  # three segments of 10
        batch = buf.read_batch(0, 15, 1 << 20)  # whole segments only: 10 of the 15 allowed
        assert batch is not None and (batch.first, batch.last, len(batch)) == (1, 10, 10)
        assert buf.ack(batch.first, batch.last) == 10
        nxt = buf.read_batch(batch.last, 1000, 300)  # byte limit: at least one segment
        assert nxt is not None and nxt.first == 11 and len(nxt) == 10 and len(nxt.bodies) == 1
        assert buf.stats().records == 20 and buf.stats().last_ack_ts is not None


def test_segments_respect_byte_limit_and_records_decode_exactly(tmp_path: Path) -> None:
    from edgeml.protocol import EventRecord, PredictionRecord

    with TelemetryBuffer(tmp_path / "t.db", segment_max_bytes=2048) as buf:
        for i in range(40):
            buf.append_prediction("m\"odel", "ü1", 5.123456, "probs", OUT + i)
        buf.append("event", {"name": "e", "level": "info", "message": "", "data": {}})
        buf.append_prediction("m", "1", 5.0, "probs", np.array([[np.nan, 1.0]], np.float32))  # NaN -> null
        buf.flush()
        bodies, cursor = [], 0
        while (one := buf.read_batch(cursor, 1, 1)) is not None:  # one segment at a time, as JSON
            bodies += one.bodies
            cursor = one.last
        records = _all(buf)
    assert all(len(b) <= 2048 for b in bodies) and len(bodies) > 2
    preds = [PredictionRecord.model_validate(r) for r in records if r["kind"] == "prediction"]
    assert [p.seq for p in preds] == list(range(1, 42))  # predictions first: they appeared first
    assert preds[0].model == 'm"odel' and preds[0].version == "ü1" and preds[0].latency_us == 5.12
    assert preds[3].summary is not None and preds[3].summary.top1 == 1
    assert preds[3].summary.mean == pytest.approx(float((OUT + 3).mean()))
    assert preds[-1].summary is not None and preds[-1].summary.mean is None  # NaN travels as null
    assert preds[-1].summary.top1 == 0 and preds[-1].summary.score is None  # as argmax: the first NaN
    assert EventRecord.model_validate(records[-1]).seq == 42


def test_a_record_that_cannot_be_encoded_does_not_sink_the_flush(tmp_path: Path) -> None:
    buf = TelemetryBuffer(tmp_path / "t.db", flush_interval_ms=10)
    buf.start()
    try:
        buf.append("event", {"name": "before", "level": "info", "message": "", "data": {}})
        buf.append("sample", {"model": "m", "version": "1", "inputs": {"x": np.array([1 + 2j])}, "outputs": {}})
        buf.append("event", {"name": "after", "level": "info", "message": "", "data": {}})
        wait = time.monotonic() + 5
        while buf.stats().records < 3 and time.monotonic() < wait:
            time.sleep(0.01)
        records = _all(buf)
        # the bad sample became an event in its place: same seq, nothing else lost
        assert [(r["seq"], r["name"]) for r in records] == [(1, "before"), (2, "bad_record"), (3, "after")]
        assert records[1]["data"]["kind"] == "sample"
        assert buf._thread is not None and buf._thread.is_alive()  # the flusher lives on
        buf.append("event", {"name": "later", "level": "info", "message": "", "data": {}})
        wait = time.monotonic() + 5
        while buf.stats().records < 4 and time.monotonic() < wait:
            time.sleep(0.01)
        assert buf.stats().records == 4
    finally:
        buf.close()


def test_housekeeping_gives_the_space_of_dropped_records_back(tmp_path: Path) -> None:
    """Well past a small budget, the file (and WAL) shrink back to a few times the budget."""
    path = tmp_path / "t.db"
    budget = 256 * 1024
    with TelemetryBuffer(path, max_bytes=budget, segment_max_records=100) as buf:
        for _ in range(20_000):  # one flush, about 4 MB: the file grows before the budget drops
            buf.append_prediction("m", "1", 5.0, "probs", OUT)
        buf.flush()
        assert buf.stats().dropped["prediction"] > 15_000  # the budget dropped most of it
        assert buf._conn.execute("PRAGMA freelist_count").fetchone()[0] > 100  # the space is still held
        buf.housekeeping()
        assert buf._conn.execute("PRAGMA freelist_count").fetchone()[0] == 0
        wal = Path(f"{path}-wal")
        on_disk = path.stat().st_size + (wal.stat().st_size if wal.exists() else 0)
        assert on_disk <= 3 * budget, on_disk
        assert buf.stats().records == len(_all(buf))  # what the budget kept is still there


def test_memory_limit_drops_by_priority_when_the_disk_is_full(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With the disk full, the in-memory queue sheds predictions (oldest first) before events."""
    import edgeml.buffer

    monkeypatch.setattr(edgeml.buffer, "MEMORY_LIMIT", 100)
    buf = TelemetryBuffer(tmp_path / "t.db")
    pages = buf._conn.execute("PRAGMA page_count").fetchone()[0]
    buf._conn.execute(f"PRAGMA max_page_count = {pages + 1}")  # the "disk" is now full
    for i in range(200):
        buf.append_prediction("m", "1", float(i), "probs", OUT)  # latency_us marks the order
        if i % 4 == 0:
            buf.append("event", {"name": f"e{i}", "level": "info", "message": "", "data": {}})
    with pytest.raises(StorageError, match="full"):
        buf.flush()
    stats = buf.stats()
    assert stats.pending == 100 and stats.dropped == {"memory": 150}
    buf._conn.execute("PRAGMA max_page_count = 1073741823")  # space freed
    assert buf.flush() == 100
    records = _all(buf)
    buf.close()
    assert [r["name"] for r in records if r["kind"] == "event"] == [f"e{i}" for i in range(0, 200, 4)]
    assert [r["latency_us"] for r in records if r["kind"] == "prediction"] == [float(i) for i in range(150, 200)]
    assert inspect(tmp_path / "t.db").dropped == {"memory": 150}  # type: ignore[union-attr]


def test_the_memory_limit_weighs_the_arrays_queued_predictions_hold(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A queued prediction holds its output: 1,000 classes are 4 KB a record, so the limit
    in records alone would let a long disk failure take hundreds of MB."""
    import edgeml.buffer

    monkeypatch.setattr(edgeml.buffer, "MEMORY_LIMIT_BYTES", 200_000)
    buf = TelemetryBuffer(tmp_path / "t.db")
    buf._conn.execute("PRAGMA query_only = ON")  # the disk refuses writes
    big = np.ones((1, 1000), np.float32)
    for i in range(200):
        buf.append_prediction("m", "1", float(i), "probs", big)
    buf.append("event", {"name": "kept", "level": "info", "message": "", "data": {}})
    with pytest.raises(StorageError):
        buf.flush()
    held = sum(edgeml.buffer._queued_size(item) for item in buf._queue)
    assert held <= 200_000 and buf.stats().pending == len(buf._queue) < 201
    dropped = buf.stats().dropped["memory"]
    assert dropped == 201 - buf.stats().pending
    buf._conn.execute("PRAGMA query_only = OFF")  # space again
    assert buf.flush() == 201 - dropped
    records = _all(buf)
    buf.close()
    assert [r["name"] for r in records if r["kind"] == "event"] == ["kept"]  # events go last
    assert [r["latency_us"] for r in records if r["kind"] == "prediction"] == [float(i) for i in range(dropped, 200)]
    # the count could not be written while the disk refused writes: the next commit saved it
    assert inspect(tmp_path / "t.db").dropped == {"memory": dropped}  # type: ignore[union-attr]


def test_outputs_that_encode_alone_but_not_together_lose_nothing(tmp_path: Path) -> None:
    """Two 2-row outputs of the same model and output name, one of them an object array:
    the packed path cannot take both; each record is kept on its own."""
    buf = TelemetryBuffer(tmp_path / "t.db")
    buf.append("event", {"name": "important", "level": "info", "message": "", "data": {}})
    buf.append_prediction("m", "1", 10.0, "y", np.ones((2, 3), np.float32))
    buf.append_prediction("m", "1", 11.0, "y", np.array([[1.0, None, 2.0], [0.0, 1.0, 2.0]], dtype=object))
    assert buf.flush() == 3
    stats = buf.stats()
    records = _all(buf)
    buf.close()
    assert stats.pending == 0 and stats.records == 3
    assert [r["seq"] for r in records] == [1, 2, 3]
    assert records[0]["name"] == "important"
    assert records[1]["kind"] == "prediction" and records[1]["summary"]["top1"] == 0


def test_top1_is_argmax_with_ties_nan_and_infinities() -> None:
    from edgeml.buffer import _top1

    rng = np.random.default_rng(7)
    rows = rng.integers(0, 3, size=(400, 5)).astype(np.float32)  # many ties
    rows[::7, 2] = np.nan
    rows[::11, 4] = np.nan
    rows[::13] = -np.inf
    rows[::17, 1] = np.inf
    rows[5] = [-0.0, 0.0, -0.0, 0.0, -1.0]
    top1, score = _top1(rows)
    assert top1.tolist() == rows.argmax(axis=1).tolist()
    np.testing.assert_array_equal(score, rows[np.arange(len(rows)), rows.argmax(axis=1)])


def test_fast_encoding_matches_one_record_at_a_time(tmp_path: Path) -> None:
    """The whole-flush path (columns, joined segments) writes what the per-record path writes."""
    rng = np.random.default_rng(3)
    outputs = [rng.standard_normal((1, 4)).astype(np.float32) for _ in range(1200)]
    outputs[10][0, 1] = np.nan
    with TelemetryBuffer(tmp_path / "t.db", segment_max_records=500) as buf:
        for i, out in enumerate(outputs):
            buf.append_prediction('m"%s', "1.0", 3.14159 * i, "probs", out)
        items = list(buf._queue)
        buf.flush()
        records = _all(buf)
        bodies = buf_bodies(tmp_path / "t.db")
        expected = [orjson.loads(buf._one_prediction(item, i + 1)) for i, item in enumerate(items)]
    assert len(bodies) == 3  # 500 + 500 + 200: cut by count
    assert [r["seq"] for r in records] == list(range(1, 1201))
    for got, want in zip(records, expected, strict=True):
        assert got.keys() == want.keys() and got["summary"].keys() == want["summary"].keys()
        assert got["latency_us"] == pytest.approx(want["latency_us"], abs=0.006)
        assert got["summary"]["top1"] == want["summary"]["top1"] == int(outputs[got["seq"] - 1].argmax())
        for key in ("score", "mean"):
            assert (got["summary"][key] is None) == (want["summary"][key] is None)
            if want["summary"][key] is not None:
                assert got["summary"][key] == pytest.approx(want["summary"][key], rel=1e-6)
        assert {k: v for k, v in got.items() if k not in ("latency_us", "summary")} == {
            k: v for k, v in want.items() if k not in ("latency_us", "summary")
        }
    assert records[10]["summary"]["top1"] == 1 and records[10]["summary"]["score"] is None  # argmax: first NaN
    assert records[10]["summary"]["mean"] is None


def test_the_buffer_keeps_a_small_page_cache(tmp_path: Path) -> None:
    from edgeml.buffer import PAGE_CACHE_KIB

    with TelemetryBuffer(tmp_path / "t.db") as buf:
        assert buf._conn.execute("PRAGMA cache_size").fetchone()[0] == -PAGE_CACHE_KIB


def _predictions_then_an_event(buf: TelemetryBuffer, n: int, latency: float) -> None:
    """``n`` predictions of mlp 2.0 (record i: latency + i, output OUT + i), one event, committed."""
    for i in range(n):
        buf.append_prediction("mlp", "2.0", latency + i, "probs", OUT + i)
    buf.append("event", {"name": "e", "level": "info", "message": "", "data": {}})
    buf.flush()


def test_predictions_are_stored_packed_and_read_back_as_json(tmp_path: Path) -> None:
    path = tmp_path / "t.db"
    with TelemetryBuffer(path, segment_max_records=100) as buf:
        _predictions_then_an_event(buf, 250, latency=4.0)
        stored = buf_bodies(path)
        assert [b[:1] for b in stored] == [b"\x01"] * 3 + [b"{"]  # 100 + 100 + 50 packed, one JSON
        assert all(len(b) <= 80 + 40 * 100 for b in stored[:2]) and len(stored[2]) <= 80 + 40 * 50
        assert buf.stats().bytes == sum(map(len, stored)) + ROW_OVERHEAD * 251
        # a batch is limited by the size of the JSON it carries, not of what is stored
        one = buf.read_batch(0, 1000, 100 * 150)
        assert one is not None and (one.first, one.last) == (1, 100) and one.bodies[0][:1] == b"{"
        assert len(one.bodies[0]) > 100 * 150 // 2
    with TelemetryBuffer(path) as again:  # packed segments survive a restart
        records = _all(again)
    assert [r["seq"] for r in records] == list(range(1, 252))
    assert records[7]["latency_us"] == 11.0 and records[7]["model"] == "mlp" and records[7]["batch"] == 1
    assert records[7]["summary"] == {"output": "probs", "top1": 1, "score": pytest.approx(7.7), "mean": pytest.approx(7 + 1 / 3)}
    assert records[-1]["kind"] == "event"


def test_downgrade_rewrites_packed_segments_as_json(tmp_path: Path) -> None:
    path = tmp_path / "t.db"
    with TelemetryBuffer(path, segment_max_records=50) as buf:
        _predictions_then_an_event(buf, 120, latency=1.0)
        before = _all(buf)
        assert buf.downgrade() == 120
        assert buf.downgrade() == 0  # nothing packed is left
        after = _all(buf)
        stats = buf.stats()
    bodies = buf_bodies(path)
    assert after == before and all(b[:1] == b"{" for b in bodies)
    assert stats.bytes == sum(map(len, bodies)) + ROW_OVERHEAD * 121
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()[0] == "2"


def test_a_buffer_from_a_newer_agent_is_refused_with_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "t.db"
    TelemetryBuffer(path).close()
    with sqlite3.connect(path) as db:
        db.execute("UPDATE meta SET value = '99' WHERE key = 'schema'")
    with pytest.raises(StorageError, match="newer agent .*schema 99.*downgrade-buffer"):
        TelemetryBuffer(path)


def test_a_damaged_packed_segment_becomes_an_event_and_publishing_goes_on(tmp_path: Path) -> None:
    path = tmp_path / "t.db"
    with TelemetryBuffer(path, segment_max_records=10) as buf:
        for _ in range(20):
            buf.append_prediction("mlp", "2.0", 1.0, "probs", OUT)
        buf.flush()
        with sqlite3.connect(path) as db:  # the first segment's header loses its bytes
            body = db.execute("SELECT body FROM segments WHERE first_seq = 1").fetchone()[0]
            db.execute("UPDATE segments SET body = ? WHERE first_seq = 1", (body[:3] + b"#" * (len(body) - 3),))
        records = _all(buf)
    assert records[0]["kind"] == "event" and records[0]["name"] == "bad_record" and records[0]["seq"] == 1
    assert records[0]["data"] == {"kind": "prediction", "first_seq": 1, "last_seq": 10}
    assert [r["seq"] for r in records[1:]] == list(range(11, 21))  # the next segment reads as usual


def test_outputs_of_several_batch_sizes_in_one_flush(tmp_path: Path) -> None:
    outs = [np.array([[1.0, 2.0]], np.float32), np.array([[5.0, 4.0], [9.0, 9.0]], np.float32),
            np.zeros((0, 2), np.float32)]
    with TelemetryBuffer(tmp_path / "t.db") as buf:
        for out in outs:
            buf.append_prediction("m", "1", 1.0, "probs", out)
        buf.flush()
        records = _all(buf)
    assert [r["batch"] for r in records] == [1, 2, 0]
    assert [r["summary"] and r["summary"]["top1"] for r in records] == [1, 0, None]
    assert records[1]["summary"]["score"] == 5.0


def test_inspect_reads_a_buffer_whose_path_has_uri_characters(tmp_path: Path) -> None:
    odd = tmp_path / "data #7 ?x=1 %20"
    with TelemetryBuffer(odd / "t.db") as buf:
        buf.append("event", {"name": "e", "level": "info", "message": "", "data": {}})
        buf.flush()
    stats = inspect(odd / "t.db")
    assert stats is not None and stats.records == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [odd.name]  # no stray file made from a cut-off URI
