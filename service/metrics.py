"""Prometheus metrics: in a registry per app (tests can build several apps in one process), or,
in a worker of a multi-process server (PROMETHEUS_MULTIPROC_DIR set by service/workers.py),
in prometheus_client's multiprocess files, so that any worker's /metrics sums all of them."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from mmoe.service.monitoring import MonitoringMetrics, Watched
from mmoe.service.shadow import ShadowMetrics

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
_INFO_LABELS = ("name", "version", "provider", "path")


class _ModelInfo(Collector):
    """mmoe_model_info: one sample per model being served, read when scraped (a gauge with
    these labels would keep the label set of a model reloaded away in the multiprocess files)."""

    def __init__(self, models: Callable[[], list[dict[str, str]]]) -> None:
        self.models = models

    def collect(self) -> Iterator[Metric]:
        info = GaugeMetricFamily("mmoe_model_info", "the model being served", labels=_INFO_LABELS)
        for model in self.models():
            info.add_metric([model[k] for k in _INFO_LABELS], 1)
        yield info


# The labels that say which model a series is about: every model-level series carries them
# (empty where no model was involved, e.g. /livez or a request refused before routing).
MODEL_LABELS = ("model", "version")


class ModelMetrics:
    """The runtime series of one loaded model (name, version), their label children resolved
    once: a request then costs no label lookups."""

    def __init__(self, metrics: ServiceMetrics, name: str, version: str) -> None:
        self.name, self.version = name, version
        self.request_rows = metrics.request_rows.labels(name, version)
        self.batch_rows = metrics.batch_rows.labels(name, version)
        self.runtime_seconds = metrics.runtime_seconds.labels(name, version)
        self.lone_calls = metrics.lone_calls.labels(name, version)
        self.shed = {r: metrics.shed.labels(r, name, version) for r in SHED_REASONS}
        self.queue_depth = metrics.queue_depth
        self.inflight = metrics.inflight
        for result in GOLDEN_RESULTS:
            metrics.golden_checks.labels(name, version, result)
        self._items = {o: metrics.item_lookups.labels(o, name, version) for o in ITEM_OUTCOMES}

    def count_items(self, counts: dict[str, int]) -> None:
        """Candidates looked up in the item source, by outcome."""
        for outcome, n in counts.items():
            if n:
                self._items[outcome].inc(n)

    def observe_run(self, rows: int, seconds: float, lone: bool = False) -> None:
        self.batch_rows.observe(rows)
        self.runtime_seconds.observe(seconds)
        if lone:
            self.lone_calls.inc()


SHED_REASONS = ("queue_full", "timeout")
ITEM_OUTCOMES = ("hit", "miss", "stale", "error")  # service/items.py's OUTCOMES
GOLDEN_RESULTS = ("ok", "mismatch", "missing")


class ServiceMetrics:
    def __init__(self, watched: Watched | None = None) -> None:
        self.multiprocess_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        self.registry = CollectorRegistry()
        r = self.registry
        self.monitoring = MonitoringMetrics(r, watched or Watched())
        self.shadow = ShadowMetrics(r)
        self.requests = Counter(
            "mmoe_requests",
            "requests by route, status and the model that answered",
            ["route", "status", *MODEL_LABELS],
            registry=r,
        )
        self.latency = Histogram(
            "mmoe_request_latency_seconds",
            "request latency by route and the model that answered",
            ["route", *MODEL_LABELS],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.request_rows = Histogram(
            "mmoe_request_rows",
            "candidates per scoring request",
            MODEL_LABELS,
            buckets=_ROW_BUCKETS,
            registry=r,
        )
        self.batch_rows = Histogram(
            "mmoe_runtime_batch_rows",
            "rows per onnxruntime call",
            MODEL_LABELS,
            buckets=_ROW_BUCKETS,
            registry=r,
        )
        self.runtime_seconds = Histogram(
            "mmoe_runtime_seconds",
            "onnxruntime run() time",
            MODEL_LABELS,
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.lone_calls = Counter(
            "mmoe_runtime_lone_calls",
            "onnxruntime calls made on every core, no other request being scored (part of "
            "mmoe_runtime_seconds_count)",
            MODEL_LABELS,
            registry=r,
        )
        # Gauges are summed over the live workers.
        self.queue_depth = Gauge(
            "mmoe_queue_depth",
            "requests waiting for the runtime",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.inflight = Gauge(
            "mmoe_inflight",
            "onnxruntime calls in progress",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.active = Gauge(
            "mmoe_http_requests_active",
            "HTTP requests in progress",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.shed = Counter(
            "mmoe_shed",
            "requests refused with 503 (queue full or timeout)",
            ["reason", *MODEL_LABELS],
            registry=r,
        )
        self.reloads = Counter(
            "mmoe_reloads",
            "model loads by result (each worker's load counts)",
            ["result", *MODEL_LABELS],
            registry=r,
        )
        self.golden_checks = Counter(
            "mmoe_golden_checks",
            "golden-row checks at load: ok, mismatch (the file was refused), missing (a file "
            "without golden rows, served unverified)",
            [*MODEL_LABELS, "result"],
            registry=r,
        )
        self.item_lookups = Counter(
            "mmoe_item_lookups",
            "candidates whose item features came from the item source, by outcome: hit, miss "
            "(no such item: defaults), stale (Redis down, an expired cache entry), error (Redis "
            "down, nothing cached: defaults)",
            ["outcome", *MODEL_LABELS],
            registry=r,
        )
        self.item_reloads = Counter(
            "mmoe_item_reloads",
            "item sources read again because they changed, by result",
            ["result"],
            registry=r,
        )
        # Every known label value at 0 from the start: a series that exists only after its first
        # event has no rate() until then (and a worker's multiprocess files hold only what it
        # touched), so alerts and dashboards would read "no data" where the answer is 0. The
        # model-level ones start at 0 when their model loads (ModelMetrics).
        for reason in SHED_REASONS:
            self.shed.labels(reason, "", "")
        for result in ("ok", "failed"):
            self.reloads.labels(result, "", "")
            self.item_reloads.labels(result)
        self._models: Callable[[], list[dict[str, str]]] = list
        # What a scrape reads: this registry, or every worker's multiprocess files.
        self._scraped = r
        if self.multiprocess_dir is not None:
            self._scraped = CollectorRegistry()
            MultiProcessCollector(self._scraped, self.multiprocess_dir)
        self._scraped.register(_ModelInfo(lambda: self._models()))
        self._scraped.register(self.monitoring.references)

    def for_model(self, name: str, version: str) -> ModelMetrics:
        return ModelMetrics(self, name, version)

    def serve_models(self, models: Callable[[], list[dict[str, str]]]) -> None:
        """Where mmoe_model_info reads the models being served (name, version, provider, path)."""
        self._models = models

    def exposition(self) -> bytes:
        """The text a scrape of /metrics gets: this process's metrics, or every worker's."""
        return generate_latest(self._scraped)
