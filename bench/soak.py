"""Soak: mixed valid and invalid traffic against one server for a bounded time, then a report of
what came back and what the server's memory did.

    python -m mmoe.bench.soak --model models/demo.onnx --duration 600 --concurrency 32
    python -m mmoe.bench.soak --url http://127.0.0.1:8000 --pid 1234 --duration 60

It starts its own server on a loopback port (or targets `--url`, which must be loopback), builds
its requests from the model's GET /metadata, and keeps `concurrency` keep-alive connections
busy (closed loop) until `--duration` seconds or `--max-requests` answers. Each request has an
expected answer: valid ones 200, invalid ones their 4xx. Anything else is an error, by kind; a
503 with Retry-After on a scoring request is a deliberate shed and counted apart. RSS comes from
/proc/<pid>/status: before the traffic, after the warm-up (the baseline) and at the end.
The goal: no errors besides sheds, and RSS growth under 5% over ten minutes.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import random
import sys
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import orjson

from mmoe.bench.load import response_head
from mmoe.bench.server import ServerProc, process_usage


@dataclass(frozen=True)
class Request:
    kind: str
    raw: bytes  # the whole HTTP/1.1 request
    expect: int  # the status a correct server answers
    sheddable: bool  # may be answered 503 + Retry-After under load


def http(method: str, path: str, body: bytes = b"", ctype: str = "application/json") -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nhost: 127.0.0.1\r\n"
    if method == "POST":
        head += f"content-type: {ctype}\r\ncontent-length: {len(body)}\r\n"
    return head.encode() + b"\r\n" + body


# ------------------------------------------------------------------------------ requests


def _ids(rng: random.Random, name: str, n: int) -> list[Any]:
    # Mostly strings, some integers; many will be unknown to the model (the OOV bucket).
    return [
        f"{name[:3]}{rng.randrange(3000)}" if rng.random() < 0.9 else rng.randrange(3000)
        for _ in range(n)
    ]


def _column(rng: random.Random, f: dict[str, Any], n: int) -> list[Any]:
    if f["kind"] == "numeric":
        return [
            None if f["default"] is not None and rng.random() < 0.05 else rng.uniform(0, 100)
            for _ in range(n)
        ]
    if f["kind"] == "tags":
        return [_ids(rng, f["name"], rng.randrange(f["max_len"] + 1)) for _ in range(n)]
    return _ids(rng, f["name"], n)


def _columnar(
    rng: random.Random, features: list[dict[str, Any]], n: int, split: bool = True
) -> dict[str, Any]:
    """A columnar body. With `split`, a random split of the features between `context` and
    `candidates`: a feature the model declares context goes in `context` most of the time, any
    other now and then (one value for every candidate); without, every feature is a column.
    A feature with a default is sometimes left out."""
    body: dict[str, Any] = {"candidates": {}}
    context: dict[str, Any] = {}
    for f in features:
        if not f["required"] and rng.random() < 0.2:
            continue
        if split and rng.random() < (0.7 if f.get("context") else 0.1):
            context[f["name"]] = _column(rng, f, 1)[0]
        else:
            body["candidates"][f["name"]] = _column(rng, f, n)
    if not body["candidates"] and context:  # a column says how many candidates there are
        name = next(iter(context))
        body["candidates"][name] = [context.pop(name)] * n
    if context:
        body["context"] = context
    return body


def _kserve(rng: random.Random, features: list[dict[str, Any]], n: int) -> dict[str, Any]:
    """A V2 infer body; each context input has one row or n, drawn on its own."""
    inputs = []
    for f in features:
        rows = 1 if f.get("context") and rng.random() < 0.5 else n
        if f["kind"] == "numeric":
            inputs.append(
                {
                    "name": f["name"],
                    "shape": [rows],
                    "datatype": "FP32",
                    "data": [rng.uniform(0, 100) for _ in range(rows)],
                }
            )
        elif f["kind"] == "tags":
            cells = [
                (_ids(rng, "t", rng.randrange(f["max_len"] + 1)) + [""] * f["max_len"])[
                    : f["max_len"]
                ]
                for _ in range(rows)
            ]
            inputs.append(
                {
                    "name": f["name"],
                    "shape": [rows, f["max_len"]],
                    "datatype": "BYTES",
                    "data": [str(t) for row in cells for t in row],
                }
            )
        else:
            inputs.append(
                {
                    "name": f["name"],
                    "shape": [rows],
                    "datatype": "BYTES",
                    "data": [str(v) for v in _ids(rng, f["name"], rows)],
                }
            )
    return {"inputs": inputs}


def build_requests(meta: dict[str, Any], seed: int = 0) -> tuple[list[Request], list[Request]]:
    """(valid, invalid) requests for the model `meta` (GET /metadata) describes."""
    rng = random.Random(seed)
    features = meta["features"]
    model = meta["model"]["name"]
    max_rows = meta["batching"]["max_batch_rows"]
    predict = "/predict"
    infer = f"/v2/models/{model}/infer"
    dumps = orjson.dumps

    valid = [
        Request(
            f"predict-{n}", http("POST", predict, dumps(_columnar(rng, features, n))), 200, True
        )
        for n in (1, 8, 32, 64, 128, 256)
        for _ in range(8)
    ]
    for _ in range(8):
        cols = _columnar(rng, features, 16)
        rows = [dict(cols.get("context", {})) for _ in range(16)]
        for name, values in cols["candidates"].items():
            for row, v in zip(rows, values, strict=True):
                row[name] = v
        valid.append(
            Request("predict-rows", http("POST", predict, dumps({"instances": rows})), 200, True)
        )
    valid += [
        Request("kserve-32", http("POST", infer, dumps(_kserve(rng, features, 32))), 200, True)
        for _ in range(8)
    ]
    valid += [
        Request("readyz", http("GET", "/readyz"), 200, False),
        Request("metadata", http("GET", "/metadata"), 200, False),
    ]

    # Each invalid body is a valid one with one thing wrong.
    first = features[0]["name"]
    cols = {first: _ids(rng, first, 8), **_columnar(rng, features, 8, split=False)["candidates"]}
    good = dumps({"candidates": cols})
    ragged = {k: (v[:-1] if i == 0 else v) for i, (k, v) in enumerate(cols.items())}
    numeric = next((f["name"] for f in features if f["kind"] == "numeric"), None)
    too_many = _columnar(rng, [f for f in features if f["required"]], max_rows + 1, split=False)
    bad_shape = _kserve(rng, features, 4)
    bad_shape["inputs"][0]["shape"] = [5]
    invalid = [
        Request("truncated-json", http("POST", predict, good[: len(good) // 2]), 400, False),
        Request("empty-body", http("POST", predict, b""), 400, False),
        Request(
            "unknown-feature",
            http("POST", predict, dumps({"candidates": {**cols, "no_such_feature": [1] * 8}})),
            422,
            False,
        ),
        Request(
            "float-ids",
            http("POST", predict, dumps({"candidates": {**cols, first: [1.5] * 8}})),
            422,
            False,
        ),
        Request("ragged-columns", http("POST", predict, dumps({"candidates": ragged})), 422, False),
        Request(
            "duplicate-key",
            http(
                "POST",
                predict,
                good.replace(b'{"candidates":{', b'{"candidates":{"%s":[],' % first.encode(), 1),
            ),
            422,
            False,
        ),
        Request("too-many-rows", http("POST", predict, dumps(too_many)), 413, False),
        Request("text-plain", http("POST", predict, good, "text/plain"), 415, False),
        Request("kserve-bad-shape", http("POST", infer, dumps(bad_shape)), 422, False),
        Request("unknown-model", http("POST", "/v2/models/nope/infer", b"{}"), 404, False),
    ]
    if numeric is not None:
        body = dumps({"candidates": {**cols, numeric: [0.0] * 8}})
        nan = body.replace(b'"%s":[0.0' % numeric.encode(), b'"%s":[NaN' % numeric.encode())
        invalid.append(Request("nan-literal", http("POST", predict, nan), 400, False))
    return valid, invalid


# ---------------------------------------------------------------------------------- client


@dataclass
class Tally:
    requests: int = 0
    by_kind: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    sheds: Counter[str] = field(default_factory=Counter)
    ok_ms: list[float] = field(default_factory=list)  # answers to valid requests, 200
    all_ms: list[float] = field(default_factory=list)

    def record(
        self, req: Request, status: int, retry_after: bool, body: bytes, seconds: float
    ) -> None:
        self.requests += 1
        self.by_kind[req.kind] += 1
        self.all_ms.append(seconds * 1000)
        if status == req.expect:
            if status == 200:
                self.ok_ms.append(seconds * 1000)
            return
        if status == 503 and retry_after and req.sheddable:
            self.sheds[_error_code(body)] += 1
            return
        self.errors[f"{req.kind}: got {status}, expected {req.expect}"] += 1

    def fail(self, req: Request | None, what: str) -> None:
        self.errors[f"{req.kind if req else 'connection'}: {what}"] += 1


def _error_code(body: bytes) -> str:
    """The error's code (KServe V2 errors have only a message: its first words)."""
    try:
        error = orjson.loads(body)["error"]
        return str(error["code"]) if isinstance(error, dict) else error.split(",")[0]
    except (ValueError, KeyError, TypeError, AttributeError):
        return "unparsable"


