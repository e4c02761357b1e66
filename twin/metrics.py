"""Prometheus ``/metrics`` and a ``/healthz`` endpoint for the twin service.

Metrics are read from the service's counters at scrape time (a custom collector), so ingest pays
nothing per message for them.

| metric | type | meaning |
|---|---|---|
| ``forgeline_twin_messages_total`` | counter | MQTT messages processed |
| ``forgeline_twin_samples_total`` | counter | samples accepted by the core |
| ``forgeline_twin_samples_rejected_total{reason}`` | counter | samples rejected (channel, nonfinite, ...) |
| ``forgeline_twin_batches_duplicate_total`` | counter | telemetry batches dropped as duplicates |
| ``forgeline_twin_batches_historical_total`` | counter | replayed batches accepted |
| ``forgeline_twin_dead_letters_total{reason}`` | counter | messages dead-lettered, by reason class |
| ``forgeline_twin_dead_letters_suppressed_total`` | counter | dead letters over the per-tenant rate, not published |
| ``forgeline_twin_anomaly_events_total`` | counter | anomaly events opened or closed |
| ``forgeline_twin_devices`` | gauge | devices known |
| ``forgeline_twin_queue_depth`` | gauge | messages received, not yet processed |
| ``forgeline_twin_lag_seconds`` | gauge | receive → processed time of the last cycle's oldest message |
| ``forgeline_twin_missing_batches`` | gauge | batches missing inside open gaps, all devices |
| ``forgeline_twin_write_backlog_points`` | gauge | time-series points queued or spilled, not yet written |
| ``forgeline_twin_write_errors_total`` | counter | failed writes to the time-series database |
| ``forgeline_twin_write_dropped_points_total`` | counter | points dropped (memory spill full) or malformed |
| ``forgeline_twin_snapshot_age_seconds`` | gauge | time since the last snapshot |
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from twin.service import TwinService

STALL_S = 30.0  # the ingest thread must have run a cycle within this long to be healthy
# A client that sends nothing (or trickles a request) for this long is disconnected, so slow or idle
# connections cannot pile up threads of the metrics server.
CLIENT_TIMEOUT_S = 10.0


class TwinCollector(Collector):
    def __init__(self, service: TwinService) -> None:
        self.service = service

    def collect(self) -> Iterator[Metric]:
        service = self.service
        counters = service.ingestor.counters
        worker = service.worker_id

        def counter(name: str, text: str, value: float) -> CounterMetricFamily:
            family = CounterMetricFamily(f"forgeline_twin_{name}", text, labels=["worker"])
            family.add_metric([worker], value)
            return family

        def gauge(name: str, text: str, value: float) -> GaugeMetricFamily:
            family = GaugeMetricFamily(f"forgeline_twin_{name}", text, labels=["worker"])
            family.add_metric([worker], value)
            return family

        yield counter("messages", "MQTT messages processed", counters.messages)
        yield counter("samples", "samples accepted by the core", counters.samples_accepted)
        rejected = CounterMetricFamily("forgeline_twin_samples_rejected", "samples rejected",
                                       labels=["worker", "reason"])
        for reason, value in sorted(counters.samples_rejected.items()):
            rejected.add_metric([worker, reason], value)
        yield rejected
        yield counter("batches_duplicate", "telemetry batches dropped as duplicates", counters.batches_duplicate)
        yield counter("batches_historical", "replayed telemetry batches accepted", counters.batches_historical)
        dead = CounterMetricFamily("forgeline_twin_dead_letters", "messages dead-lettered", labels=["worker", "reason"])
        for reason, value in sorted(counters.dead_letters.items()):
            dead.add_metric([worker, reason], value)
        yield dead
        yield counter("dead_letters_suppressed", "dead letters counted but not published (rate limit)",
                      service.dead_letters_suppressed)
        yield counter("anomaly_events", "anomaly events opened or closed", counters.anomaly_events)
        yield counter("cycles", "ingest cycles that processed messages", service.cycles)
        yield counter("cycle_seconds", "time spent in those cycles (decode, core, twin states, acknowledgements)",
                      service.cycle_seconds)
        yield counter("twin_states_published", "retained twin states published", service.twin_states_published)
        yield counter("publish_failures", "publishes paho refused (not connected, queue full)",
                      service.publish_failures)
        yield gauge("outgoing_packets", "packets queued for the broker, not yet written", service.outgoing_packets)
        yield gauge("devices", "devices known", len(service.ingestor.registry))
        yield gauge("queue_depth", "messages received, not yet processed", service.queue_depth)
        yield gauge("lag_seconds", "receive to processed time of the last cycle's oldest message", service.lag_s)
        yield gauge("missing_batches", "batches missing inside open gaps",
                    sum(r.sequences.missing for r in list(service.ingestor.runtime.values())))
        writer = service.writer
        if writer is not None:
            yield gauge("write_backlog_points", "points queued or spilled, not yet written", writer.backlog_points)
            yield counter("write_errors", "failed writes to the time-series database", writer.stats.write_errors)
            yield counter("write_dropped_points", "points dropped or rejected",
                          writer.stats.dropped_points + writer.stats.rejected_points)
            yield counter("write_points", "points written", writer.stats.points_written)
        if service.snapshots is not None:
            yield gauge("snapshot_age_seconds", "time since the last snapshot",
                        time.time() - service.snapshots.last_saved)


def health(service: TwinService) -> tuple[bool, dict[str, Any]]:
    """Healthy = connected to the broker and the ingest thread ran a cycle within ``STALL_S``."""
    now = time.time()
    stalled = now - service.last_cycle_at > STALL_S
    document = {
        "worker": service.worker_id,
        "connected": service.connected,
        "ingest_stalled": stalled,
        "queue_depth": service.queue_depth,
        "devices": len(service.ingestor.registry),
        "database_down_s": (now - service.writer.down_since) if service.writer and service.writer.down_since else None,
    }
    return service.connected and not stalled, document


class MetricsServer:
    """``/metrics`` (Prometheus text format) and ``/healthz`` (JSON, 200 or 503) on one port."""

    def __init__(self, service: TwinService, host: str, port: int) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(TwinCollector(service))
        registry = self.registry

        class Handler(BaseHTTPRequestHandler):
            timeout = CLIENT_TIMEOUT_S

            def do_GET(self) -> None:
                if self.path.startswith("/metrics"):
                    body, status, kind = generate_latest(registry), 200, "text/plain; version=0.0.4"
                elif self.path.startswith("/healthz"):
                    ok, document = health(service)
                    body, status, kind = json.dumps(document).encode(), 200 if ok else 503, "application/json"
                else:
                    body, status, kind = b"not found\n", 404, "text/plain"
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.port = int(self.httpd.server_address[1])
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="twin-metrics", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
