"""Serving under load: dynamic batching merges concurrent requests into one runtime call and
splits the scores back in order; the queue is bounded (503 + Retry-After); requests time out."""

from __future__ import annotations

import asyncio
import json
import socket
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

from mmoe.service.batching import INLINE_MAX_ROWS, DirectRunner
from mmoe.service.deps import infer
from mmoe.service.errors import ApiError
from mmoe.service.metrics import ServiceMetrics
from mmoe.service.payload import RequestDecoder
from mmoe.service.predictor import Predictor, warmup_feeds
from mmoe.service.settings import Settings
from mmoe.service.state import LoadedModel
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
    for line in httpx.get(f"{server.url}/metrics").text.splitlines():
        if line.startswith(f'mmoe_shed_total{{reason="{reason}"}}'):
            return float(line.split()[-1])
    return 0.0


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


def runs_by_spinning(server: ServerProcess) -> dict[str, float]:
    text = httpx.get(f"{server.url}/metrics").text
    return {
        s.labels["spinning"]: s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "mmoe_runtime_runs_total"
    }


@pytest.mark.parametrize("spinning", ["idle", "on"])
def test_spinning_settings_change_speed_not_scores(
    start_server: Callable[..., ServerProcess], tiny_onnx: Path, spinning: str
) -> None:
    """`idle`: a request alone runs on the spinning session, requests that meet run on the
    other; `on`: every run spins. The scores are the same as without spinning."""
    plain = start_server(tiny_onnx)
    server = start_server(tiny_onnx, env={"MMOE_INTRA_OP_SPINNING": spinning})
    assert httpx.get(f"{server.url}/metadata").json()["batching"]["intra_op_spinning"] == spinning
    bodies = [request_body(i, 2000) for i in range(6)]

    expected = [httpx.post(f"{plain.url}/predict", json=b).json()["scores"] for b in bodies]
    start = runs_by_spinning(server)
    alone = [httpx.post(f"{server.url}/predict", json=b).json()["scores"] for b in bodies]
    after_alone = runs_by_spinning(server)
    together = [r.json()["scores"] for r in post_together(server, bodies)]
    after_together = runs_by_spinning(server)

    for want, one, met in zip(expected, alone, together, strict=True):
        for task in ("ctr", "cvr"):
            np.testing.assert_allclose(one[task], want[task], atol=1e-6)
            np.testing.assert_allclose(met[task], want[task], atol=1e-6)
    spun = after_alone.get("true", 0) - start.get("true", 0)
    assert spun == len(bodies)  # each request sent alone ran alone
    shared = after_together.get("false", 0) - after_alone.get("false", 0)
    if spinning == "idle":
        assert shared >= 1, "requests sent together all ran on the spinning session"
    else:
        assert shared == 0
        assert after_together.get("true", 0) - after_alone.get("true", 0) == len(bodies)


def test_a_small_request_alone_runs_on_the_event_loop_thread(tiny_onnx: Path) -> None:
    """Alone and at most INLINE_MAX_ROWS rows: run on the loop's own thread (no hand-off to an
    inference thread and back); larger, or with another request in progress: on the inference
    threads. The scores are the same either way."""
    predictor = Predictor(tiny_onnx)
    ran_on: list[tuple[int, int]] = []  # (rows, thread) of each runtime call
    active = [1]  # HTTP requests in progress, as the service counts them

    def observe(rows: int, seconds: float, spun: bool) -> None:
        ran_on.append((rows, threading.get_ident()))

    small = warmup_feeds(predictor.meta.features, INLINE_MAX_ROWS)
    large = warmup_feeds(predictor.meta.features, INLINE_MAX_ROWS + 1)

    async def serve() -> tuple[int, list[dict[str, np.ndarray]]]:
        with ThreadPoolExecutor(2) as pool:
            runner = DirectRunner(predictor, pool, 2, 8, observe, lambda: active[0])
            outs = [await runner.infer(small, INLINE_MAX_ROWS)]
            await runner.infer(large, INLINE_MAX_ROWS + 1)
            active[0] = 2  # another request is being received
            outs.append(await runner.infer(small, INLINE_MAX_ROWS))
        return threading.get_ident(), outs

    loop_thread, (alone, met) = asyncio.run(serve())
    assert [rows for rows, _ in ran_on] == [INLINE_MAX_ROWS, INLINE_MAX_ROWS + 1, INLINE_MAX_ROWS]
    assert ran_on[0][1] == loop_thread
    assert ran_on[1][1] != loop_thread
    assert ran_on[2][1] != loop_thread
    for name in alone:
        np.testing.assert_allclose(alone[name], met[name], atol=1e-6)


def test_a_run_on_the_event_loop_thread_over_the_time_budget_answers_503(tiny_onnx: Path) -> None:
    """Such a run cannot be interrupted; once it ends over MMOE_REQUEST_TIMEOUT_MS the request
    still gets the 503 the setting promises."""

    class SlowPredictor(Predictor):  # the real model, 50 ms slower
        def run(self, *args: Any, **kwargs: Any) -> dict[str, np.ndarray]:
            time.sleep(0.05)
            return super().run(*args, **kwargs)

    predictor = SlowPredictor(tiny_onnx)
    settings = Settings(model_path=tiny_onnx, request_timeout_ms=10)
    feeds = warmup_feeds(predictor.meta.features, 4)

    async def serve() -> tuple[list[int], ApiError]:
        with ThreadPoolExecutor(1) as pool:
            ran_on: list[int] = []
            runner = DirectRunner(
                predictor, pool, 1, 8, lambda *_: ran_on.append(threading.get_ident())
            )
            model = LoadedModel(predictor, RequestDecoder(predictor.meta, 8), runner, 0.0)
            with pytest.raises(ApiError) as err:
                await infer(settings, ServiceMetrics(), model, feeds, 4)
        return ran_on, err.value

    ran_on, err = asyncio.run(serve())
    assert ran_on == [threading.get_ident()]  # it did run on the loop's thread
    assert (err.status, err.code) == (503, "timeout")


def test_requests_that_arrive_together_are_not_taken_for_alone(
    start_server: Callable[..., ServerProcess], tiny_onnx: Path
) -> None:
    """Eight small requests written at the same moment: a request counts as alone (the spinning
    session, on the event loop's thread) only if no other is in progress, so most of them run
    as shared. Counting a request only once its task has started would take each for alone, and
    run them one by one on the loop."""
    server = start_server(tiny_onnx)
    host, port = server.url.removeprefix("http://").split(":")
    requests = []
    for i in range(8):
        body = json.dumps(request_body(i, 64)).encode()
        head = "POST /predict HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        requests.append(f"{head}content-length: {len(body)}\r\n\r\n".encode() + body)
    start = runs_by_spinning(server)
    sockets = [socket.create_connection((host, int(port)), timeout=30) for _ in requests]
    try:
        for sock, request in zip(sockets, requests, strict=True):
            sock.sendall(request)
        for sock in sockets:
            answer = b""
            while b"\r\n\r\n" not in answer or not answer.endswith(b"}"):
                chunk = sock.recv(65536)
                assert chunk, answer
                answer += chunk
            assert answer.startswith(b"HTTP/1.1 200"), answer
    finally:
        for sock in sockets:
            sock.close()
    end = runs_by_spinning(server)
    shared = end.get("false", 0) - start.get("false", 0)
    alone = end.get("true", 0) - start.get("true", 0)
    assert shared + alone == len(requests)
    assert shared >= 4, f"{alone} of {len(requests)} requests sent together ran as alone"
