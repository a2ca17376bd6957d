"""Ingest throughput, broker to store, on loopback: one Ingestor on SQLite, one on
PostgreSQL, then two Ingestor replicas (shared subscription, one client id each, one
store each, each in its own process like two coordinators) on one PostgreSQL database.

    python bench/bench_ingest.py [--records 200000] [--batch 500] [--devices 4] [--no-postgres]

A child process publishes telemetry batches the way the agent does (paho, QoS 1, at
most 16 unacknowledged messages per device); the clock runs from the first publish
until the store's counters show every record committed. Prints one JSON document.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"


def publish(port: int, records: int, batch: int, devices: int) -> None:
    """Child process: publish ``records`` per all devices in batches of ``batch``."""
    import orjson
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    clients, payloads = [], []
    per_device = records // devices
    for d in range(devices):
        device = f"bench-{d}"
        client = mqtt.Client(CallbackAPIVersion.VERSION2, f"edgeml-bench-{device}", clean_session=False)
        client.max_inflight_messages_set(16)
        client.max_queued_messages_set(0)
        client.connect("127.0.0.1", port)
        client.loop_start()
        clients.append(client)
        now = time.time()
        for first in range(1, per_device + 1, batch):
            recs = [
                {"seq": s, "ts": now, "kind": "prediction", "model": "mlp", "version": "1.0.0", "latency_us": 87.5,
                 "batch": 1, "summary": {"output": "probs", "top1": 2, "score": 0.91, "mean": 0.33}}
                for s in range(first, min(first + batch, per_device + 1))
            ]
            doc = {"v": 1, "fleet": "bench", "device": device, "stream": "s1", "sent_at": now, "records": recs}
            payloads.append((client, f"edgeml/v1/bench/{device}/telemetry", orjson.dumps(doc)))
    print("ready", flush=True)
    sys.stdin.readline()
    infos = [c.publish(topic, p, qos=1) for c, topic, p in payloads]
    for info in infos:
        info.wait_for_publish(60)
    for c in clients:
        c.disconnect()
        c.loop_stop()


def ingest(port: int, store_url: str, group: str) -> None:
    """Child process: one replica (an Ingestor with its own store) until stdin says stop."""
    from cloud import Ingestor, open_store

    ingestor = Ingestor(open_store(store_url), broker_url=f"mqtt://127.0.0.1:{port}",
                        client_id=f"bench-{uuid.uuid4().hex[:6]}", **({"shared_group": group} if group else {}))
    ingestor.start()
    print("ready", flush=True)
    sys.stdin.readline()
    ingestor.stop()
    ingestor.store.close()
    print(json.dumps({"flushes": ingestor.stats.flushes, "duplicates": ingestor.stats.duplicates}), flush=True)


def run(store_url: str, port: int, args: argparse.Namespace, replicas: int = 1) -> dict[str, object]:
    """Each replica is its own process (as coordinators are), so two replicas do not share a GIL."""
    from cloud import open_store

    store = open_store(store_url)  # the clock's; each replica opens its own
    total = (args.records // args.devices) * args.devices
    child = subprocess.Popen(
        [sys.executable, __file__, "--publish", str(port), "--records", str(args.records), "--batch", str(args.batch),
         "--devices", str(args.devices)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    assert child.stdout is not None and child.stdin is not None
    assert child.stdout.readline().strip() == "ready"
    group = f"bench-{uuid.uuid4().hex[:6]}" if replicas > 1 else ""
    procs = [
        subprocess.Popen([sys.executable, __file__, "--ingest", str(port), "--store", store_url, "--group", group],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        for _ in range(replicas)
    ]
    for proc in procs:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"

    def committed() -> int:
        return sum(c.records for d in range(args.devices) for c in store.device_counters("bench", f"bench-{d}").values())

    start = time.perf_counter()
    child.stdin.write("go\n")
    child.stdin.flush()
    while committed() < total:
        time.sleep(0.01)
    elapsed = time.perf_counter() - start
    child.wait(60)
    stats = []
    for proc in procs:
        out, _ = proc.communicate("stop\n", timeout=60)
        stats.append(json.loads(out.strip().splitlines()[-1]))
    result = {
        "store": store.dialect, "replicas": replicas, "records": total, "seconds": round(elapsed, 3),
        "records_per_s": round(total / elapsed), "flushes": sum(s["flushes"] for s in stats),
        "duplicates": sum(s["duplicates"] for s in stats),
    }
    if store.dialect == "sqlite":
        result["target_records_per_s"] = 50_000
    store.close()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--records", type=int, default=200_000)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--devices", type=int, default=4)
    parser.add_argument("--no-postgres", action="store_true")
    parser.add_argument("--publish", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--ingest", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--store", help=argparse.SUPPRESS)
    parser.add_argument("--group", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.publish:
        publish(args.publish, args.records, args.batch, args.devices)
        return
    if args.ingest:
        ingest(args.ingest, args.store, args.group)
        return

    import psycopg

    from tests.conftest import Broker

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        broker = Broker(Path(tmp) / "broker")
        try:
            results.append(run(f"sqlite://{tmp}/bench.db", broker.port, args))
            if not args.no_postgres:
                db = f"edgeml_bench_{uuid.uuid4().hex[:8]}"
                with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
                    conn.execute(f"CREATE DATABASE {db}")
                    conn.execute(f"CREATE DATABASE {db}_x2")
                try:
                    results.append(run(f"postgresql://postgres@127.0.0.1:5432/{db}", broker.port, args))
                    results.append(run(f"postgresql://postgres@127.0.0.1:5432/{db}_x2", broker.port, args, replicas=2))
                finally:
                    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
                        conn.execute(f"DROP DATABASE {db} WITH (FORCE)")
                        conn.execute(f"DROP DATABASE {db}_x2 WITH (FORCE)")
        finally:
            broker.stop()
    print(json.dumps({"benchmark": "ingest", "batch": args.batch, "devices": args.devices, "results": results}, indent=2))


if __name__ == "__main__":
    main()
