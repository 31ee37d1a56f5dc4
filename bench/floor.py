"""What no server can beat: onnxruntime `run()` in this process on ready-made arrays (the
floor), and the time to parse a request body (JSON decode).

A floor's throughput limit is the best of two ways to use the machine's cores: all of them on
one run at a time (the fastest session setting), or one thread per run with a run on every core
at once. Its latency is the fastest single run.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import orjson

from mmoe.contract.metadata import read_metadata
from mmoe.service.payload import RequestDecoder
from mmoe.service.settings import usable_cpus


def median_seconds(
    fn: Callable[[], object],
    budget_s: float,
    min_calls: int = 5,
    clock: Callable[[], float] = time.perf_counter,
) -> float:
    """Median time of one call by `clock` (wall time unless told), calling `fn` for about
    `budget_s` seconds after one warm-up."""
    fn()
    times: list[float] = []
    end = time.perf_counter() + budget_s
    while len(times) < min_calls or time.perf_counter() < end:
        t0 = clock()
        fn()
        times.append(clock() - t0)
    return float(np.median(times))


def calls_per_second(fn: Callable[[], object], threads: int, budget_s: float) -> float:
    """Calls of `fn` per second with `threads` threads calling it at once, for `budget_s`."""
    counts = [0] * threads
    window = [0.0, 0.0]  # start, end: set once every thread has warmed up

    def open_window() -> None:
        window[0] = time.perf_counter()
        window[1] = window[0] + budget_s

    start = threading.Barrier(threads, action=open_window)

    def loop(k: int) -> None:
        fn()  # warm-up
        start.wait()
        while time.perf_counter() < window[1]:
            fn()
            counts[k] += 1

    workers = [threading.Thread(target=loop, args=(k,)) for k in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return sum(counts) / (time.perf_counter() - window[0])


# One run at a time: the fastest of these session settings (threads 0: all cores). With one
# thread there is no pool to spin.
SESSION_SETTINGS = [(0, True), (0, False), (1, False)]  # (intra-op threads, spinning)


def session(model: Path, threads: int, spinning: bool) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    return ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"])


@dataclass
class FloorPoint:
    rows: int
    run_ms: float  # onnxruntime run(), median, with the fastest of SESSION_SETTINGS
    rows_per_s: float  # one run at a time, with that setting
    parallel_rows_per_s: float  # one 1-thread run on every core at once
    json_ms: float  # orjson.loads of the body: the least any JSON server must do
    decode_ms: float  # the service's body -> arrays (msgspec + numpy)
    body_bytes: int
    settings: str  # which session settings were fastest
    by_settings: dict[str, float]  # run() ms for each

    @property
    def limit_rows_per_s(self) -> float:
        """The throughput limit: the better of one run at a time and a run on every core."""
        return max(self.rows_per_s, self.parallel_rows_per_s)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"limit_rows_per_s": self.limit_rows_per_s}

    @classmethod
    def of(
        cls,
        rows: int,
        by: dict[str, float],
        parallel_rows_per_s: float,
        json_ms: float,
        decode_ms: float,
        body_bytes: int,
    ) -> FloorPoint:
        """The point for run() times `by` session settings: the fastest of them is the floor."""
        best = min(by, key=by.__getitem__)
        return cls(
            rows,
            by[best],
            rows / by[best] * 1e3,
            parallel_rows_per_s,
            json_ms,
            decode_ms,
            body_bytes,
            best,
            by,
        )

    def mean(self, other: FloorPoint) -> FloorPoint:
        """The two measurements of the same body averaged (the fastest setting on average)."""
        return FloorPoint.of(
            self.rows,
            {k: (v + other.by_settings[k]) / 2 for k, v in self.by_settings.items()},
            (self.parallel_rows_per_s + other.parallel_rows_per_s) / 2,
            (self.json_ms + other.json_ms) / 2,
            (self.decode_ms + other.decode_ms) / 2,
            self.body_bytes,
        )


def _label(threads: int, spinning: bool) -> str:
    threads_text = "1 thread" if threads == 1 else f"{threads or 'all'} threads"
    return f"{threads_text}, spinning {'on' if spinning else 'off'}"


class Floor:
    """onnxruntime sessions of one graph with each of SESSION_SETTINGS, kept open so that the
    floor can be measured again next to every server measurement (the machine's speed
    moves)."""

    def __init__(self, model: Path) -> None:
        self.sessions = {_label(t, s): session(model, t, s) for t, s in SESSION_SETTINGS}
        self.one_thread = self.sessions[_label(1, False)]
        first = next(iter(self.sessions.values()))
        meta = read_metadata(first.get_modelmeta().custom_metadata_map)
        self.decoder = RequestDecoder(meta, 1 << 20)
        self.outputs = [o.name for o in first.get_outputs()]
        self.cores = usable_cpus()

    def point(self, body: bytes, budget_s: float) -> FloorPoint:
        """The body decoded as the service decodes it, then run() with each setting, and
        1-thread runs on every core at once."""
        decoded = self.decoder.decode(body)
        by = {
            label: 1e3 * median_seconds(partial(sess.run, self.outputs, decoded.feeds), budget_s)
            for label, sess in self.sessions.items()
        }
        run = partial(self.one_thread.run, self.outputs, decoded.feeds)
        parallel = decoded.n * calls_per_second(run, self.cores, budget_s)
        json_s = median_seconds(partial(orjson.loads, body), budget_s / 4)
        decode_s = median_seconds(partial(self.decoder.decode, body), budget_s / 4)
        return FloorPoint.of(decoded.n, by, parallel, json_s * 1e3, decode_s * 1e3, len(body))
