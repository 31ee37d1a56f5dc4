"""Getting arrays through onnxruntime without blocking the event loop, with a bounded queue.

Two runners with one interface (`infer`):
- DirectRunner: each request is one runtime call on the inference thread pool (a small one
  alone on the server: on the event loop's thread).
- MicroBatcher: concurrent requests are merged into one runtime call (up to `max_rows` rows,
  waiting at most `wait_s` for company) and the outputs split back, in order.
Both refuse work beyond `max_queue` waiting requests (Overloaded -> 503 + Retry-After) instead of
letting latency grow without bound.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from mmoe.service.predictor import Predictor

Feeds = dict[str, np.ndarray]
Outputs = dict[str, np.ndarray]
RunObserver = Callable[[int, float, bool], None]  # (rows in the runtime call, seconds, spun)


class Overloaded(Exception):
    """The queue is full; the caller should retry later."""


class Runner:
    """Runs a request's feeds on the inference threads: one runtime call per request
    (DirectRunner) or merged with others (MicroBatcher); refuses work past `max_queue`."""

    def __init__(
        self,
        predictor: Predictor,
        executor: ThreadPoolExecutor,
        workers: int,
        max_queue: int,
        observe: RunObserver | None,
        active_requests: Callable[[], int] | None = None,
    ) -> None:
        self.predictor = predictor
        self.executor = executor
        self.workers = workers
        self.max_queue = max_queue
        self.observe = observe
        self.active_requests = active_requests  # HTTP requests in progress, this one included
        self.waiting = 0  # requests accepted but not yet in a runtime call
        self.inflight = 0  # runtime calls in progress

    def _alone(self) -> bool:
        """Whether a runtime call about to start has the machine to itself: no other call in
        progress or queued, and no other request on its way (being received or decoded)."""
        others = self.active_requests() > 1 if self.active_requests is not None else False
        return self.inflight == 1 and self.waiting == 0 and not others

    def _run(self, feeds: Feeds, alone: bool = False) -> Outputs:
        t0 = time.perf_counter()
        out = self.predictor.run(feeds, alone=alone)
        if self.observe is not None:
            rows = max(len(v) for v in feeds.values())  # context inputs may have one row
            self.observe(rows, time.perf_counter() - t0, self.predictor.spins(alone))
        return out

    async def infer(self, feeds: Feeds, n: int) -> Outputs:
        raise NotImplementedError

    async def close(self) -> None:
        """Stop taking work; what is accepted still completes."""


# A request alone on the server with at most this many rows runs on the event loop's thread
# instead of an inference thread: the two thread hand-offs cost about 0.3 ms, 5% of a 256-row
# EasyRec-sized request on 2 cores (bench/), and nothing else is waiting for the loop. Larger
# ones take the hop, so that a request arriving meanwhile (or a health check) is not kept
# waiting behind a long run.
INLINE_MAX_ROWS = 512


class DirectRunner(Runner):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._slots = asyncio.Semaphore(self.workers)

    async def infer(self, feeds: Feeds, n: int) -> Outputs:
        # Requests received together with this one may not be counted yet: their tasks are
        # scheduled but not started. One turn of the loop lets them start (and count), so that
        # _alone() below does not take a busy server for an idle one.
        await asyncio.sleep(0)
        if self.waiting >= self.max_queue:
            raise Overloaded
        self.waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self.waiting -= 1
        self.inflight += 1
        alone = self._alone()
        if alone and n <= INLINE_MAX_ROWS:
            try:
                return self._run(feeds, alone)
            finally:
                self._release()
        loop = asyncio.get_running_loop()
        fut = loop.run_in_executor(self.executor, self._run, feeds, alone)
        # Released when the run really ends, even if the caller gave up waiting.
        fut.add_done_callback(lambda _: self._release())
        return await asyncio.shield(fut)

    def _release(self) -> None:
        self.inflight -= 1
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

    async def infer(self, feeds: Feeds, n: int) -> Outputs:
        if self._closed:  # the request took this model just before a reload replaced it
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self.executor, self._run, feeds)
        if self.waiting >= self.max_queue:
            raise Overloaded
        item = _Item(feeds, n, asyncio.get_running_loop().create_future())
        self._queue.append(item)
        self.waiting += 1
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
            self.waiting -= 1
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
            self.inflight += 1
            try:
                merged = _merge([(b.feeds, b.n) for b in batch])
                alone = self._alone()
                outputs = await loop.run_in_executor(self.executor, self._run, merged, alone)
            except Exception as err:  # hand the failure to every caller in the batch
                for b in batch:
                    if not b.future.done():
                        b.future.set_exception(err)
                continue
            finally:
                self.inflight -= 1
            start = 0
            for b in batch:
                if not b.future.done():
                    b.future.set_result({k: v[start : start + b.n] for k, v in outputs.items()})
                start += b.n

    async def close(self) -> None:
        self._closed = True
        self._arrived.set()
        await asyncio.gather(*self._tasks, return_exceptions=True)
