"""Serving under load: dynamic batching merges concurrent requests into one runtime call and
splits the scores back in order; the queue is bounded (503 + Retry-After); requests time out;
small requests run on the event loop's thread."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from mmoe.service.batching import INLINE_MAX_ROWS, Admission, DirectRunner
from mmoe.service.cpu_share import CpuShare
from mmoe.service.errors import ApiError
from mmoe.service.metrics import ServiceMetrics
from mmoe.service.predictor import Predictor, warmup_feeds
from tests.metrics import scrape, value
from tests.server import ServerProcess


def request_body(i: int, n: int) -> dict[str, Any]:
    """Request i: n candidates unlike those of any other request."""
    return {
        "context": {"user_id": f"u{i}", "age_level": i % 4},
        "candidates": {
            "category": [f"c{(i + j) % 9}" for j in range(n)],
            "price": [float(i * 100 + j) for j in range(n)],
            "tag_brand_list": [[f"b{j % 5}"] * (j % 3) for j in range(n)],
        },
    }


def post_together(server: ServerProcess, bodies: list[Any]) -> list[httpx.Response]:
    """POST every body to /predict at the same moment, one thread each."""
    start = threading.Barrier(len(bodies))
    responses: list[httpx.Response | None] = [None] * len(bodies)

    def send(k: int) -> None:
        with httpx.Client(base_url=server.url, timeout=60) as client:
            client.get("/livez")  # connect first, so the requests leave together
            start.wait()
            responses[k] = client.post("/predict", json=bodies[k])

    threads = [threading.Thread(target=send, args=(k,)) for k in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r is not None for r in responses)
    return [r for r in responses if r is not None]


def runtime_calls(server: ServerProcess) -> dict[str, float]:
    """Samples of the rows-per-runtime-call histogram (count, sum, buckets by `le`)."""
    text = httpx.get(f"{server.url}/metrics").text
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "mmoe_runtime_batch_rows_count":
                out["count"] = s.value
            elif s.name == "mmoe_runtime_batch_rows_sum":
                out["sum"] = s.value
            elif s.name == "mmoe_runtime_batch_rows_bucket":
                out[s.labels["le"]] = s.value
    return out


def shed(server: ServerProcess, reason: str) -> float:
    return value(scrape(server), "mmoe_shed_total", reason=reason)


def test_concurrent_requests_are_merged_and_split_back_in_order(
    start_server: Callable[..., ServerProcess], tiny_onnx: Path
) -> None:
    # a long wait, so that requests sent together surely meet in the queue
    env = {"MMOE_BATCH_MAX_ROWS": "64", "MMOE_BATCH_WAIT_MS": "200"}
    server = start_server(tiny_onnx, env=env)
    assert httpx.get(f"{server.url}/metadata").json()["batching"]["dynamic"] is True
    sizes = [1, 7, 3, 12, 5, 2, 9, 30, 100]  # 100 > 64 rows: a runtime call of its own
    bodies = [request_body(i, n) for i, n in enumerate(sizes)]

    sequential = []
    for body in bodies:
        r = httpx.post(f"{server.url}/predict", json=body)
        assert r.status_code == 200, r.text
        sequential.append(r.json())
    before = runtime_calls(server)
    assert before["count"] == len(bodies)  # one runtime call each when sent one by one

    together = post_together(server, bodies)
    after = runtime_calls(server)

    for body, alone, merged in zip(bodies, sequential, together, strict=True):
        assert merged.status_code == 200, merged.text
        got = merged.json()
        assert got["n"] == len(body["candidates"]["category"])
        for task in ("ctr", "cvr"):
            np.testing.assert_allclose(got["scores"][task], alone["scores"][task], atol=1e-6)
    calls = after["count"] - before["count"]
    assert after["sum"] - before["sum"] == sum(sizes)
    assert calls < len(bodies), "no request was merged with another"
    # no runtime call went over 64 rows except the one 100-row request, on its own
    over_64 = (after["+Inf"] - after["64.0"]) - (before["+Inf"] - before["64.0"])
    assert over_64 == 1


@pytest.mark.parametrize("batching", ["off", "on"])
def test_a_full_queue_answers_503_with_retry_after(
    start_server: Callable[..., ServerProcess], tiny_onnx: Path, batching: str
) -> None:
    rows = 20_000  # each request keeps the runtime busy for a while
    env = {
        "MMOE_MAX_QUEUE": "1",
        "MMOE_RETRY_AFTER_S": "3",
        "MMOE_MAX_BATCH_ROWS": str(rows),
        "MMOE_BATCH_MAX_ROWS": "256" if batching == "on" else "0",
    }
    server = start_server(tiny_onnx, env=env)
    big = {"context": {"user_id": "u1", "category": "c1"}, "candidates": {"hour": [9.0] * rows}}
    responses = post_together(server, [big] * 8)

    statuses = sorted(r.status_code for r in responses)
    assert set(statuses) == {200, 503}, statuses
    for r in responses:
        if r.status_code == 503:
            assert r.headers["retry-after"] == "3"
            assert r.json()["error"]["code"] == "overloaded"
    assert shed(server, "queue_full") == statuses.count(503)
    # the server is fine afterwards
    r = httpx.post(f"{server.url}/predict", json=big)
    assert r.status_code == 200


def test_a_request_over_its_time_budget_answers_503(
    start_server: Callable[..., ServerProcess], tiny_onnx: Path
) -> None:
    server = start_server(tiny_onnx, env={"MMOE_REQUEST_TIMEOUT_MS": "1"})
    rows = 4_000  # tens of ms in onnxruntime: far over the 1 ms budget
    big = {"context": {"user_id": "u1", "category": "c1"}, "candidates": {"hour": [9.0] * rows}}
    r = httpx.post(f"{server.url}/predict", json=big)
    assert r.status_code == 503
    assert r.headers["retry-after"] == "1"
    error = r.json()["error"]
    assert error["code"] == "timeout" and "1 ms" in error["reason"]
    assert shed(server, "timeout") == 1
    assert httpx.get(f"{server.url}/readyz").status_code == 200


class ThreadRecordingPredictor(Predictor):
    """The real model; each run after the warm-up notes (rows, the thread it ran on), and takes
    `delay_s` longer."""

    def __init__(self, path: Path, delay_s: float = 0.0) -> None:
        self.ran_on: list[tuple[int, int]] = []
        self.delay_s = 0.0
        super().__init__(path)
        self.ran_on.clear()
        self.delay_s = delay_s

    def run(self, *args: Any, **kwargs: Any) -> dict[str, np.ndarray]:
        feeds = args[0]
        self.ran_on.append((len(next(iter(feeds.values()))), threading.get_ident()))
        time.sleep(self.delay_s)
        return super().run(*args, **kwargs)


def runner_for(predictor: Predictor, pool: ThreadPoolExecutor, timeout_ms: int) -> DirectRunner:
    admission = Admission(8, timeout_ms, 1)
    metrics = ServiceMetrics().for_model("tiny", "7")
    return DirectRunner(predictor, pool, 1, admission, metrics, CpuShare.single_process())


def test_a_small_request_runs_on_the_event_loop_thread(tiny_onnx: Path) -> None:
    """At most INLINE_MAX_ROWS rows: on the loop's own thread (no hand-off to an inference
    thread and back); larger: on an inference thread. The scores are the same either way."""
    predictor = ThreadRecordingPredictor(tiny_onnx)
    small = warmup_feeds(predictor.meta.features, INLINE_MAX_ROWS)
    # one row more (context inputs keep their one row)
    large = {k: np.concatenate([v, v[:1]]) if len(v) > 1 else v for k, v in small.items()}

    async def serve() -> tuple[int, dict[str, np.ndarray], dict[str, np.ndarray]]:
        with ThreadPoolExecutor(1) as pool:
            runner = runner_for(predictor, pool, 10_000)
            inline = await runner.infer(small, INLINE_MAX_ROWS)
            off_loop = await runner.infer(large, INLINE_MAX_ROWS + 1)
        return threading.get_ident(), inline, off_loop

    loop_thread, inline, off_loop = asyncio.run(serve())
    assert [rows for rows, _ in predictor.ran_on] == [INLINE_MAX_ROWS, INLINE_MAX_ROWS + 1]
    assert predictor.ran_on[0][1] == loop_thread
    assert predictor.ran_on[1][1] != loop_thread
    for name in inline:
        np.testing.assert_allclose(inline[name], off_loop[name][:INLINE_MAX_ROWS], atol=1e-6)


def test_a_run_on_the_event_loop_thread_over_the_time_budget_answers_503(tiny_onnx: Path) -> None:
    """Such a run cannot be interrupted; once it ends over MMOE_REQUEST_TIMEOUT_MS the request
    still gets the 503 the setting promises."""
    predictor = ThreadRecordingPredictor(tiny_onnx, delay_s=0.05)  # 50 ms, budget 10
    feeds = warmup_feeds(predictor.meta.features, 4)

    async def serve() -> ApiError:
        with ThreadPoolExecutor(1) as pool, pytest.raises(ApiError) as err:
            await runner_for(predictor, pool, 10).infer(feeds, 4)
        return err.value

    err = asyncio.run(serve())
    assert [thread for _, thread in predictor.ran_on] == [threading.get_ident()]
    assert (err.status, err.code) == (503, "timeout")
    assert err.headers == {"Retry-After": "1"}
