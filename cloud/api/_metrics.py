"""``/metrics``: Prometheus text, computed from the store at each scrape.

Fleet-wide numbers come from the store, so every coordinator replica reports the same
totals and they survive restarts (``rate(edgeml_ingest_records_total[1m])`` is the
ingestion rate). ``edgeml_coordinator_*`` numbers are this replica's own.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

if TYPE_CHECKING:
    from ..ingest import Ingestor
    from ..store import Store

__all__ = ["CONTENT_TYPE_LATEST", "metrics_registry", "render"]


class _Collector:
    def __init__(self, store: Store, ingestor: Ingestor | None, lag_window_s: float) -> None:
        self.store = store
        self.ingestor = ingestor
        self.lag_window_s = lag_window_s

    def collect(self) -> Iterator[Metric]:
        s = self.store.ingest_summary(lag_window_s=self.lag_window_s)
        yield CounterMetricFamily("edgeml_ingest_records", "Telemetry records stored (distinct seqs).", value=s["records"])
        yield CounterMetricFamily(
            "edgeml_ingest_duplicates", "Telemetry records received again and not stored.", value=s["duplicates"]
        )
        yield GaugeMetricFamily("edgeml_ingest_gaps", "Seqs missing below the highest seq of each stream.", value=s["gaps"])
        yield GaugeMetricFamily(
            "edgeml_ingest_lag_seconds",
            "Largest received_at - ts of the newest record of each recently active stream (device clock).",
            value=s["lag_s"],
        )
        yield GaugeMetricFamily("edgeml_streams", "Telemetry streams known.", value=s["streams"])
        yield GaugeMetricFamily("edgeml_devices", "Devices registered.", value=s["devices"])
        yield GaugeMetricFamily("edgeml_devices_online", "Devices whose last status is online.", value=s["online"])
        yield GaugeMetricFamily("edgeml_models", "Model versions registered.", value=s["models"])
        errors = CounterMetricFamily("edgeml_ingest_errors", "Rejected messages by reason.", labels=["reason"])
        for reason, count in self.store.error_counts().items():
            errors.add_metric([reason], count)
        yield errors
        if self.ingestor is not None:
            yield from self._replica(self.ingestor)

    def _replica(self, ingestor: Ingestor) -> Iterator[Metric]:
        stats = ingestor.stats
        for name, value, doc in (
            ("messages", stats.messages, "MQTT messages taken by this coordinator."),
            ("records", stats.records, "Telemetry records received by this coordinator."),
            ("flushes", stats.flushes, "Store transactions committed by this coordinator's ingestor."),
            ("store_errors", stats.store_errors, "Failed store writes (retried) of this coordinator."),
            ("connects", stats.connects, "Broker connections made by this coordinator."),
        ):
            yield CounterMetricFamily(f"edgeml_coordinator_{name}", doc, value=value)
        yield GaugeMetricFamily(
            "edgeml_coordinator_broker_connected", "1 if subscribed at the broker.",
            value=1 if ingestor.subscribed.is_set() else 0,
        )


def metrics_registry(store: Store, ingestor: Ingestor | None = None, *, lag_window_s: float = 300.0) -> CollectorRegistry:
    """A registry of its own (not the process-global one), so several apps can coexist."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(store, ingestor, lag_window_s))  # type: ignore[arg-type]
    return registry


def render(registry: Any) -> bytes:
    return generate_latest(registry)