class _Connection(asyncio.Protocol):
    """One keep-alive connection of the closed loop: send, read the answer, send the next."""

    def __init__(self, soak: Soak) -> None:
        self.soak = soak
        self.transport: Any = None
        self.buf = bytearray()
        self.need = -1
        self.status = 0
        self.close_after = False
        self.retry_after = False
        self.req: Request | None = None
        self.sent = 0.0
        self.timer: asyncio.TimerHandle | None = None
        self.closed = soak.loop.create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.send()

    def send(self) -> None:
        self.req = self.soak.next_request()
        if self.req is None:
            self.transport.close()
            return
        self.buf.clear()
        self.need = -1
        self.sent = time.perf_counter()
        self.timer = self.soak.loop.call_later(self.soak.timeout_s, self.timed_out)
        self.transport.write(self.req.raw)

    def timed_out(self) -> None:
        self.soak.tally.fail(self.req, f"no answer within {self.soak.timeout_s:g} s")
        self.req = None
        self.transport.abort()

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.need < 0:
            got = response_head(self.buf)
            if got is None:
                return
            self.status = got.status
            self.close_after = b"\r\nconnection: close" in got.head
            self.retry_after = b"\r\nretry-after:" in got.head
            if got.end < 0:
                self.soak.tally.fail(self.req, "answer without content-length")
                self.req = None
                self.transport.close()
                return
            self.need, self.body_at = got.end, got.body_at
        if len(self.buf) >= self.need and self.req is not None:
            assert self.timer is not None
            self.timer.cancel()
            body = bytes(self.buf[self.body_at : self.need])
            elapsed = time.perf_counter() - self.sent
            self.soak.tally.record(self.req, self.status, self.retry_after, body, elapsed)
            self.req = None
            if self.close_after:  # the server ends the connection; the slot reconnects
                self.transport.close()
            else:
                self.send()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
        if self.req is not None:  # the connection died with a request unanswered
            self.soak.tally.fail(self.req, "connection closed before the answer")
        if not self.closed.done():
            self.closed.set_result(None)


