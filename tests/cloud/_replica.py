"""A coordinator replica for tests, run in its own process until killed.

    python -m tests.cloud._replica STORE_URL BROKER_URL CLIENT_ID SHARED_GROUP

Opens the store, starts a :class:`LeaderElection` and an :class:`Ingestor` on the shared
subscription, and prints one line per event on stdout: ``ready``, ``leader True|False``
and, on SIGTERM, ``stats <records> <inserted> <duplicates>`` before it exits.
"""

from __future__ import annotations

import signal
import sys
import threading

from cloud import Ingestor, open_store
from cloud.leader import LeaderElection


def main(argv: list[str]) -> int:
    store_url, broker_url, client_id, group = argv
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *a: stop.set())
    store = open_store(store_url)
    election = LeaderElection(store_url, retry_s=0.2, on_change=lambda leader: print(f"leader {leader}", flush=True))
    ingestor = Ingestor(store, broker_url=broker_url, client_id=client_id, shared_group=group, flush_interval_s=0.05)
    ingestor.start()
    election.start()
    print("ready", flush=True)
    stop.wait()
    ingestor.stop()
    election.stop()
    s = ingestor.stats
    print(f"stats {s.records} {s.inserted} {s.duplicates}", flush=True)
    store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
