"""Getting a request's arrays through onnxruntime: admitted into a bounded queue, scored within
the request's time budget, without holding up the event loop for long.

Two runners with one interface (`Runner.infer`):
- DirectRunner: each request is one runtime call, on the event loop's own thread when it is
  small (INLINE_MAX_ROWS), else on an inference thread.
- MicroBatcher: concurrent requests are merged into one runtime call (up to `max_rows` rows,
  waiting at most `wait_s` for company) and the outputs split back, in order.
Both answer 503 + Retry-After (ApiError) instead of letting latency grow without bound: when
`max_queue` requests already wait, or when a request is not scored within its time budget.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from mmoe.service.cpu_share import CpuShare
from mmoe.service.errors import ApiError, InternalError
from mmoe.service.metrics import ModelMetrics
from mmoe.service.monitoring import ModelMonitor
from mmoe.service.observability import REQUEST_ID
from mmoe.service.predictor import Predictor
from mmoe.service.settings import Settings

log = logging.getLogger("mmoe.service")

Feeds = dict[str, np.ndarray]
Outputs = dict[str, np.ndarray]


class Overloaded(Exception):
    """The queue is full; the caller should retry later."""


@dataclass(frozen=True)
class Admission:
    """How much waiting a runner accepts (MMOE_MAX_QUEUE, MMOE_REQUEST_TIMEOUT_MS) and what a
    refused request is told (MMOE_RETRY_AFTER_S)."""

    max_queue: int
    timeout_ms: int
    retry_after_s: int

    @classmethod
    def of(cls, settings: Settings) -> Admission:
        return cls(settings.max_queue, settings.request_timeout_ms, settings.retry_after_s)


class Runner:
    """Runs a request's feeds: one runtime call per request (DirectRunner) or merged with
    others (MicroBatcher), `workers` calls at once on `executor`'s threads."""

    def __init__(
        self,
        predictor: Predictor,
        executor: ThreadPoolExecutor,
        workers: int,
        admission: Admission,
        metrics: ModelMetrics,
        share: CpuShare,
        monitor: ModelMonitor | None = None,
    ) -> None:
        self.predictor = predictor
        self.share = share  # whether a call has the server's cores to itself
        self.monitor = monitor  # counts what each runtime call saw (service/monitoring.py)
        self._outputs = predictor.outputs + (monitor.outputs if monitor else [])
        self.executor = executor
        self.workers = workers
        self.admission = admission
        self.metrics = metrics
        self.waiting = 0  # requests accepted but not yet in a runtime call
        self.inflight = 0  # runtime calls in progress

    async def infer(self, feeds: Feeds, n: int) -> Outputs:
        """The graph's outputs for `feeds` (n rows). ApiError 503 with Retry-After when the
        queue is full or the request's time budget runs out."""
        self.metrics.request_rows.observe(n)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.admission.timeout_ms / 1000
        try:
            async with asyncio.timeout_at(deadline):
                outputs = await self._submit(feeds, n)
            if loop.time() > deadline:  # a run on the loop's own thread cannot be interrupted
                raise TimeoutError
            return outputs
        except Overloaded:
            self.metrics.shed["queue_full"].inc()
            raise self._refusal("overloaded", "server busy: queue full, retry later") from None
        except TimeoutError:
            self.metrics.shed["timeout"].inc()
            reason = f"not scored within {self.admission.timeout_ms} ms, retry later"
            raise self._refusal("timeout", reason) from None
        except Exception:  # the runtime failed on arrays the decoder accepted: a bug
            request_id = REQUEST_ID.get() or uuid.uuid4().hex
            log.exception(
                "scoring failed",
                extra={
                    "event": "internal_error",
                    "request_id": request_id,
                    "rows": n,
                    # The request's shape, never its values.
                    "inputs": {k: [*v.shape, str(v.dtype)] for k, v in feeds.items()},
                },
            )
            raise InternalError(request_id) from None

    def _refusal(self, code: str, reason: str) -> ApiError:
        return ApiError(503, code, reason, None, {"Retry-After": str(self.admission.retry_after_s)})

    def _count_waiting(self, delta: int) -> None:
        self.waiting += delta
        self.metrics.queue_depth.inc(delta)

    def _count_inflight(self, delta: int) -> None:
        self.inflight += delta
        self.metrics.inflight.inc(delta)

    def run_now(self, feeds: Feeds) -> Outputs:
        """Score `feeds` on the calling thread, outside the queue, on one core: for work that
        is not a request of its own (a shadow copy)."""
        return self._run(feeds, lone=False)

    def _run(self, feeds: Feeds, lone: bool | None = None) -> Outputs:
        if lone is None:
            lone = self.predictor.runs_alone(self.share)
        t0 = time.perf_counter()
        out = self.predictor.run(feeds, self._outputs, lone)
        rows = max(len(v) for v in feeds.values())  # context inputs may have one row
        self.metrics.observe_run(rows, time.perf_counter() - t0, lone)
        if self.monitor is not None:
            self.monitor.record(feeds, out)
            # The monitoring outputs describe the whole call, not rows to hand back.
            out = {k: out[k] for k in self.predictor.outputs}
        return out

    async def _submit(self, feeds: Feeds, n: int) -> Outputs:
        raise NotImplementedError

    async def close(self) -> None:
        """Stop taking work; what is accepted still completes."""