class Soak:
    def __init__(
        self,
        port: int,
        valid: list[Request],
        invalid: list[Request],
        invalid_fraction: float,
        seconds: float,
        max_requests: int,
        timeout_s: float,
        seed: int,
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.port = port
        self.valid = valid
        self.invalid = invalid
        self.invalid_fraction = invalid_fraction
        self.deadline = time.perf_counter() + seconds
        self.max_requests = max_requests
        self.timeout_s = timeout_s
        self.rng = random.Random(seed)
        self.sent = 0
        self.tally = Tally()

    def next_request(self) -> Request | None:
        if self.sent >= self.max_requests or time.perf_counter() >= self.deadline:
            return None
        self.sent += 1
        pool = self.invalid if self.rng.random() < self.invalid_fraction else self.valid
        return pool[self.rng.randrange(len(pool))]

    async def slot(self) -> None:
        """One closed-loop client: a connection, reopened whenever the server closes it."""
        while self.next_request_possible():
            try:
                _, conn = await self.loop.create_connection(
                    lambda: _Connection(self), "127.0.0.1", self.port
                )
            except OSError as err:
                self.tally.fail(None, f"connect: {err.strerror or err}")
                await asyncio.sleep(0.1)
                continue
            await conn.closed

    def next_request_possible(self) -> bool:
        return self.sent < self.max_requests and time.perf_counter() < self.deadline


async def _traffic(soak_args: dict[str, Any], concurrency: int) -> Tally:
    soak = Soak(**soak_args)
    await asyncio.gather(*(soak.slot() for _ in range(concurrency)))
    return soak.tally


def run_traffic(concurrency: int, **soak_args: Any) -> Tally:
    loop: asyncio.AbstractEventLoop
    try:
        import uvloop

        loop = uvloop.new_event_loop()
    except ImportError:
        loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(_traffic(soak_args, concurrency))
    finally:
        loop.close()


# ---------------------------------------------------------------------------------- report


@dataclass
class Report:
    seconds: float
    concurrency: int
    requests: int
    requests_by_kind: dict[str, int]
    errors: int
    errors_by_kind: dict[str, int]
    sheds: int
    sheds_by_code: dict[str, int]
    ok_p50_ms: float
    ok_p99_ms: float
    all_p50_ms: float
    all_p99_ms: float
    rss_before_mb: float | None  # before any traffic
    rss_start_mb: float | None  # after the warm-up: the baseline for growth
    rss_end_mb: float | None
    rss_max_mb: float | None
    rss_growth_pct: float | None
    rss_samples_mb: list[float]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def soak(
    port: int,
    pid: int | None,
    duration_s: float,
    concurrency: int,
    invalid_fraction: float = 0.25,
    max_requests: int = 10**9,
    warmup_s: float | None = None,
    sample_s: float = 10.0,
    timeout_s: float = 30.0,
    seed: int = 0,
    say: Any = print,
) -> Report:
    """Run the traffic against 127.0.0.1:`port` (the server process `pid`, for RSS)."""
    import httpx

    meta = httpx.get(f"http://127.0.0.1:{port}/metadata", timeout=30).json()
    valid, invalid = build_requests(meta, seed)
    warmup_s = min(30.0, duration_s * 0.05) if warmup_s is None else warmup_s

    def rss() -> float | None:
        return process_usage(pid).rss_mb if pid is not None else None

    samples: list[float] = []
    before = rss()
    baseline: list[float | None] = [None]
    stop = [False]

    def sampler() -> None:  # a thread: the event loop is busy with the traffic
        t0 = time.perf_counter()
        next_at = t0 + warmup_s
        while not stop[0]:
            now = time.perf_counter()
            if now >= next_at:
                value = rss()
                if value is not None:
                    samples.append(value)
                    if baseline[0] is None:
                        baseline[0] = value
                    say(f"  {now - t0:7.0f} s  RSS {value:.1f} MB")
                next_at += sample_s
            time.sleep(0.2)

    thread = threading.Thread(target=sampler, daemon=True)
    thread.start()
    t0 = time.perf_counter()
    tally = run_traffic(
        concurrency,
        port=port,
        valid=valid,
        invalid=invalid,
        invalid_fraction=invalid_fraction,
        seconds=duration_s,
        max_requests=max_requests,
        timeout_s=timeout_s,
        seed=seed,
    )
    elapsed = time.perf_counter() - t0
    stop[0] = True
    thread.join()
    end = rss()
    if end is not None:
        samples.append(end)
    start = baseline[0] if baseline[0] is not None else before
    growth = (end - start) / start * 100 if start and end else None
    return Report(
        seconds=round(elapsed, 1),
        concurrency=concurrency,
        requests=tally.requests,
        requests_by_kind=dict(sorted(tally.by_kind.items())),
        errors=sum(tally.errors.values()),
        errors_by_kind=dict(tally.errors.most_common()),
        sheds=sum(tally.sheds.values()),
        sheds_by_code=dict(tally.sheds),
        ok_p50_ms=round(_pct(tally.ok_ms, 50), 2),
        ok_p99_ms=round(_pct(tally.ok_ms, 99), 2),
        all_p50_ms=round(_pct(tally.all_ms, 50), 2),
        all_p99_ms=round(_pct(tally.all_ms, 99), 2),
        rss_before_mb=before,
        rss_start_mb=start,
        rss_end_mb=end,
        rss_max_mb=max(samples) if samples else None,
        rss_growth_pct=round(growth, 2) if growth is not None else None,
        rss_samples_mb=samples,
    )


def _loopback_port(url: str) -> int:
    parts = urlsplit(url)
    host = parts.hostname or ""
    loopback = host == "localhost" or _is_loopback_ip(host)
    if parts.scheme != "http" or not loopback or parts.port is None:
        raise SystemExit(f"--url must be http://<loopback address>:<port>, not {url!r}")
    return parts.port


def _is_loopback_ip(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m mmoe.bench.soak", description=__doc__.split("\n")[0]
    )
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--model", type=Path, help="start a server for this model.onnx")
    where.add_argument("--url", help="a running server on a loopback address")
    p.add_argument("--pid", type=int, help="with --url: the server's pid, for its RSS")
    p.add_argument("--duration", type=float, default=60.0, help="seconds of traffic")
    p.add_argument("--max-requests", type=int, default=10**9, help="stop after this many")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--invalid-fraction", type=float, default=0.25)
    p.add_argument("--warmup", type=float, help="seconds before the RSS baseline (default 5%%)")
    p.add_argument("--sample", type=float, default=10.0, help="seconds between RSS samples")
    p.add_argument("--timeout", type=float, default=30.0, help="per-request timeout, seconds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--server-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="with --model: a MMOE_* setting for the server (repeatable)",
    )
    p.add_argument("--log", type=Path, help="with --model: the server's log file")
    p.add_argument("--json", type=Path, help="also write the report here")
    return p


def _print(report: Report) -> None:
    r = report
    print(f"\n{r.requests} requests in {r.seconds} s at concurrency {r.concurrency}")
    print(f"errors: {r.errors}")
    for kind, count in r.errors_by_kind.items():
        print(f"  {count:8d}  {kind}")
    print(f"sheds (503 + Retry-After): {r.sheds} {r.sheds_by_code or ''}")
    print(f"latency, valid 200s: p50 {r.ok_p50_ms} ms, p99 {r.ok_p99_ms} ms")
    print(f"latency, all answers: p50 {r.all_p50_ms} ms, p99 {r.all_p99_ms} ms")
    print(
        f"RSS: before traffic {r.rss_before_mb} MB, start (after warm-up) {r.rss_start_mb} MB, "
        f"end {r.rss_end_mb} MB, max {r.rss_max_mb} MB, growth {r.rss_growth_pct}%"
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    common: dict[str, Any] = dict(
        duration_s=args.duration,
        concurrency=args.concurrency,
        invalid_fraction=args.invalid_fraction,
        max_requests=args.max_requests,
        warmup_s=args.warmup,
        sample_s=args.sample,
        timeout_s=args.timeout,
        seed=args.seed,
    )
    if args.url:
        report = soak(_loopback_port(args.url), args.pid, **common)
    else:
        env = dict(kv.split("=", 1) for kv in args.server_env)
        server = ServerProc.service(args.model, env, args.log)
        with server:
            report = soak(server.port, server.pid, **common)
            if server.proc is not None and server.proc.poll() is not None:
                print(f"the server exited with {server.proc.returncode}", file=sys.stderr)
                return 1
    _print(report)
    if args.json:
        args.json.write_text(json.dumps(report.to_dict(), indent=2))
    return 0 if report.errors == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
