"""Several server processes on one port (MMOE_WORKERS > 1).

The parent (`Supervisor`) binds the port and starts the workers. Each worker is a whole server
(its event loop, its onnxruntime session, its model holder) accepting connections on the port,
so the requests of a busy server run side by side in separate processes, with nothing shared
between them. On Linux each worker has a listening socket of its own (SO_REUSEPORT), and the
kernel spreads new connections over them. The parent imports no model code and serves no request; it
restarts a worker that dies, and relays what concerns all workers:

- SIGHUP: forwarded to every worker, each reloading the configured file (or reading the
  repository again).
- SIGTERM / SIGINT: the port is closed at once, then every worker finishes its in-flight
  requests and exits.
- a change of what is served (`POST /admin/reload`, the repository API's load and unload),
  answered by one worker: once that worker has made it (an `Action`), every other worker
  makes it too, and the answer waits for them (`WorkerLink.broadcast`).
- each worker's state (ready or why not, and the model it serves), sent to every worker, so
  that whichever worker answers /readyz or /metrics speaks for the whole server.

One thing is shared in memory: each worker's count of requests in progress
(service/cpu_share.py), so that a request alone on the whole server may run on every core.

Prometheus counters, histograms and gauges are summed over the workers by prometheus_client's
multiprocess mode, in a directory made for this start and removed at exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import multiprocessing
import os
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, MutableSequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any, NamedTuple

from mmoe.service.cpu_share import CpuShare
from mmoe.service.settings import Settings

log = logging.getLogger("mmoe.service")

# A worker exits with this when restarting it cannot help (a provider setting to fix): the
# server stops, with this status.
FATAL_EXIT = 3
# A worker that dies sooner than this after its start is restarted only after this long, so
# that one failing at every start does not take a core restarting.
_RESTART_BACKOFF_S = 1.0

# What a worker tells its siblings about itself: {"ready": bool, "reason": why not ready,
# "models": [{"name", "version", "provider", "path"}, ...]}.
WorkerState = dict[str, Any]


class Action(NamedTuple):
    """A change of what is served, made by one worker and repeated by the others: "file"
    (load the file `arg`), "sync" (read the repository again), "load" or "unload" (the model
    `arg`, through the repository API)."""

    kind: str
    arg: str = ""


# With one shared listening socket, the worker that wakes first takes every connection waiting
# (asyncio accepts in a loop): 8 keep-alive connections opened together all went to one worker
# in 1 of 3 tries, leaving the other core idle for as long as they lived. A socket per worker
# with SO_REUSEPORT gets each its own queue, which Linux fills by a hash of the client's
# address and port.
_SOCKET_PER_WORKER = sys.platform == "linux" and hasattr(socket, "SO_REUSEPORT")


def _listen(host: str, port: int, reuse_port: bool) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(2048)
    return sock


class _Listeners:
    """The port's listening sockets: one per worker where the kernel balances them, else one
    shared by all."""

    def __init__(self, host: str, port: int, count: int) -> None:
        # Bound without SO_REUSEPORT first, so that a port already in use fails here, even if
        # another server of this user listens on it with SO_REUSEPORT.
        first = _listen(host, port, reuse_port=False)
        self.host, self.port = host, first.getsockname()[1]
        self.shared: socket.socket | None = None
        self.own: dict[int, socket.socket] = {}
        if _SOCKET_PER_WORKER:
            first.close()
            self.own = {i: _listen(host, self.port, reuse_port=True) for i in range(count)}
        else:
            self.shared = first

    def of(self, index: int) -> socket.socket:
        return self.shared or self.own[index]

    def renew(self, index: int) -> None:
        """A new socket for the worker that replaces worker `index` (the connections waiting
        in the old one's queue are refused, rather than left waiting for the new worker)."""
        if index in self.own:
            self.own.pop(index).close()
            self.own[index] = _listen(self.host, self.port, reuse_port=True)

    def close(self) -> None:
        for sock in [self.shared, *self.own.values()]:
            if sock is not None:
                sock.close()


@dataclass
class _Worker:
    index: int
    process: BaseProcess
    conn: Connection
    started: float
    fatal: str | None = None


@dataclass
class _Broadcast:
    """An Action one worker made, waiting on the others."""

    requester: int
    request_id: int
    waiting: set[int]
    failed: dict[int, str] = field(default_factory=dict)


class Supervisor:
    """Runs `settings.workers` worker processes on the port until SIGTERM/SIGINT."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.workers: dict[int, _Worker] = {}
        self.states: dict[int, WorkerState] = {}
        # The file the workers serve (the configured one until a reload moves them all), or
        # the repository's models unloaded through its API: a restarted worker starts from
        # these, so that it serves what its siblings serve.
        self.serving = settings.model_path
        self.unloaded: set[str] = set()
        self.broadcasts: dict[tuple[int, int], _Broadcast] = {}
        self.restart_at: dict[int, float] = {}
        self.stopping = False
        self.status = 0

    def run(self) -> int:
        s = self.settings
        self.listeners = _Listeners(s.host, s.port, s.workers)
        context = multiprocessing.get_context("spawn")  # no inherited threads or locks
        self.share = CpuShare.for_supervisor(s.workers, context)
        wake_r, wake_w = socket.socketpair()
        wake_r.setblocking(False)
        wake_w.setblocking(False)
        with (
            tempfile.TemporaryDirectory(prefix="mmoe-metrics-") as metrics_dir,
            contextlib.closing(wake_r),
            contextlib.closing(wake_w),
        ):
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir  # read by each worker
            signal.set_wakeup_fd(wake_w.fileno())
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                signal.signal(sig, lambda *_: None)  # the number arrives on wake_r
            log.info(
                "starting workers",
                extra={"event": "workers_starting", "workers": s.workers, "port": s.port},
            )
            for index in range(s.workers):
                self._start(context, index)
            while self.workers or (self.restart_at and not self.stopping):
                self._step(context, wake_r)
            signal.set_wakeup_fd(-1)
        return self.status

    def _step(self, context: Any, wake_r: socket.socket) -> None:
        now = time.monotonic()
        for index, at in list(self.restart_at.items()):
            if at <= now and not self.stopping:
                del self.restart_at[index]
                self._start(context, index)
        timeout = max(0.0, min(self.restart_at.values()) - now) if self.restart_at else None
        by_handle: dict[Any, tuple[str, _Worker | None]] = {wake_r: ("signal", None)}
        for w in self.workers.values():
            by_handle[w.conn] = ("message", w)
            by_handle[w.process.sentinel] = ("exit", w)
        for handle in wait(list(by_handle), timeout):
            kind, worker = by_handle[handle]
            if kind == "signal":
                with contextlib.suppress(BlockingIOError):
                    for signum in wake_r.recv(64):
                        self._signal(signum)
            elif worker is not None and worker.index in self.workers:
                if kind == "message":
                    self._receive(worker)
                else:
                    self._exited(worker)

    def _start(self, context: Any, index: int) -> None:
        parent_end, child_end = context.Pipe()
        process = context.Process(
            target=run_worker,
            args=(
                self.settings,
                self.listeners.of(index),
                child_end,
                index,
                self.serving,
                sorted(self.unloaded),
                self.share.slots,
            ),
            name=f"mmoe-worker-{index}",
        )
        process.start()
        child_end.close()
        self.workers[index] = _Worker(index, process, parent_end, time.monotonic())

    def _signal(self, signum: int) -> None:
        if signum == signal.SIGHUP:
            log.info("SIGHUP: every worker reloads", extra={"event": "sighup"})
            for w in self.workers.values():
                if w.process.pid is not None:
                    os.kill(w.process.pid, signal.SIGHUP)
        elif not self.stopping:
            self._stop_all(f"{signal.Signals(signum).name}: stopping")

    def _stop_all(self, reason: str) -> None:
        """Close the port (new connections are refused from now on), then ask every worker to
        finish what it has and exit."""
        log.info(reason, extra={"event": "workers_stopping"})
        self.stopping = True
        self.restart_at.clear()
        self.listeners.close()
        for w in self.workers.values():
            if w.process.pid is not None and w.process.exitcode is None:
                os.kill(w.process.pid, signal.SIGTERM)

    def _send(self, index: int, message: tuple[Any, ...]) -> None:
        worker = self.workers.get(index)
        if worker is not None:
            with contextlib.suppress(OSError):  # it is exiting: its sentinel will say so
                worker.conn.send(message)

    def _receive(self, worker: _Worker) -> bool:
        """Handle one message; False when the worker's end is closed."""
        try:
            kind, *args = worker.conn.recv()
        except (EOFError, OSError):  # it is exiting: its sentinel will say so
            return False
        if kind == "state":
            (state,) = args
            self.states[worker.index] = state
            if self.settings.model_repository is None and state["models"]:
                self.serving = Path(state["models"][0]["path"])
            self._broadcast_states()
        elif kind == "broadcast":
            request_id, action = args
            if action.kind == "unload":
                self.unloaded.add(action.arg)
            elif action.kind == "load":
                self.unloaded.discard(action.arg)
            others = {i for i in self.workers if i != worker.index}
            pending = _Broadcast(worker.index, request_id, others)
            self.broadcasts[(worker.index, request_id)] = pending
            for i in others:
                self._send(i, ("apply", (worker.index, request_id), action))
            self._finish(pending)
        elif kind == "applied":
            key, error = args
            waiting = self.broadcasts.get(key)
            if waiting is not None:
                waiting.waiting.discard(worker.index)
                if error is not None:
                    waiting.failed[worker.index] = error
                self._finish(waiting)
        elif kind == "fatal":
            (worker.fatal,) = args
        return True

    def _finish(self, pending: _Broadcast) -> None:
        if not pending.waiting:
            del self.broadcasts[(pending.requester, pending.request_id)]
            self._send(pending.requester, ("done", pending.request_id, pending.failed))

    def _broadcast_states(self) -> None:
        for index in self.workers:
            self._send(index, ("states", self.states))

    def _exited(self, worker: _Worker) -> None:
        # Its last words first: why it could not serve, if that is why it exited.
        while worker.conn.poll() and self._receive(worker):
            pass
        worker.process.join()
        code = worker.process.exitcode
        del self.workers[worker.index]
        worker.conn.close()
        self.states.pop(worker.index, None)
        self.share.forget(worker.index)
        if worker.process.pid is not None:
            _forget_live_gauges(worker.process.pid)
        for pending in list(self.broadcasts.values()):
            if pending.requester == worker.index:
                del self.broadcasts[(pending.requester, pending.request_id)]
            elif worker.index in pending.waiting:  # its replacement starts from the change
                pending.waiting.discard(worker.index)
                self._finish(pending)
        if self.stopping:
            return
        if worker.fatal is not None or code == FATAL_EXIT:
            reason = worker.fatal or "a worker could not start (its log says why)"
            log.critical(f"cannot serve: {reason}", extra={"event": "worker_fatal"})
            self.status = FATAL_EXIT
            self._stop_all("a worker cannot serve: stopping")
            return
        log.error(
            "worker exited; restarting it",
            extra={"event": "worker_exited", "worker": worker.index, "code": code},
        )
        self.listeners.renew(worker.index)
        soon = time.monotonic() - worker.started < _RESTART_BACKOFF_S
        self.restart_at[worker.index] = time.monotonic() + (_RESTART_BACKOFF_S if soon else 0)
        self._broadcast_states()


def _forget_live_gauges(pid: int) -> None:
    """A dead worker's gauges (requests in progress, queue depth) leave the sums."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid)


def run_worker(
    settings: Settings,
    sock: socket.socket,
    conn: Connection,
    index: int,
    model_path: Path,
    unloaded: list[str],
    slots: MutableSequence[float],
) -> None:
    """One worker process: a whole server on `sock` (see the module docstring), serving
    `model_path` (one-file mode) or the repository without the models in `unloaded`; `slots`
    is the supervisor's CpuShare array."""
    import uvicorn

    from mmoe.service.app import create_app, uvicorn_config
    from mmoe.service.logs import configure_logging

    configure_logging(settings.log_level, worker=index)
    link = WorkerLink(conn, index, settings.workers)
    share = CpuShare.for_worker(slots, index)
    app = create_app(settings, link=link, share=share, model_path=model_path, unloaded=unloaded)
    server = uvicorn.Server(uvicorn_config(app, settings))
    server.run(sockets=[sock])
    if not server.started:  # its start failed (and it told the supervisor why)
        raise SystemExit(FATAL_EXIT)


class WorkerLink:
    """A worker's line to the supervisor and, through it, to its sibling workers."""

    def __init__(self, conn: Connection, index: int, count: int) -> None:
        self.conn = conn
        self.index = index
        self.count = count
        self.states: dict[int, WorkerState] = {}
        self._ids = itertools.count()
        self._waiting: dict[int, asyncio.Future[dict[int, str]]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._apply: Callable[[Action], Awaitable[str | None]] | None = None

    def attach(self, apply: Callable[[Action], Awaitable[str | None]]) -> None:
        """Start taking the supervisor's messages on the running loop; `apply(action)` makes
        here a change a sibling has made, returning None or why it failed."""
        self._loop = asyncio.get_running_loop()
        self._apply = apply
        self._loop.add_reader(self.conn.fileno(), self._receive)

    def detach(self) -> None:
        with contextlib.suppress(ValueError, OSError):
            self._loop.remove_reader(self.conn.fileno())

    def report(self, state: WorkerState) -> None:
        with contextlib.suppress(OSError):
            self.conn.send(("state", state))

    def fatal(self, reason: str) -> None:
        """Tell the supervisor that this worker cannot serve and must not be restarted."""
        with contextlib.suppress(OSError):
            self.conn.send(("fatal", reason))

    async def broadcast(self, action: Action) -> dict[int, str]:
        """Have every other worker make the change `action` (this one has); returns, by
        worker, why one failed."""
        request_id = next(self._ids)
        future = self._loop.create_future()
        self._waiting[request_id] = future
        try:
            self.conn.send(("broadcast", request_id, action))
            return await future
        finally:
            self._waiting.pop(request_id, None)

    def ready(self) -> tuple[bool, str]:
        """Whether every worker is ready, and if not, why."""
        for index in range(self.count):
            state = self.states.get(index)
            if state is None:
                return False, f"worker {index} of {self.count} is starting"
            if not state["ready"]:
                return False, f"worker {index} of {self.count}: {state['reason']}"
        return True, ""

    def models(self) -> list[dict[str, str]]:
        """The models the workers serve, each once."""
        seen = {tuple(sorted(m.items())) for s in self.states.values() for m in s["models"]}
        return [dict(m) for m in sorted(seen)]

    def _receive(self) -> None:
        try:
            while self.conn.poll():
                kind, *args = self.conn.recv()
                if kind == "states":
                    (self.states,) = args
                elif kind == "done":
                    request_id, failed = args
                    future = self._waiting.get(request_id)
                    if future is not None and not future.done():
                        future.set_result(failed)
                elif kind == "apply":
                    key, action = args
                    task = self._loop.create_task(self._apply_for_sibling(key, action))
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)
        except (EOFError, OSError):  # the supervisor is gone: stop too, draining what is here
            self.detach()
            log.error("supervisor gone: stopping", extra={"event": "supervisor_gone"})
            signal.raise_signal(signal.SIGTERM)

    async def _apply_for_sibling(self, key: Any, action: Action) -> None:
        assert self._apply is not None
        error = await self._apply(action)
        with contextlib.suppress(OSError):
            self.conn.send(("applied", key, error))
