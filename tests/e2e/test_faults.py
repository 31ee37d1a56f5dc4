"""Faults, on real server processes: a model that is not there yet, SIGTERM under load, a worker
killed with SIGKILL under load and restarted the way its supervisor would, reload paths that try
to leave the model directory; and training checkpoints carrying pickled code.

(A corrupt model file reloaded under load is tests/service/test_reload.py's
test_bad_files_are_rejected_under_load_and_a_good_one_swaps_in.)
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.server import ServerProcess

BODY = {"candidates": {"user_id": ["u1", "u2", "u3"], "category": ["c1", "c2", "c3"]}}


def wait_until(check: Callable[[], bool], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


class Load:
    """Threads sending /predict in a closed loop, a new connection per request (as a client
    behind a load balancer would), counting what comes back (a status, or the exception) under
    the phase in which it was sent."""

    def __init__(self, url: str, threads: int = 4) -> None:
        self.url = url
        self.outcomes: Counter[str] = Counter()
        self.phase = "before"
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def _run(self) -> None:
        while not self._stop.is_set():
            phase = self.phase  # when the request was sent, not when its answer came
            try:
                r = httpx.post(self.url + "/predict", json=BODY, timeout=30)
                outcome = str(r.status_code)
                if r.status_code >= 500:
                    outcome += f" {r.json()['error']['code']}"
            except httpx.HTTPError as err:
                outcome = type(err).__name__
                time.sleep(0.01)
            with self._lock:
                self.outcomes[f"{phase}:{outcome}"] += 1

    def count(self, phase: str, outcome: str) -> int:
        with self._lock:
            return self.outcomes[f"{phase}:{outcome}"]

    @contextmanager
    def running(self) -> Iterator[Load]:
        for t in self._threads:
            t.start()
        try:
            yield self
        finally:
            self._stop.set()
            for t in self._threads:
                t.join(60)


def served_path(server: ServerProcess) -> str:
    path: str = httpx.get(server.url + "/metadata").json()["model"]["path"]
    return path


# ---------------------------------------------------------------------- model not there yet


def test_model_directory_missing_at_start_then_created(
    start_server: Callable[..., ServerProcess], tiny_onnx: Path, tmp_path: Path
) -> None:
    model = tmp_path / "volume" / "models" / "model.onnx"  # not even the directory exists
    server = start_server(model, env={"MMOE_LOAD_RETRY_S": "0.1"}, wait_ready=False)

    assert httpx.get(server.url + "/livez").status_code == 200
    r = httpx.get(server.url + "/readyz")
    assert r.status_code == 503

    # Until its first attempt, a worker says only that no model is loaded yet.
    def says_not_found() -> bool:
        reason: str = httpx.get(server.url + "/readyz").json()["reason"]
        return "not found" in reason and str(model) in reason

    wait_until(says_not_found, timeout=10)
    for path in ("/predict", "/v2/models/tiny/infer"):
        r = httpx.post(server.url + path, json=BODY)
        assert r.status_code == 503 and r.headers["retry-after"], (path, r.text)
    wait_until(lambda: '"model_load_failed"' in server.log())
    failure = next(
        json.loads(line) for line in server.log().splitlines() if '"model_load_failed"' in line
    )
    assert str(model) in failure["reason"]

    model.parent.mkdir(parents=True)
    staged = model.parent / ".model.onnx.partial"  # copied then renamed, as deploys do
    staged.write_bytes(tiny_onnx.read_bytes())
    staged.replace(model)
    server.wait_for("/readyz", 30)
    r = httpx.post(server.url + "/predict", json=BODY)
    assert r.status_code == 200 and len(r.json()["scores"]["ctr"]) == 3


# ------------------------------------------------------------------------ SIGTERM under load


def _request_in_flight(server: ServerProcess, body: bytes) -> tuple[socket.socket, bytes]:
    """A /predict the server has started on (head and half the body received); the rest of the
    body is returned, to be sent later."""
    host, port = server.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=30)
    head = b"POST /predict HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
    sock.sendall(head + b"content-length: %d\r\n\r\n" % len(body) + body[: len(body) // 2])
    return sock, body[len(body) // 2 :]


def _read_response(sock: socket.socket) -> tuple[int, dict[str, Any]]:
    data = b""
    while b"\r\n\r\n" not in data or len(data.partition(b"\r\n\r\n")[2]) < int(
        next(
            line.split(b":")[1]
            for line in data.partition(b"\r\n\r\n")[0].lower().split(b"\r\n")
            if line.startswith(b"content-length:")
        )
    ):
        chunk = sock.recv(65536)
        assert chunk, f"connection closed after {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), json.loads(body)


def _refuses_connections(server: ServerProcess) -> bool:
    host, port = server.url.removeprefix("http://").split(":")
    try:
        socket.create_connection((host, int(port)), timeout=1).close()
    except OSError:
        return True
    return False


@pytest.mark.slow
def test_sigterm_under_load_finishes_in_flight_requests_and_refuses_new_ones(
    start_server: Callable[..., ServerProcess], tiny_onnx: Path
) -> None:
    server = start_server(tiny_onnx)
    with Load(server.url).running() as load:
        wait_until(lambda: load.count("before", "200") >= 20)
        sock, rest = _request_in_flight(server, json.dumps(BODY).encode())
        time.sleep(0.2)  # the head is in: the request is the server's now
        load.phase = "draining"
        server.signal(signal.SIGTERM)
        wait_until(lambda: _refuses_connections(server), 10)
        load.phase = "after"
        sock.sendall(rest)
        status, answer = _read_response(sock)
        sock.close()
    assert status == 200 and len(answer["scores"]["ctr"]) == 3  # the in-flight one completed
    # uvicorn re-raises the signal once it has drained, so the exit status says "SIGTERM"
    assert server.proc is not None and server.proc.wait(30) in (0, -signal.SIGTERM)
    print(dict(load.outcomes))
    # Load traffic: answered 200, or refused at connect once the listener closed; never a 5xx.
    assert not [k for k in load.outcomes if k.split(":")[1].startswith("5")], load.outcomes
    allowed = {"200", "ConnectError", "RemoteProtocolError", "ReadError"}
    assert {k.split(":")[1] for k in load.outcomes} <= allowed, load.outcomes
    assert load.count("after", "200") == 0
    assert "Application shutdown complete" in server.log()


# ------------------------------------------------------------------- SIGKILL and a restart


@pytest.mark.slow
def test_worker_killed_under_load_is_restarted_and_serves_again(
    start_server: Callable[..., ServerProcess], tiny_onnx: Path, tmp_path: Path
) -> None:
    """The container's restart policy (compose: `restart: unless-stopped`) starts the process
    again on the same address; here the test is that supervisor."""
    server = start_server(tiny_onnx)
    assert server.proc is not None
    restarted = ServerProcess(tiny_onnx, log_path=tmp_path / "restarted.log")
    restarted.port, restarted.url = server.port, server.url  # same address, as after a restart
    with Load(server.url).running() as load:
        wait_until(lambda: load.count("before", "200") >= 20)
        load.phase = "down"
        server.proc.send_signal(signal.SIGKILL)
        assert server.proc.wait(10) == -signal.SIGKILL
        wait_until(lambda: sum(n for k, n in load.outcomes.items() if "down:" in k) >= 4)
        try:
            restarted.start(timeout=60)  # the supervisor's restart
            load.phase = "after"
            wait_until(lambda: load.count("after", "200") >= 20)
        finally:
            restarted.stop()
    print(dict(load.outcomes))
    # While down: refused connections; while the new process loads its model: 503 not_ready
    # (with Retry-After; its /readyz keeps a load balancer away meanwhile). Never another 5xx.
    seen = {k.split(":")[1] for k in load.outcomes}
    allowed = {"200", "503 not_ready", "ConnectError", "RemoteProtocolError", "ReadError"}
    assert seen <= allowed, load.outcomes
    assert load.count("after", "200") >= 20


# ------------------------------------------------------------------------------ reload paths


def test_reload_never_reads_outside_the_model_directory(
    start_server: Callable[..., ServerProcess], tiny_onnx: Path, tmp_path: Path
) -> None:
    models, outside = tmp_path / "models", tmp_path / "outside"
    models.mkdir()
    outside.mkdir()
    for path in (models / "model.onnx", models / "other.onnx", outside / "model.onnx"):
        path.write_bytes(tiny_onnx.read_bytes())  # outside is a valid model: only the rule stops it
    (models / "link.onnx").symlink_to(outside / "model.onnx")
    (models / "sub").symlink_to(outside, target_is_directory=True)
    (models / "loop").symlink_to(models / "loop")
    server = start_server(models / "model.onnx")
    original = served_path(server)

    refused = {
        "../outside/model.onnx": (403, "path_not_allowed"),
        "sub/../../outside/model.onnx": (403, "path_not_allowed"),
        str(outside / "model.onnx"): (403, "path_not_allowed"),
        "/etc/passwd": (403, "path_not_allowed"),
        "link.onnx": (403, "path_not_allowed"),  # a symlink pointing outside
        "sub/model.onnx": (403, "path_not_allowed"),  # through a symlinked directory
        "model.onnx\x00.txt": (422, "invalid_path"),
        "loop": (422, "invalid_path"),
        "%2e%2e/outside/model.onnx": (422, "model_rejected"),  # a literal name, not decoded
        "": (422, "model_rejected"),  # the directory itself
    }
    for name, (status, code) in refused.items():
        r = httpx.post(server.url + "/admin/reload", json={"path": name})
        assert (r.status_code, r.json()["error"]["code"]) == (status, code), (name, r.text)
        assert served_path(server) == original
    for raw, (status, code) in {
        b'{"path": "\xff.onnx"}': (400, "malformed_json"),
        b'{"path": "other.onnx", "path": "../outside/model.onnx"}': (422, "duplicate_key"),
    }.items():
        r = httpx.post(server.url + "/admin/reload", content=raw)
        assert (r.status_code, r.json()["error"]["code"]) == (status, code), (raw, r.text)
    r = httpx.post(server.url + "/admin/reload", json={"path": "other.onnx"})
    assert r.status_code == 200, r.text
    assert served_path(server) == str(models.resolve() / "other.onnx")
    assert not [
        line for line in server.log().splitlines() if str(outside) in line and "loaded" in line
    ]


def test_only_the_reload_endpoint_takes_a_path(server: ServerProcess) -> None:
    """No other operation has a parameter or body field that could name a file."""
    spec = httpx.get(server.url + "/openapi.json").json()
    components = spec.get("components", {}).get("schemas", {})

    def names(schema: Any, seen: frozenset[str] = frozenset()) -> set[str]:
        if isinstance(schema, list):
            return set().union(*(names(s, seen) for s in schema)) if schema else set()
        if not isinstance(schema, dict):
            return set()
        ref = schema.get("$ref", "")
        if ref:
            name = ref.rsplit("/", 1)[1]
            return set() if name in seen else names(components[name], seen | {name})
        found = set(schema.get("properties", {}))
        return found.union(*(names(v, seen) for v in schema.values()))

    takes_a_path = set()
    for route, item in spec["paths"].items():
        for method, op in item.items():
            fields = {p["name"] for p in op.get("parameters", [])}
            for media in op.get("requestBody", {}).get("content", {}).values():
                fields |= names(media["schema"])
            if {f for f in fields if any(w in f.lower() for w in ("path", "file", "dir"))}:
                takes_a_path.add(f"{method.upper()} {route}")
    assert takes_a_path == {"POST /admin/reload"}


def test_server_runs_as_the_user_that_started_it_and_reads_only_its_model(
    server: ServerProcess, tiny_onnx: Path
) -> None:
    """Nothing escalates: every process of the server (with workers, the parent and each
    worker) keeps the caller's uid, and the only model file any holds open or mapped is the
    configured one (the container image runs it as uid 10001)."""
    pids = server.pids()
    workers = httpx.get(server.url + "/metadata").json()["batching"]["workers"]
    assert len(pids) >= (1 + workers if workers > 1 else 1)
    for pid in pids:
        status = Path(f"/proc/{pid}/status").read_text()
        uids = next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1:]
        assert set(uids) == {str(os.getuid())}
        fds = Path(f"/proc/{pid}/fd")
        opened = {os.path.realpath(fds / fd) for fd in os.listdir(fds)}
        assert not [p for p in opened if p.endswith(".onnx") and p != str(tiny_onnx.resolve())]


# --------------------------------------------------------------------- untrusted checkpoints


class _Payload:
    """Pickled, it calls Path.write_text when loaded: what a hostile weights.pt would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.write_text, (self.marker, "code ran"))


def test_a_checkpoint_with_pickled_code_is_refused_not_run(tiny_run: Path, tmp_path: Path) -> None:
    import shutil

    import torch

    from mmoe.model.checkpoint import load_run

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    marker = tmp_path / "marker"
    torch.save({"weight": _Payload(marker)}, run / "weights.pt")
    with pytest.raises(Exception, match=r"[Ww]eights only load failed"):
        load_run(run)
    assert not marker.exists()


def test_every_torch_load_is_weights_only() -> None:
    """The one deserialiser that could run code: every call in the code base says weights_only."""
    import ast

    root = Path(__file__).parents[2]
    calls = []
    for package in ("model", "export", "service", "mmoe", "bench"):
        for path in (root / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Call) and ast.unparse(node.func) == "torch.load":
                    weights_only = [k for k in node.keywords if k.arg == "weights_only"]
                    ok = bool(weights_only) and ast.unparse(weights_only[0].value) == "True"
                    calls.append((f"{path.relative_to(root)}:{node.lineno}", ok))
    assert calls, "no torch.load found: is the scan looking in the right place?"
    assert all(ok for _, ok in calls), calls