# A request of at most this many rows runs on the event loop's thread: in a worker with one
# intra-op thread, a hand-off to an inference thread and back only adds work (0.3-0.4 ms of CPU
# per request measured in-process on the shared 2-core machine, for 1-row requests of the
# EasyRec-sized model), and the other cores have workers of their own. Larger runs take the
# hop, so that a health check is not kept waiting behind a long one (512 rows: about 5 ms).
INLINE_MAX_ROWS = 512


class DirectRunner(Runner):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._slots = asyncio.Semaphore(self.workers)

    async def _submit(self, feeds: Feeds, n: int) -> Outputs:
        if self.waiting >= self.admission.max_queue:
            raise Overloaded
        self._count_waiting(1)
        try:
            await self._slots.acquire()
        finally:
            self._count_waiting(-1)
        self._count_inflight(1)
        if n <= INLINE_MAX_ROWS:
            try:
                return self._run(feeds)
            finally:
                self._release()
        loop = asyncio.get_running_loop()
        fut = loop.run_in_executor(self.executor, self._run, feeds)
        # Released when the run really ends, even if the caller gave up waiting.
        fut.add_done_callback(lambda _: self._release())
        return await asyncio.shield(fut)

    def _release(self) -> None:
        self._count_inflight(-1)
        self._slots.release()


@dataclass
class _Item:
    feeds: Feeds
    n: int
    future: asyncio.Future[Outputs] = field(repr=False)


def _merge(requests: list[tuple[Feeds, int]]) -> Feeds:
    """The feeds of several requests as one: each input's rows, request after request. A
    context input given once for a request's n rows is broadcast to them first: the merged
    call has one row per candidate of every request."""
    if len(requests) == 1:
        return requests[0][0]
    merged: Feeds = {}
    for name in requests[0][0]:
        parts = []
        for feeds, n in requests:
            v = feeds[name]
            parts.append(v if len(v) == n else np.broadcast_to(v, (n, *v.shape[1:])))
        merged[name] = np.concatenate(parts)
    return merged


class MicroBatcher(Runner):
    def __init__(self, *args, max_rows: int, wait_s: float, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.max_rows = max_rows
        self.wait_s = wait_s
        self._queue: deque[_Item] = deque()
        self._arrived = asyncio.Event()
        self._closed = False
        self._tasks = [asyncio.create_task(self._worker()) for _ in range(self.workers)]

    async def _submit(self, feeds: Feeds, n: int) -> Outputs:
        if self._closed:  # the request took this model just before a reload replaced it
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self.executor, self._run, feeds)
        if self.waiting >= self.admission.max_queue:
            raise Overloaded
        item = _Item(feeds, n, asyncio.get_running_loop().create_future())
        self._queue.append(item)
        self._count_waiting(1)
        self._arrived.set()
        return await item.future

    def _take(self) -> list[_Item]:
        """Queued requests for one runtime call: at least one, up to max_rows rows."""
        batch: list[_Item] = []
        rows = 0
        while self._queue:
            item = self._queue[0]
            if batch and rows + item.n > self.max_rows:
                break
            self._queue.popleft()
            self._count_waiting(-1)
            if item.future.done():  # the caller timed out or went away
                continue
            batch.append(item)
            rows += item.n
        return batch

    async def _worker(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self._queue:
                if self._closed:
                    return
                self._arrived.clear()
                await self._arrived.wait()
            if self.wait_s > 0:
                deadline = loop.time() + self.wait_s
                while sum(i.n for i in self._queue) < self.max_rows:
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        break
                    self._arrived.clear()
                    try:
                        await asyncio.wait_for(self._arrived.wait(), remaining)
                    except TimeoutError:
                        break
            batch = self._take()
            if not batch:
                continue
            self._count_inflight(1)
            try:
                merged = _merge([(b.feeds, b.n) for b in batch])
                outputs = await loop.run_in_executor(self.executor, self._run, merged)
            except Exception as err:  # hand the failure to every caller in the batch
                for b in batch:
                    if not b.future.done():
                        b.future.set_exception(err)
                continue
            finally:
                self._count_inflight(-1)
            start = 0
            for b in batch:
                if not b.future.done():
                    b.future.set_result({k: v[start : start + b.n] for k, v in outputs.items()})
                start += b.n

    async def close(self) -> None:
        self._closed = True
        self._arrived.set()
        await asyncio.gather(*self._tasks, return_exceptions=True)
