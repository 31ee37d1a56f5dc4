"""Closed-loop load generators: `concurrency` connections, each sending the next request as soon
as the previous answer is in, for a fixed time, over HTTP/1.1 keep-alive on loopback.

Two implementations with one result type:
- `wrk` (C, with a Lua script rotating the bodies): the usual tool, used when it is on PATH
  (Debian/Ubuntu: `apt-get install wrk`).
- a built-in asyncio client (uvloop when installed): raw asyncio Protocols writing pre-built
  request bytes and parsing only the status line and Content-Length. On loopback it costs about
  the same client CPU per request as wrk (~0.1 ms, most of it in the kernel) and needs nothing
  beyond the Python standard library.

On a small machine the generator competes with the server for the same cores, so each run also
reports the generator's own CPU time.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

WindowHook = Callable[[str], None]


@dataclass
class LoadResult:
    client: str
    concurrency: int
    seconds: float  # measured window
    requests: int  # completed with 2xx within the window
    errors: int  # non-2xx answers, timeouts, connection errors
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    client_cpu_s: float  # the generator's own user + system CPU during the run
    error_kinds: dict[str, int] = field(default_factory=dict)

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, object]:
        return asdict(self) | {"rps": self.rps}


def http_request(path: str, body: bytes, port: int, headers: dict[str, str] | None = None) -> bytes:
    """A POST of `body` (JSON unless `headers` give another Content-Type)."""
    fields = {"Content-Type": "application/json", **(headers or {})}
    extra = "".join(f"{k}: {v}\r\n" for k, v in fields.items())
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"{extra}Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def wrk_available() -> bool:
    return shutil.which("wrk") is not None


def run_load(
    client: str,
    port: int,
    path: str,
    bodies: list[bytes],
    concurrency: int,
    seconds: float,
    warmup: float,
    timeout: float = 30.0,
    settle: Callable[[], None] | None = None,
    on_window: WindowHook | None = None,
) -> LoadResult:
    """Warm up for `warmup` seconds (not measured), then measure for `seconds`.

    `on_window("start")` and `on_window("end")` are called as the measured window opens and
    closes (to read the server's CPU time over exactly that window). wrk runs the warm-up as a
    separate run and leaves its last requests unanswered when it stops; `settle` is called in
    between to let the server finish them. The asyncio client keeps its connections and waits
    for every answer itself.
    """
    hook = on_window or (lambda _: None)
    if client == "wrk":
        if warmup > 0:
            _wrk(port, path, bodies, concurrency, warmup, timeout)
            if settle is not None:
                settle()
        hook("start")
        try:
            return _wrk(port, path, bodies, concurrency, seconds, timeout)
        finally:
            hook("end")
    return _python(port, path, bodies, concurrency, seconds, warmup, timeout, hook)


# ---------------------------------------------------------------------------------- asyncio


@dataclass
class ResponseHead:
    """The head of the HTTP/1.1 response at the start of a buffer."""

    status: int
    head: bytes  # lower-cased, without the blank line
    body_at: int
    end: int  # where the response ends; -1: no Content-Length (the servers here always send it)


def response_head(buf: bytearray) -> ResponseHead | None:
    """None until the whole head has arrived."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return None
    head = bytes(buf[:end]).lower()
    at = head.find(b"content-length:")
    if at < 0:
        return ResponseHead(int(head[9:12]), head, end + 4, -1)
    stop = head.find(b"\r\n", at)
    length = int(head[at + 15 : stop if stop > 0 else len(head)])
    return ResponseHead(int(head[9:12]), head, end + 4, end + 4 + length)


class _Connection(asyncio.Protocol):
    """One keep-alive connection in the closed loop."""

    def __init__(self, run: _PythonRun) -> None:
        self.run = run
        self.transport: Any = None  # uvloop's transports are not asyncio.Transport subclasses
        self.buf = bytearray()
        self.need = -1
        self.status = 0
        self.sent_ns = 0
        self.closed = run.loop.create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.send()

    def send(self) -> None:
        run = self.run
        if time.perf_counter_ns() >= run.end_ns:
            self.transport.close()
            return
        run.next = (run.next + 1) % len(run.requests)
        self.buf.clear()
        self.need = -1
        self.sent_ns = time.perf_counter_ns()
        self.transport.write(run.requests[run.next])

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.need < 0:
            got = response_head(self.buf)
            if got is None:
                return
            self.status = got.status
            if got.end < 0:  # every server here sends Content-Length; anything else is an error
                self.run.record(self.sent_ns, 0, "protocol")
                self.transport.close()
                return
            self.need = got.end
        if len(self.buf) >= self.need:
            self.run.record(self.sent_ns, self.status, "status" if self.status >= 300 else "")
            self.send()

    def connection_lost(self, exc: Exception | None) -> None:
        if (self.need >= 0 and len(self.buf) < self.need) or (self.need < 0 and self.buf):
            self.run.record(self.sent_ns, 0, "read")
        if not self.closed.done():
            self.closed.set_result(None)


class _PythonRun:
    def __init__(self, requests: list[bytes], start_ns: int, end_ns: int) -> None:
        self.loop = asyncio.get_running_loop()
        self.requests = requests
        self.next = -1
        self.start_ns = start_ns
        self.end_ns = end_ns
        self.latencies: list[int] = []
        self.errors: dict[str, int] = {}

    def record(self, sent_ns: int, status: int, error: str) -> None:
        now = time.perf_counter_ns()
        if not self.start_ns <= now <= self.end_ns:
            return  # answered during the warm-up, or after the window (as wrk counts)
        if error:
            self.errors[error] = self.errors.get(error, 0) + 1
        else:
            self.latencies.append(now - sent_ns)


async def _python_async(
    port: int,
    requests: list[bytes],
    concurrency: int,
    seconds: float,
    warmup: float,
    timeout: float,
    hook: WindowHook,
) -> tuple[_PythonRun, float]:
    t0 = time.perf_counter_ns()
    start = t0 + int(warmup * 1e9)
    run = _PythonRun(requests, start, start + int(seconds * 1e9))
    loop = asyncio.get_running_loop()
    loop.call_later(warmup, hook, "start")
    loop.call_later(warmup + seconds, hook, "end")
    conns: list[_Connection] = []
    for _ in range(concurrency):
        try:
            _, proto = await loop.create_connection(lambda: _Connection(run), "127.0.0.1", port)
            conns.append(proto)
        except OSError:
            run.errors["connect"] = run.errors.get("connect", 0) + 1
    try:
        await asyncio.wait_for(
            asyncio.gather(*(c.closed for c in conns)), warmup + seconds + timeout
        )
    except TimeoutError:
        run.errors["timeout"] = sum(1 for c in conns if not c.closed.done())
        for c in conns:
            if c.transport is not None:
                c.transport.abort()
    return run, seconds


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop

        return uvloop.new_event_loop()
    except ImportError:
        return asyncio.new_event_loop()


def _python(
    port: int,
    path: str,
    bodies: list[bytes],
    concurrency: int,
    seconds: float,
    warmup: float,
    timeout: float,
    hook: WindowHook,
) -> LoadResult:
    requests = [http_request(path, b, port) for b in bodies]
    return run_requests(port, requests, concurrency, seconds, warmup, timeout, hook)


def run_requests(
    port: int,
    requests: list[bytes],
    concurrency: int,
    seconds: float,
    warmup: float,
    timeout: float = 30.0,
    on_window: WindowHook | None = None,
) -> LoadResult:
    """The built-in client on ready-made HTTP/1.1 requests (http_request), rotated: as
    run_load's, for requests that are not JSON posts."""
    hook = on_window or (lambda _: None)
    cpu: dict[str, float] = {}

    def window(edge: str) -> None:
        cpu[edge] = time.process_time()  # this process's CPU: the client's own
        hook(edge)

    loop = _new_loop()
    try:
        run, seconds = loop.run_until_complete(
            _python_async(port, requests, concurrency, seconds, warmup, timeout, window)
        )
    finally:
        loop.close()
    lat = np.asarray(run.latencies, dtype=np.float64) / 1e6
    client_cpu = cpu.get("end", 0.0) - cpu.get("start", 0.0)
    return load_result("python", concurrency, seconds, lat, run.errors, client_cpu)


def load_result(
    client: str,
    concurrency: int,
    seconds: float,
    lat_ms: np.ndarray,
    errors: dict[str, int],
    cpu: float,
) -> LoadResult:
    """Percentiles and counts of one measured window (latencies in ms)."""
    if len(lat_ms):
        p50, p90, p99 = np.percentile(lat_ms, [50, 90, 99])
        mean = float(lat_ms.mean())
    else:
        p50 = p90 = p99 = mean = float("nan")
    return LoadResult(
        client,
        concurrency,
        seconds,
        len(lat_ms),
        sum(errors.values()),
        float(p50),
        float(p90),
        float(p99),
        mean,
        cpu,
        dict(errors),
    )


# --------------------------------------------------------------------------------------- wrk

_WRK_SCRIPT = r"""
local requests = {}
local n = 0
local i = 0

function init(args)
  for _, p in ipairs(args) do
    local f = assert(io.open(p, "rb"))
    local body = f:read("*a")
    f:close()
    n = n + 1
    requests[n] = wrk.format("POST", wrk.path, {["Content-Type"] = "application/json"}, body)
  end
end

function request()
  i = i % n + 1
  return requests[i]
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_RESULT {"requests": %d, "duration_us": %d, "connect": %d, "read": %d, ' ..
    '"write": %d, "status": %d, "timeout": %d, "p50": %d, "p90": %d, "p99": %d, "mean": %f}\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.mean))
end
"""


def _wrk(
    port: int, path: str, bodies: list[bytes], concurrency: int, seconds: float, timeout: float
) -> LoadResult:
    with tempfile.TemporaryDirectory(prefix="bench-wrk-") as tmp:
        script = Path(tmp) / "bodies.lua"
        script.write_text(_WRK_SCRIPT)
        files = []
        for k, body in enumerate(bodies):
            p = Path(tmp) / f"body{k}.json"
            p.write_bytes(body)
            files.append(str(p))
        argv = ["wrk", "-t1", f"-c{concurrency}", f"-d{max(1, round(seconds))}s"]
        argv += [f"--timeout={max(1, round(timeout))}s", "-s", str(script)]
        argv += [f"http://127.0.0.1:{port}{path}", "--", *files]
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        assert proc.stdout is not None
        out = proc.stdout.read().decode(errors="replace")
        _, code, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(code)
    line = next((x for x in out.splitlines() if x.startswith("BENCH_RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {out[-2000:]}")
    r = json.loads(line.removeprefix("BENCH_RESULT "))
    errors = {k: int(r[k]) for k in ("connect", "read", "write", "status", "timeout") if r[k]}
    window = r["duration_us"] / 1e6
    ok = int(r["requests"]) - errors.get("status", 0)
    return LoadResult(
        "wrk",
        concurrency,
        window,
        ok,
        sum(errors.values()),
        r["p50"] / 1000,
        r["p90"] / 1000,
        r["p99"] / 1000,
        r["mean"] / 1000,
        usage.ru_utime + usage.ru_stime,
        errors,
    )
