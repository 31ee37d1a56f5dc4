"""Shadow scoring: a second version scores a copy of a request after its answer is sent, and the
two versions' scores are compared, the comparison a ranking team makes before any A/B.

A copy never delays or fails the answer: it is taken up only after the answer is sent, it runs
on a thread of its own, and it is the first work shed: a copy made while any other request is
in progress on the server (CpuShare), or while the previous copy is still being scored, is
dropped and counted (`mmoe_shadow_requests_total{outcome="shed"}`). While a copy is scored it
counts as a request in progress, so a primary arriving meanwhile keeps to its own core.

Per task, over the candidates of each request scored by both (model, version: the primary's;
shadow_version):
- `mmoe_shadow_score_difference`: |primary - shadow| of each candidate;
- `mmoe_shadow_rank_correlation`: the Spearman correlation of the two rankings of a request's
  candidates (requests of 3 or more);
- `mmoe_shadow_topk_overlap`: the share of the primary's top 10 (or all, if fewer) that the
  shadow ranks in its own top 10.
The shadow version's own series (scores, feature skew, gate use, runtime) carry its version.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Histogram

from mmoe.service.cpu_share import CpuShare
from mmoe.service.monitoring import observe_many

if TYPE_CHECKING:
    from mmoe.service.registry import LoadedModel

log = logging.getLogger("mmoe.service")

TOP_K = 10
_LABELS = ("model", "version", "shadow_version")
_DIFFERENCE_BUCKETS = (0.0001, 0.0005, 0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
_CORRELATION_BUCKETS = (-0.5, 0.0, 0.5, 0.8, 0.9, 0.95, 0.98, 0.99, 0.999, 1.0)
_OVERLAP_BUCKETS = (0.0, 0.2, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
OUTCOMES = ("scored", "shed", "failed")

# Feeds for the shadow version, made in the shadow's thread: (the primary's feeds) -> feeds.
FeedsFor = Callable[["LoadedModel"], dict[str, np.ndarray]]


class ShadowMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "mmoe_shadow_requests",
            "shadow copies of requests: scored, shed (other work in progress) or failed",
            [*_LABELS, "outcome"],
            registry=registry,
        )
        self.difference = Histogram(
            "mmoe_shadow_score_difference",
            "|primary score - shadow score| per candidate",
            [*_LABELS, "task"],
            buckets=_DIFFERENCE_BUCKETS,
            registry=registry,
        )
        self.correlation = Histogram(
            "mmoe_shadow_rank_correlation",
            "Spearman correlation of the primary's and the shadow's ranking of a request's "
            "candidates",
            [*_LABELS, "task"],
            buckets=_CORRELATION_BUCKETS,
            registry=registry,
        )
        self.overlap = Histogram(
            "mmoe_shadow_topk_overlap",
            f"share of the primary's top {TOP_K} candidates in the shadow's top {TOP_K}",
            [*_LABELS, "task"],
            buckets=_OVERLAP_BUCKETS,
            registry=registry,
        )


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation of two score vectors (ties broken by position)."""
    n = len(a)
    ra = np.empty(n)
    rb = np.empty(n)
    ra[np.argsort(a, kind="stable")] = np.arange(n)
    rb[np.argsort(b, kind="stable")] = np.arange(n)
    d = ra - rb
    return float(1 - 6 * np.dot(d, d) / (n * (n * n - 1)))


def topk_overlap(a: np.ndarray, b: np.ndarray, k: int = TOP_K) -> float:
    """The share of a's top k (highest scores) that is in b's top k."""
    k = min(k, len(a))
    top_a = np.argpartition(-a, k - 1)[:k]
    top_b = np.argpartition(-b, k - 1)[:k]
    return len(np.intersect1d(top_a, top_b)) / k


class ShadowScorer:
    """Scores shadow copies for one worker, one at a time, on a thread of its own."""

    def __init__(self, metrics: ShadowMetrics, share: CpuShare) -> None:
        self.metrics = metrics
        self.share = share
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="shadow")
        self._busy = False
        self._tasks: set[asyncio.Future[None]] = set()

    def submit(
        self,
        primary: LoadedModel,
        shadow: LoadedModel,
        feeds_for: FeedsFor,
        outputs: dict[str, np.ndarray],
    ) -> None:
        """Score a copy of a request `primary` has answered with `outputs` (call it once the
        answer is sent), unless other work is in progress: then it is shed."""
        labels = (primary.name, primary.version, shadow.version)
        if self._busy or self.share.in_progress() > 1:
            self.metrics.requests.labels(*labels, "shed").inc()
            return
        self._busy = True
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(
            self._executor, self._score, primary, shadow, feeds_for, outputs, labels
        )
        self._tasks.add(future)
        future.add_done_callback(self._done)

    def _done(self, future: asyncio.Future[None]) -> None:
        self._busy = False
        self._tasks.discard(future)

    def _score(
        self,
        primary: LoadedModel,
        shadow: LoadedModel,
        feeds_for: FeedsFor,
        outputs: dict[str, np.ndarray],
        labels: tuple[str, str, str],
    ) -> None:
        with self.share.request():
            try:
                feeds = feeds_for(shadow)
                theirs = shadow.runner.run_now(feeds)
            except Exception as err:  # the primary's answer is sent: count and log, no more
                self.metrics.requests.labels(*labels, "failed").inc()
                log.warning(
                    "shadow scoring failed",
                    extra={"event": "shadow_failed", "shadow": labels, "reason": str(err)},
                )
                return
        self.metrics.requests.labels(*labels, "scored").inc()
        ours = primary.predictor.task_outputs
        for task, output in shadow.predictor.task_outputs.items():
            if ours.get(task) != output or output not in outputs:
                continue
            a = outputs[output].reshape(len(outputs[output]), -1)[:, 0].astype(np.float64)
            b = theirs[output].reshape(len(theirs[output]), -1)[:, 0].astype(np.float64)
            observe_many(self.metrics.difference.labels(*labels, task), np.abs(a - b))
            if len(a) >= 3:
                self.metrics.correlation.labels(*labels, task).observe(spearman(a, b))
            if len(a) > 1:
                self.metrics.overlap.labels(*labels, task).observe(topk_overlap(a, b))

    async def close(self) -> None:
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self._executor.shutdown(wait=True)
