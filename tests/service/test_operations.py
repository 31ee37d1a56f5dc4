"""Operating the server: health, readiness, metadata, Prometheus metrics, docs, request ids and
the access log, execution providers, settings, start-up without a model, and /livez staying
responsive while inference is saturated."""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import onnxruntime as ort
import pytest

from mmoe.service.settings import Settings
from tests.docs import documents
from tests.metrics import scrape, value
from tests.server import ServerProcess

ROWS = {"user_id": ["u1", "u2", "u3"], "category": ["c1", "c2", "c3"]}


@pytest.fixture(scope="module")
def server(tiny_onnx: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """Settings from both sources: flags must win over the environment (MMOE_PROVIDER=cuda
    would stop a server without CUDA, `--provider auto` overrides it)."""
    env = {
        "MMOE_PROVIDER": "cuda",
        "MMOE_MAX_QUEUE": "7",
        "MMOE_BATCH_WAIT_MS": "3",
        "MMOE_INTRA_OP_THREADS": "1",
        "MMOE_ACCESS_LOG": "true",
    }
    args = ["--provider", "auto", "--max-queue", "9", "--workers", "2"]
    log = tmp_path_factory.mktemp("operations") / "server.log"
    with ServerProcess(tiny_onnx, env, args, log_path=log) as running:
        yield running


def log_lines(log_path: Path) -> list[dict[str, Any]]:
    """The server's log: every line must be one JSON object."""
    return [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]


def wait_until(check: Callable[[], bool], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def test_health_and_readiness(server: ServerProcess) -> None:
    assert httpx.get(f"{server.url}/livez").json() == {"status": "alive"}
    r = httpx.get(f"{server.url}/readyz")
    assert r.status_code == 200
    assert r.json() == {"status": "ready", "model": "tiny", "version": "7"}


def test_metadata_describes_features_tasks_provider_and_batching(
    server: ServerProcess, tiny_onnx: Path
) -> None:
    meta = httpx.get(f"{server.url}/metadata").json()
    assert meta["model"]["name"] == "tiny"
    assert meta["model"]["version"] == "7"
    assert meta["model"]["path"] == str(tiny_onnx)
    features = {f["name"]: f for f in meta["features"]}
    assert list(features) == [
        "user_id",
        "item_id",
        "category",
        "age_level",
        "price",
        "hour",
        "tag_brand_list",
    ]
    assert features["user_id"]["kind"] == "categorical" and features["user_id"]["required"]
    assert features["price"] == features["price"] | {
        "kind": "numeric",
        "dtype": "float32",
        "default": 1.0,
        "required": False,
    }
    assert features["tag_brand_list"]["max_len"] == 4
    assert features["tag_brand_list"]["separator"] == "|"
    assert [(t["name"], t["kind"], t["output"]) for t in meta["tasks"]] == [
        ("ctr", "binary", "probs_ctr"),
        ("cvr", "binary", "probs_cvr"),
    ]
    assert meta["batching"] == meta["batching"] | {
        "dynamic": False,  # off by default
        "batch_max_rows": 0,
        "batch_wait_ms": 3.0,  # from the environment
        "max_queue": 9,  # the flag, over MMOE_MAX_QUEUE=7
        "intra_op_threads": 1,
        "workers": 2,  # the flag
        "inference_workers": 1,  # the default
    }


def test_auto_provider_is_the_one_that_really_loaded(
    server: ServerProcess, tiny_onnx: Path
) -> None:
    provider = httpx.get(f"{server.url}/metadata").json()["provider"]
    assert provider in ort.get_available_providers()
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        assert provider == "CPUExecutionProvider"
    info = value(
        scrape(server),
        "mmoe_model_info",
        name="tiny",
        version="7",
        provider=provider,
        path=str(tiny_onnx),
    )
    assert info == 1
    assert server.log_path is not None
    loaded = [e for e in log_lines(server.log_path) if e.get("event") == "model_loaded"]
    assert sorted((e["worker"], e["provider"]) for e in loaded) == [(0, provider), (1, provider)]


def test_cuda_provider_without_cuda_stops_the_start_with_a_clear_message(
    start_server: Callable[..., ServerProcess], tiny_onnx: Path
) -> None:
    if "CUDAExecutionProvider" in ort.get_available_providers():
        server = start_server(tiny_onnx, env={"MMOE_PROVIDER": "cuda"})
        assert httpx.get(f"{server.url}/metadata").json()["provider"] == "CUDAExecutionProvider"
        return
    with pytest.raises(RuntimeError, match="server exited with") as raised:
        start_server(tiny_onnx, env={"MMOE_PROVIDER": "cuda"})
    assert "server exited with 0" not in str(raised.value)
    assert "MMOE_PROVIDER=cuda but this onnxruntime build has no CUDAExecutionProvider" in str(
        raised.value
    )


def test_invalid_settings_exit_non_zero_naming_the_setting(tiny_onnx: Path) -> None:
    cmd = [sys.executable, "-m", "mmoe", "serve", "--model", str(tiny_onnx), "--port", "1"]
    flag = subprocess.run([*cmd, "--max-queue", "0"], capture_output=True, text=True, timeout=60)
    assert flag.returncode == 2
    assert "max_queue" in flag.stderr
    env = {**os.environ, "MMOE_PROVIDER": "gpu"}
    bad_env = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env)
    assert bad_env.returncode == 2
    assert "provider" in bad_env.stderr and "'auto', 'cpu' or 'cuda'" in bad_env.stderr


def test_metrics_count_requests_latency_rows_and_runtime_calls(
    server: ServerProcess, tiny_onnx: Path
) -> None:
    """Summed over the two workers: each request on its own connection, so either may get it."""
    before = scrape(server)
    for n in (3, 5):
        body = {"candidates": {"user_id": ["u1"] * n, "category": ["c1"] * n}}
        assert httpx.post(f"{server.url}/predict", json=body).status_code == 200
    invalid = {"candidates": {"user_id": ["u1"]}}
    assert httpx.post(f"{server.url}/predict", json=invalid).status_code == 422
    assert httpx.get(f"{server.url}/no/such/page").status_code == 404
    after = scrape(server)

    def delta(metric: str, /, **labels: str) -> float:
        return value(after, metric, **labels) - value(before, metric, **labels)

    assert delta("mmoe_requests_total", route="/predict", status="200") == 2
    assert delta("mmoe_requests_total", route="/predict", status="422") == 1
    assert delta("mmoe_requests_total", route="other", status="404") == 1
    assert delta("mmoe_request_latency_seconds_count", route="/predict") == 3
    assert delta("mmoe_request_latency_seconds_bucket", route="/predict", le="+Inf") == 3
    assert delta("mmoe_request_latency_seconds_sum", route="/predict") > 0
    assert delta("mmoe_request_rows_count") == 2
    assert delta("mmoe_request_rows_sum") == 8
    assert delta("mmoe_request_rows_bucket", le="4.0") == 1
    assert delta("mmoe_runtime_batch_rows_count") == 2
    assert delta("mmoe_runtime_batch_rows_sum") == 8
    assert delta("mmoe_runtime_seconds_count") == 2
    assert value(after, "mmoe_http_requests_active") == 1  # the scrape itself
    assert ("mmoe_queue_depth", frozenset()) in after
    assert value(after, "mmoe_queue_depth") == 0
    assert value(after, "mmoe_inflight") == 0
    assert value(after, "mmoe_reloads_total", result="ok") == 2  # each worker loaded the model
    infos = [k for k in after if k[0] == "mmoe_model_info"]
    assert len(infos) == 1
    assert dict(infos[0][1]) | {"provider": ""} == {
        "name": "tiny",
        "version": "7",
        "path": str(tiny_onnx),
        "provider": "",
    }


def test_docs_and_openapi_document_the_model_request(server: ServerProcess) -> None:
    docs = httpx.get(f"{server.url}/docs")
    assert docs.status_code == 200
    assert "swagger" in docs.text.lower()
    spec = httpx.get(f"{server.url}/openapi.json").json()
    for path in ("/predict", "/livez", "/readyz", "/metadata", "/metrics", "/admin/reload"):
        assert path in spec["paths"], path
    assert "/v2/models/{name}/infer" in spec["paths"]
    body = spec["paths"]["/predict"]["post"]["requestBody"]["content"]["application/json"]
    text = json.dumps(body["schema"]) + json.dumps(spec["components"]["schemas"])
    for feature in ("user_id", "tag_brand_list", "price"):
        assert f'"{feature}"' in text
    assert '"#/$defs/' not in text  # every reference resolves inside the OpenAPI document


def test_request_id_is_echoed_or_made_up(server: ServerProcess) -> None:
    with httpx.Client(base_url=server.url) as client:
        given = client.post(
            "/predict", json={"candidates": ROWS}, headers={"x-request-id": "trace-42"}
        )
        assert given.status_code == 200
        assert given.headers["x-request-id"] == "trace-42"
        refused = client.post("/predict", content=b"{", headers={"x-request-id": "trace-43"})
        assert refused.status_code == 400
        assert refused.headers["x-request-id"] == "trace-43"
        made_up = {client.get("/livez").headers["x-request-id"] for _ in range(2)}
    assert len(made_up) == 2
    assert all(re.fullmatch("[0-9a-f]{32}", rid) for rid in made_up)


def test_access_log_is_one_json_line_per_request(server: ServerProcess) -> None:
    assert server.log_path is not None
    rid = f"access-{time.time_ns()}"
    with httpx.Client(base_url=server.url) as client:
        client.post("/predict", json={"candidates": ROWS}, headers={"x-request-id": rid})
        client.post("/predict", json={"candidates": {}}, headers={"x-request-id": rid + "-bad"})
        client.get("/livez", headers={"x-request-id": rid + "-live"})
    time.sleep(0.2)  # the line is written after the response is sent
    lines = log_lines(server.log_path)
    by_id = {e["request_id"]: e for e in lines if e.get("logger") == "mmoe.access"}
    ok = by_id[rid]
    assert ok["worker"] in (0, 1)  # which of the two workers answered
    assert ok | {"ms": 0, "ts": "", "worker": 0} == {
        "ts": "",
        "worker": 0,
        "level": "info",
        "logger": "mmoe.access",
        "msg": "request",
        "request_id": rid,
        "method": "POST",
        "path": "/predict",
        "status": 200,
        "ms": 0,
        "client": "127.0.0.1",
    }
    assert ok["ms"] > 0
    assert by_id[rid + "-bad"]["status"] == 422
    assert rid + "-live" not in by_id  # probes are not logged


def test_start_without_a_model_waits_logging_each_reason_once(
    start_server: Callable[..., ServerProcess], tiny_onnx: Path, tmp_path: Path
) -> None:
    model = tmp_path / "models" / "model.onnx"
    model.parent.mkdir()
    env = {"MMOE_LOAD_RETRY_S": "0.05", "MMOE_PROVIDER": "cpu"}
    server = start_server(model, env=env, wait_ready=False)

    def not_ready_reason() -> str:
        r = httpx.get(f"{server.url}/readyz")
        assert r.status_code == 503
        reason: str = r.json()["reason"]
        return reason

    # Each worker answers "not loaded yet" until its first attempt, which follows its start.
    wait_until(lambda: "model file not found" in not_ready_reason())
    assert httpx.get(f"{server.url}/livez").status_code == 200
    assert httpx.get(f"{server.url}/v2/health/ready").status_code == 503
    r = httpx.post(f"{server.url}/predict", json={"candidates": ROWS})
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    assert r.json()["error"]["code"] == "not_ready"
    time.sleep(0.5)  # about ten retries

    corrupt = tmp_path / "models" / "corrupt.tmp"
    corrupt.write_bytes(os.urandom(4096))
    corrupt.replace(model)
    wait_until(lambda: "cannot load" in not_ready_reason())
    time.sleep(0.5)

    staged = tmp_path / "models" / "good.tmp"
    staged.write_bytes(tiny_onnx.read_bytes())
    staged.replace(model)
    server.wait_for("/readyz", 30)
    assert httpx.get(f"{server.url}/metadata").json()["provider"] == "CPUExecutionProvider"

    assert server.log_path is not None
    failures = [e for e in log_lines(server.log_path) if e.get("event") == "model_load_failed"]
    for worker in {e.get("worker") for e in failures}:  # each worker logs its own
        reasons = [e["reason"] for e in failures if e.get("worker") == worker]
        assert len(reasons) == 2, failures
        assert "model file not found" in reasons[0]
        assert "cannot load" in reasons[1]


@pytest.mark.slow
@pytest.mark.serial
def test_livez_answers_while_inference_is_saturated(
    start_server: Callable[..., ServerProcess], tiny_onnx: Path
) -> None:
    """Each request below keeps onnxruntime busy for far longer than the bound (about half a
    second on a 2-core machine) while costing little to decode (one numeric column), so if
    inference ran on the event loop most probes would wait for it."""
    rows = 100_000
    server = start_server(
        tiny_onnx,
        env={"MMOE_MAX_BATCH_ROWS": str(rows), "MMOE_REQUEST_TIMEOUT_MS": "120000"},
    )
    body = json.dumps(
        {
            "context": {"user_id": "u1", "category": "c1"},
            "candidates": {"hour": [i % 24 for i in range(rows)]},
            "tasks": ["ctr"],
        }
    ).encode()
    stop = threading.Event()
    statuses: list[int] = []

    def load() -> None:
        with httpx.Client(base_url=server.url, timeout=120) as client:
            while not stop.is_set():
                statuses.append(client.post("/predict", content=body).status_code)

    threads = [threading.Thread(target=load) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        wait_until(lambda: len(statuses) >= 2, timeout=120)  # the server is busy by now
        latencies = []
        with httpx.Client(base_url=server.url) as probe:
            for _ in range(15):
                t0 = time.perf_counter()
                assert probe.get("/livez").status_code == 200
                latencies.append(time.perf_counter() - t0)
                time.sleep(0.1)
    finally:
        stop.set()
        for t in threads:
            t.join()
    busy = scrape(server)
    assert set(statuses) == {200}
    assert value(busy, "mmoe_request_rows_sum") >= 2 * rows
    median = statistics.median(latencies)
    assert median < 0.05, f"/livez median {median * 1000:.0f} ms under load: {latencies}"


def test_every_setting_is_in_a_settings_table_with_its_default() -> None:
    # docs/settings.md's table, and those of the docs/ pages that add settings (a later row wins).
    text = "\n".join(doc.read_text() for doc in documents())
    rows = {
        line.split("|")[1].strip(" `"): line.split("|")[3].strip()
        for line in text.splitlines()
        if line.startswith("| `MMOE_")
    }
    for name, field in Settings.model_fields.items():
        variable = f"MMOE_{name.upper()}"
        assert variable in rows, f"{variable} missing from the settings tables (docs/settings.md)"
        if field.default is not None:
            shown = {str(field.default)}
            if isinstance(field.default, bool):
                shown = {str(field.default).lower()}
            elif isinstance(field.default, float):
                shown.add(f"{field.default:g}")  # 60.0 may read `60`
            first = rows[variable].split("`")[1] if rows[variable].startswith("`") else None
            assert first in shown, (variable, rows[variable])


def test_serve_has_a_flag_for_every_setting_but_the_key() -> None:
    cmd = [sys.executable, "-m", "mmoe", "serve", "--help"]
    text = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=True).stdout
    flat = " ".join(text.split())  # argparse wraps the help text
    for name in Settings.model_fields:
        if name == "api_key":  # a secret in argv is visible to every user of the machine
            assert "MMOE_API_KEY" not in flat and "--api-key" not in flat
        else:
            assert f"env MMOE_{name.upper()}" in flat, name
