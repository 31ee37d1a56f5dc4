"""A server of several worker processes (MMOE_WORKERS=2) is one server to its callers: metrics
add up over the requests sent whichever worker took them, a reload (POST /admin/reload or
SIGHUP) reaches every worker under load without a failed request, readiness speaks for every
worker, SIGTERM lets every worker finish its in-flight requests, and a worker that dies is
replaced."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.metrics import scrape, value
from tests.server import ServerProcess
from tests.service.test_reload import replace, rewrite_metadata, version_8

TWO = {"MMOE_WORKERS": "2", "MMOE_ACCESS_LOG": "true"}
BODY = {"context": {"user_id": "u1", "age_level": 2}, "candidates": {"category": ["c1"] * 4}}


def workers_that_answered(server: ServerProcess) -> set[int]:
    """From the access log: which workers answered a /predict."""
    assert server.log_path is not None
    lines = [json.loads(x) for x in server.log_path.read_text().splitlines() if x.strip()]
    return {e["worker"] for e in lines if e.get("logger") == "mmoe.access"}


def wait_until(check: Callable[[], bool], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


class Load:
    """Threads scoring BODY until stopped, each request on a new connection (so that every
    worker gets some); keeps (status, model version or error text) of each."""

    def __init__(self, server: ServerProcess, threads: int = 4) -> None:
        self.server = server
        self.results: list[tuple[int, str]] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run) for _ in range(threads)]

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                r = httpx.post(self.server.url + "/predict", json=BODY, timeout=30)
                outcome = r.json()["model"]["version"] if r.status_code == 200 else r.text
                self.results.append((r.status_code, outcome))
            except httpx.HTTPError as err:
                self.results.append((0, repr(err)))

    def wait_for_requests(self, count: int) -> None:
        target = len(self.results) + count
        wait_until(lambda: len(self.results) >= target)

    @property
    def failures(self) -> list[tuple[int, str]]:
        return [r for r in self.results if r[0] != 200]

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        self.wait_for_requests(4)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join()


@pytest.fixture
def model_dir(tiny_onnx: Path, tmp_path: Path) -> Path:
    root = tmp_path / "models"
    root.mkdir()
    shutil.copy(tiny_onnx, root / "model.onnx")
    version_8(tiny_onnx, root / "v8.onnx")
    return root


@pytest.fixture
def two_workers(start_server: Callable[..., ServerProcess], model_dir: Path) -> ServerProcess:
    server = start_server(model_dir / "model.onnx", env=TWO)
    assert httpx.get(f"{server.url}/metadata").json()["batching"]["workers"] == 2
    return server


@pytest.mark.serial
def test_metrics_add_up_over_the_requests_sent_to_every_worker(two_workers: ServerProcess) -> None:
    server = two_workers
    before = scrape(server)
    sent = 0
    while workers_that_answered(server) != {0, 1} or sent < 20:
        assert sent < 400, "one worker took every connection"
        r = httpx.post(f"{server.url}/predict", json=BODY)  # a new connection each
        assert r.status_code == 200, r.text
        sent += 1
    assert httpx.post(f"{server.url}/predict", json={"candidates": {}}).status_code == 422
    after = scrape(server)

    def delta(name: str, /, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("mmoe_requests_total", route="/predict", status="200") == sent
    assert delta("mmoe_requests_total", route="/predict", status="422") == 1
    assert delta("mmoe_request_latency_seconds_count", route="/predict") == sent + 1
    assert delta("mmoe_request_rows_count") == sent
    assert delta("mmoe_request_rows_sum") == 4 * sent
    assert delta("mmoe_runtime_batch_rows_sum") == 4 * sent
    assert delta("mmoe_runtime_seconds_count") == sent
    # gauges: the sum over the workers, now
    assert value(after, "mmoe_http_requests_active") == 1  # the scrape itself
    assert value(after, "mmoe_queue_depth") == 0
    assert value(after, "mmoe_inflight") == 0
    assert value(after, "mmoe_reloads_total", result="ok") == 2  # one load in each worker
    infos = [labels for name, labels in after if name == "mmoe_model_info"]
    assert [dict(i)["version"] for i in infos] == ["7"]


def test_reload_and_sighup_reach_every_worker_under_load(
    two_workers: ServerProcess, model_dir: Path, tiny_onnx: Path
) -> None:
    server = two_workers
    with Load(server) as load:
        r = httpx.post(f"{server.url}/admin/reload", json={"path": "v8.onnx"}, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["version"] == "8"
        # The answer came once both workers serve v8: from now on every request gets v8.
        after_reload = len(load.results)
        load.wait_for_requests(40)
        assert {v for _, v in load.results[after_reload + 4 :]} == {"8"}  # 4 were in flight

        v9 = rewrite_metadata(tiny_onnx, model_dir / "v9.build", lambda m: m.update(version="9"))
        replace(model_dir / "model.onnx", v9.read_bytes())
        server.signal(signal.SIGHUP)  # to the parent: it tells every worker
        wait_until(lambda: value(scrape(server), "mmoe_reloads_total", result="ok") == 6)
        after_sighup = len(load.results)
        load.wait_for_requests(40)

    assert load.failures == []
    assert {v for _, v in load.results[after_sighup + 4 :]} == {"9"}
    samples = scrape(server)
    infos = [dict(labels) for name, labels in samples if name == "mmoe_model_info"]
    assert [i["version"] for i in infos] == ["9"]
    assert workers_that_answered(server) == {0, 1}


def test_readiness_waits_for_every_worker(
    start_server: Callable[..., ServerProcess], tiny_onnx: Path, tmp_path: Path
) -> None:
    model = tmp_path / "models" / "model.onnx"
    model.parent.mkdir()
    server = start_server(model, env={**TWO, "MMOE_LOAD_RETRY_S": "0.05"}, wait_ready=False)
    wait_until(lambda: "model file not found" in httpx.get(f"{server.url}/readyz").text)
    assert httpx.get(f"{server.url}/readyz").status_code == 503
    replace(model, tiny_onnx.read_bytes())
    server.wait_for("/readyz", 30)
    # Ready means every worker is: any connection now gets scored.
    for _ in range(20):
        assert httpx.post(f"{server.url}/predict", json=BODY).status_code == 200


def _half_sent(server: ServerProcess) -> tuple[socket.socket, bytes]:
    body = json.dumps(BODY).encode()
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    head = b"POST /predict HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
    sock.sendall(head + b"content-length: %d\r\n\r\n" % len(body) + body[: len(body) // 2])
    return sock, body[len(body) // 2 :]


@pytest.mark.slow
def test_sigterm_lets_every_worker_finish_its_requests(two_workers: ServerProcess) -> None:
    server = two_workers
    pending = [_half_sent(server) for _ in range(8)]  # the kernel spreads them over the workers
    time.sleep(0.5)  # every head is in: each request is some worker's now
    server.signal(signal.SIGTERM)

    def refused() -> bool:
        try:
            socket.create_connection(("127.0.0.1", server.port), timeout=1).close()
        except OSError:
            return True
        return False

    wait_until(refused, 10)  # the port closed at once, while the requests are still open
    for sock, rest in pending:
        sock.sendall(rest)
        answer = b""
        while not answer.endswith(b"}}"):
            chunk = sock.recv(65536)
            assert chunk, answer
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 200"), answer
        sock.close()
    assert server.proc is not None and server.proc.wait(30) == 0
    assert server.log().count("Application shutdown complete") == 2


@pytest.mark.slow
def test_a_worker_that_dies_is_replaced(two_workers: ServerProcess) -> None:
    server = two_workers
    assert server.proc is not None
    workers = [p for p in server.pids() if _is_worker(p)]
    assert len(workers) == 2
    os.kill(workers[0], signal.SIGKILL)
    wait_until(lambda: len([p for p in server.pids() if _is_worker(p)]) == 2)
    server.wait_for("/readyz", 30)
    replaced = {p for p in server.pids() if _is_worker(p)}
    assert workers[0] not in replaced and workers[1] in replaced
    for _ in range(20):
        assert httpx.post(f"{server.url}/predict", json=BODY).status_code == 200
    samples = scrape(server)
    assert value(samples, "mmoe_http_requests_active") == 1  # the dead worker's gauges are gone
    assert value(samples, "mmoe_reloads_total", result="ok") == 3  # two at start, one again
    assert server.log_path is not None
    assert "worker exited; restarting it" in server.log_path.read_text()


def _is_worker(pid: int) -> bool:
    return b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()
