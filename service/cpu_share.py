"""The machine's cores, shared by the server's worker processes: which requests are in progress
anywhere on the server, so that a runtime call alone on it may use every core (the model's
lone-request session, service/predictor.py) and one that is not keeps to its own.

Each worker writes, in its slots of an array shared by all workers, how many requests it has
in progress and when it last had none: one writer per slot (its event loop's thread), so no
lock. The parent process allocates the array and clears a dead worker's slots; a single-process
server has an array of its own. HTTP (service/observability.py) and gRPC
(service/grpc_service.py) count their requests with the same `CpuShare.request()`.

Requests still in the kernel's socket queues are not seen: a worker running a call on its event
loop reads nothing meanwhile, so the next request on its own connections waits for that call
whatever threads it has.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, MutableSequence
from contextlib import contextmanager
from typing import Any

# Another worker counts as busy until it has had no request for this long: between the
# requests of one busy connection it is idle for a client's turnaround, and a call that took
# every core then would share them with that worker's next call (on 2 cores, at concurrency
# 2, the lone-request session cost 6% of the throughput without this wait). A request alone on
# the server leaves its siblings idle for much longer.
QUIET_S = 0.001


class CpuShare:
    """One process's view of the requests in progress on the whole server. Made by one of the
    three constructors: `for_supervisor`, `for_worker`, `single_process`."""

    def __init__(self, slots: MutableSequence[float], index: int | None) -> None:
        # [count of worker 0, ..., count of worker n-1, idle since (worker 0), ...]
        self.slots = slots
        self.workers = len(slots) // 2
        self.index = index  # this process's worker; None in the supervisor, which serves none

    @classmethod
    def for_supervisor(cls, workers: int, context: Any) -> CpuShare:
        """The parent of `workers` worker processes: allocates the shared array (in
        `context`'s shared memory, handed to each worker at its start) and counts nothing."""
        return cls(context.RawArray("d", 2 * workers), None)

    @classmethod
    def for_worker(cls, slots: MutableSequence[float], index: int) -> CpuShare:
        """Worker `index` of a multi-process server, on the array its supervisor allocated."""
        return cls(slots, index)

    @classmethod
    def single_process(cls) -> CpuShare:
        """A server that is one process: its own requests are all there are."""
        return cls([0.0, 0.0], 0)

    @contextmanager
    def request(self) -> Iterator[None]:
        """Counts a request in progress in this worker for as long as the block runs."""
        own = self._own()
        self.slots[own] += 1
        try:
            yield
        finally:
            if self.slots[own] <= 1:  # the time first, so that a reader seeing 0 sees it
                self.slots[self.workers + own] = time.monotonic()
            self.slots[own] -= 1

    def alone(self) -> bool:
        """Whether the request calling is the only one in progress, server-wide, with every
        other worker quiet for QUIET_S."""
        own, n, slots = self._own(), self.workers, self.slots
        if slots[own] > 1:
            return False
        quiet = time.monotonic() - QUIET_S
        return all(slots[i] == 0 and slots[n + i] <= quiet for i in range(n) if i != own)

    def in_progress(self) -> int:
        """The requests in progress on the whole server, this worker's included."""
        return int(sum(self.slots[: self.workers]))

    def forget(self, index: int) -> None:
        """Worker `index` died: what it had in progress died with it (the supervisor's call)."""
        self.slots[index] = 0.0

    def _own(self) -> int:
        if self.index is None:
            raise RuntimeError("the supervisor serves no requests")
        return self.index
