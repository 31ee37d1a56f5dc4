"""Prometheus metrics, in a registry per app (tests can build several apps in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from mmoe.service.monitoring import MonitoringMetrics, Watched

_LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.002,
    0.004,
    0.006,
    0.008,
    0.012,
    0.016,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
)
_ROW_BUCKETS = (1, 4, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)


class ServiceMetrics:
    def __init__(self, watched: Watched | None = None) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.monitoring = MonitoringMetrics(r, watched or Watched())
        self.requests = Counter(
            "mmoe_requests", "HTTP requests by route and status", ["route", "status"], registry=r
        )
        self.latency = Histogram(
            "mmoe_request_latency_seconds",
            "HTTP request latency by route",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.request_rows = Histogram(
            "mmoe_request_rows", "candidates per scoring request", buckets=_ROW_BUCKETS, registry=r
        )
        self.batch_rows = Histogram(
            "mmoe_runtime_batch_rows", "rows per onnxruntime call", buckets=_ROW_BUCKETS, registry=r
        )
        self.runtime_seconds = Histogram(
            "mmoe_runtime_seconds", "onnxruntime run() time", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.queue_depth = Gauge("mmoe_queue_depth", "requests waiting for the runtime", registry=r)
        self.inflight = Gauge("mmoe_inflight", "onnxruntime calls in progress", registry=r)
        self.shed = Counter(
            "mmoe_shed", "requests refused with 503 (queue full or timeout)", ["reason"], registry=r
        )
        self.model_info = Gauge(
            "mmoe_model_info",
            "the model being served",
            ["name", "version", "provider", "path"],
            registry=r,
        )
        self.runs = Counter(
            "mmoe_runtime_runs",
            "onnxruntime calls, by whether their threads spun (MMOE_INTRA_OP_SPINNING)",
            ["spinning"],
            registry=r,
        )
        # HTTP requests being received, decoded, scored or answered. The runner reads it to
        # know whether a runtime call is alone (see MMOE_INTRA_OP_SPINNING=idle).
        self.active_requests = 0
        self.active = Gauge("mmoe_http_requests_active", "HTTP requests in progress", registry=r)
        self.active.set_function(lambda: self.active_requests)
        self.reloads = Counter("mmoe_reloads", "model reloads by result", ["result"], registry=r)

    def observe_run(self, rows: int, seconds: float, spun: bool) -> None:
        self.batch_rows.observe(rows)
        self.runtime_seconds.observe(seconds)
        self.runs.labels("true" if spun else "false").inc()
