"""What the model sees in production, next to what it saw in training (docs/monitoring.md).

From the graph's monitoring outputs (ModelMetadata.monitor) and its scores, after every
runtime call:

- `mmoe_feature_values_total{feature, outcome}`: each feature's values by outcome (known | oov
  | default, the rule of contract.metadata.FeatureRates). A context input given once for the
  request's N rows counts N times, as its value does in each of the N training rows, so live
  shares compare with the per-row reference.
- `mmoe_gate_weight_total{task, expert}`: the gate weights summed over the rows scored; over
  the experts of one task they add up to the rows scored.
- `mmoe_score{task}`: a histogram of each task's scores (probability-sized buckets; for a
  regression task only its _sum and _count, the mean, say much).

Every series carries the `model` and `version` labels of the model that scored the rows.
Beside them, the training-time references of each model being served (from its metadata):
`mmoe_feature_reference_rate{feature, outcome}`, `mmoe_gate_weight_reference{task, expert}`,
`mmoe_score_mean_reference{task}`. The live-over-reference ratios are Prometheus recording
rules (deploy/prometheus/rules/mmoe.yml): computed from counters summed over every worker
process and replica, they are right however many serve, where a ratio kept in each process
would see only its share of the traffic.

Each of the three pieces can be turned off (MMOE_MONITOR_FEATURES, _GATES, _SCORES); off, its
series (the references too) are not exported and its outputs are not fetched.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from mmoe.contract.metadata import OUTCOMES, ModelMetadata, score_labels

# Scores are mostly probabilities, and click-through rates mostly small: finer near 0 and 1.
SCORE_BUCKETS = (
    0.001,
    0.002,
    0.005,
    0.01,
    0.02,
    0.05,
    0.1,
    0.2,
    0.3,
    0.4,
    0.5,
    0.6,
    0.7,
    0.8,
    0.9,
    0.95,
    0.98,
    0.99,
    0.999,
    1.0,
)


@dataclass(frozen=True)
class Watched:
    """Which pieces are on (the MMOE_MONITOR_* settings)."""

    features: bool = True
    gates: bool = True
    scores: bool = True


class MonitoringMetrics:
    """The monitoring series of one app: created only for the pieces that are on."""

    def __init__(self, registry: CollectorRegistry, watched: Watched) -> None:
        self.watched = watched
        self.feature_values = (
            Counter(
                "mmoe_feature_values",
                "feature values received, by outcome: known, oov (not in the vocabulary), "
                "default (missing); a context value sent once counts once per row",
                ["feature", "outcome", "model", "version"],
                registry=registry,
            )
            if watched.features
            else None
        )
        self.gate_weight = (
            Counter(
                "mmoe_gate_weight",
                "gate weights summed over the rows scored, per task and expert (a task's "
                "experts add up to the rows scored)",
                ["task", "expert", "model", "version"],
                registry=registry,
            )
            if watched.gates
            else None
        )
        self.score = (
            Histogram(
                "mmoe_score",
                "scores per task (multiclass: <task>/<class>)",
                ["task", "model", "version"],
                buckets=SCORE_BUCKETS,
                registry=registry,
            )
            if watched.scores
            else None
        )
        self._models: Callable[[], Sequence[Served]] = list
        # Registered by the owner on the registry a scrape reads (with worker processes, not
        # `registry`: the references are the models', read when scraped, not summed over files).
        self.references: Collector = _References(self)

    def serve_models(self, models: Callable[[], Sequence[Served]]) -> None:
        """Where the references are read from when scraped: the models being served, each as
        (name, version, metadata)."""
        self._models = models

    def monitor(self, meta: ModelMetadata, name: str, version: str) -> ModelMonitor:
        """The recorder for one loaded model, served as `name` `version`."""
        return ModelMonitor(meta, self, (name, version))


# A model being served: its name, version and metadata.
Served = tuple[str, str, ModelMetadata]


class _References(Collector):
    """The training-time references of the models being served, read when scraped (a gauge
    would keep the series of a model unloaded since)."""

    def __init__(self, metrics: MonitoringMetrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        watched = self.metrics.watched
        rates = GaugeMetricFamily(
            "mmoe_feature_reference_rate",
            "share of each feature's values per outcome on the validation rows",
            labels=["feature", "outcome", "model", "version"],
        )
        gates = GaugeMetricFamily(
            "mmoe_gate_weight_reference",
            "mean gate weight per task and expert on the validation rows",
            labels=["task", "expert", "model", "version"],
        )
        scores = GaugeMetricFamily(
            "mmoe_score_mean_reference",
            "mean score per task on the validation rows",
            labels=["task", "model", "version"],
        )
        for name, version, meta in self.metrics._models():
            if meta.monitor is None or meta.monitor.reference is None:
                continue
            info, reference = meta.monitor, meta.monitor.reference
            if watched.features and info.feature_values is not None:
                for feature, r in reference.features.items():
                    for outcome in OUTCOMES:
                        value = getattr(r, outcome)
                        if value is not None:
                            rates.add_metric([feature, outcome, name, version], value)
            if watched.gates and info.gate_weights is not None:
                for task, weights in reference.gates.items():
                    for expert, w in zip(info.experts, weights, strict=True):
                        gates.add_metric([task, expert, name, version], w)
            if watched.scores:
                for t in meta.tasks:
                    if t.name in reference.scores:
                        means = reference.scores[t.name]
                        for label, mean in zip(score_labels(t), means, strict=True):
                            scores.add_metric([label, name, version], mean)
        yield from (family for family in (rates, gates, scores) if family.samples)


class ModelMonitor:
    """Records the monitoring series of one loaded model, one runtime call at a time.

    The label children are looked up once here: a call then costs a few numpy operations and
    one increment per non-zero count."""

    def __init__(
        self, meta: ModelMetadata, metrics: MonitoringMetrics, model: tuple[str, str]
    ) -> None:
        info = meta.monitor
        self.outputs: list[str] = []  # the graph outputs to fetch beside the scores
        self._features: list[str] = []
        # One counter per (feature, outcome), row-major as the graph's counts [features, 3];
        # None where the outcome cannot happen (oov without a vocabulary), the mask 0 there.
        self._feature_children: list[Counter | None] = []
        self._countable = np.zeros(0, dtype=np.int64)
        if info is not None and info.feature_values is not None and metrics.feature_values:
            self._values_output = info.feature_values
            self.outputs.append(info.feature_values)
            self._features = info.features
            vocabulary = set(info.vocabulary)
            self._feature_children = [
                metrics.feature_values.labels(f, o, *model)
                if o != "oov" or f in vocabulary
                else None
                for f in info.features
                for o in OUTCOMES
            ]
            self._countable = np.array([c is not None for c in self._feature_children], np.int64)
        self._gate_children: list[list[Counter]] = []
        if info is not None and info.gate_weights is not None and metrics.gate_weight:
            self._gates_output = info.gate_weights
            self.outputs.append(info.gate_weights)
            self._gate_children = [
                [metrics.gate_weight.labels(task, e, *model) for e in info.experts]
                for task in info.gate_tasks
            ]
        self._scores: list[tuple[str, list[Histogram]]] = []
        if metrics.score is not None:
            self._scores = [
                (t.output, [metrics.score.labels(label, *model) for label in score_labels(t)])
                for t in meta.tasks
            ]

    @property
    def active(self) -> bool:
        return bool(self._feature_children or self._gate_children or self._scores)

    def record(self, feeds: dict[str, np.ndarray], outputs: dict[str, np.ndarray]) -> None:
        """Count one runtime call: its inputs `feeds` and everything it returned."""
        if self._feature_children:
            lengths = np.array([len(feeds[f]) for f in self._features], dtype=np.int64)
            # A context input sent once stands for each of the request's rows.
            weights = lengths.max() // lengths
            counts = (outputs[self._values_output] * weights[:, None]).ravel() * self._countable
            # One increment per count that moved: a lock each, the bulk of what this costs.
            nonzero = np.flatnonzero(counts)
            for i, n in zip(nonzero.tolist(), counts[nonzero].tolist(), strict=True):
                self._feature_children[i].inc(n)  # type: ignore[union-attr]
        if self._gate_children:
            sums = outputs[self._gates_output].tolist()
            for experts, task_sums in zip(self._gate_children, sums, strict=True):
                for expert, w in zip(experts, task_sums, strict=True):
                    expert.inc(w)
        for output, histograms in self._scores:
            scores = outputs[output]
            columns = scores.reshape(len(scores), -1)
            for k, histogram in enumerate(histograms):
                observe_many(histogram, columns[:, k])


def observe_many(histogram: Histogram, values: np.ndarray) -> None:
    """`histogram.observe(v)` for every v in `values`, in one pass: one increment per bucket
    that gets any (prometheus_client has no bulk observe; this uses its per-bucket values,
    as observe() does, so that multiprocess mode sums them like any other)."""
    bounds = histogram._upper_bounds  # the bucket bounds, +Inf last
    # observe() puts v in the first bucket with v <= bound: searchsorted "left".
    per_bucket = np.bincount(np.searchsorted(bounds, values, side="left"), minlength=len(bounds))
    for bucket, n in zip(histogram._buckets, per_bucket.tolist(), strict=False):
        if n:
            bucket.inc(n)
    histogram._sum.inc(float(values.sum(dtype=np.float64)))
