"""What no server can beat: onnxruntime `run()` in this process on ready-made arrays (the
floor), and the time to parse a request body (JSON decode)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import orjson

from service.payload import RequestDecoder
from service.predictor import Predictor


def median_seconds(fn: Callable[[], object], budget_s: float, min_calls: int = 5) -> float:
    """Median time of one call, calling `fn` for about `budget_s` seconds after one warm-up."""
    fn()
    times = []
    end = time.perf_counter() + budget_s
    while len(times) < min_calls or time.perf_counter() < end:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


@dataclass
class FloorPoint:
    rows: int
    run_ms: float  # onnxruntime run(), median
    rows_per_s: float
    json_ms: float  # orjson.loads of the body: the least any JSON server must do
    decode_ms: float  # the service's body -> arrays (msgspec + numpy)
    body_bytes: int

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def measure_floor(
    model: Path,
    bodies: dict[int, bytes],
    budget_s: float,
    intra_op_threads: int = 0,
) -> list[FloorPoint]:
    """One point per body size. The session is built as the service builds it (same options)."""
    predictor = Predictor(model, provider="cpu", intra_op_threads=intra_op_threads)
    decoder = RequestDecoder(predictor.meta, max_rows=1 << 20)
    session, outputs = predictor.session, predictor.outputs
    points = []
    for rows, body in sorted(bodies.items()):
        feeds = decoder.decode(body).feeds
        run_s = median_seconds(lambda f=feeds: session.run(outputs, f), budget_s)
        json_s = median_seconds(lambda b=body: orjson.loads(b), budget_s / 4)
        decode_s = median_seconds(lambda b=body: decoder.decode(b), budget_s / 4)
        points.append(
            FloorPoint(rows, run_s * 1e3, rows / run_s, json_s * 1e3, decode_s * 1e3, len(body))
        )
    return points
