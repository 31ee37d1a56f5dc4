"""Serving under load: dynamic batching merges concurrent requests into one runtime call and
splits the scores back in order; the queue is bounded (503 + Retry-After); requests time out."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

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
