"""A failure no request should cause (here, onnxruntime failing on a model that passed its
warm-up and golden rows) is a JSON 500 with the request's id over HTTP, INTERNAL over gRPC:
logged under that id with the request's shape and never its values, counted where the
MmoeServerErrors alert looks, and the server (and the connection) go on serving."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest
from tritonclient.grpc import service_pb2 as pb

from tests.metrics import scrape, value
from tests.onnx_files import fail_past_rows
from tests.service.test_grpc import GrpcServer, grpc_error, stub_call

FAULT_ROWS = 40  # more than the warm-up's 32 rows and the golden rows
SECRET = "u-secret-value"


def body(n: int) -> dict[str, object]:
    return {
        "context": {"user_id": SECRET, "age_level": 3},
        "candidates": {"item_id": [f"i{j}" for j in range(n)], "category": ["c1"] * n},
    }


@pytest.fixture(scope="module")
def server(
    tiny_context_onnx: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GrpcServer]:
    tmp = tmp_path_factory.mktemp("internal")
    model = tmp / "fails.onnx"
    fail_past_rows(tiny_context_onnx, model, FAULT_ROWS)
    with GrpcServer(model, log_path=tmp / "server.log") as running:
        yield running


def whole_log(server: GrpcServer) -> str:
    assert server.log_path is not None
    return server.log_path.read_text()


def log_lines(server: GrpcServer) -> list[dict[str, object]]:
    return [json.loads(line) for line in whole_log(server).splitlines() if line.startswith("{")]


def test_a_runtime_failure_is_a_json_500_with_the_request_id(server: GrpcServer) -> None:
    with httpx.Client(base_url=server.url, timeout=30) as client:
        ok = client.post("/predict", json=body(FAULT_ROWS))
        assert ok.status_code == 200, ok.text
        r = client.post("/predict", json=body(FAULT_ROWS + 1), headers={"x-request-id": "req-7"})
        assert r.status_code == 500
        assert r.headers["content-type"] == "application/json"
        error = r.json()["error"]
        assert error["code"] == "internal_error" and error["request_id"] == "req-7"
        assert "req-7" in error["reason"] and r.headers["x-request-id"] == "req-7"
        # The same connection goes on: the answer was complete, nothing was closed.
        again = client.post("/predict", json=body(3))
        assert again.status_code == 200, again.text
    v2 = httpx.post(
        f"{server.url}/v2/models/tiny/infer",
        json={
            "inputs": [
                {"name": "item_id", "shape": [50], "datatype": "BYTES", "data": ["i"] * 50},
                {"name": "category", "shape": [50], "datatype": "BYTES", "data": ["c"] * 50},
                {"name": "user_id", "shape": [1], "datatype": "BYTES", "data": [SECRET]},
            ]
        },
        headers={"x-request-id": "req-8"},
    )
    assert v2.status_code == 500 and "req-8" in v2.json()["error"], v2.text

    failures = [e for e in log_lines(server) if e.get("event") == "internal_error"]
    by_id = {e["request_id"]: e for e in failures}
    assert {"req-7", "req-8"} <= set(by_id)
    logged = by_id["req-7"]
    assert logged["rows"] == FAULT_ROWS + 1
    # The shape of the request's arrays, never its values.
    assert logged["inputs"]["item_id"] == [FAULT_ROWS + 1, "object"]  # type: ignore[index]
    assert SECRET not in whole_log(server)

    counted = value(scrape(server), "mmoe_requests_total", route="/predict", status="500")
    assert counted >= 1


def test_a_runtime_failure_over_grpc_is_internal_with_the_request_id(server: GrpcServer) -> None:
    request = pb.ModelInferRequest(model_name="tiny")
    for name, n in (("item_id", 60), ("category", 60), ("user_id", 1)):
        t = request.inputs.add(name=name, datatype="BYTES", shape=[n])
        t.contents.bytes_contents.extend([b"x"] * n)
    err = grpc_error(lambda: stub_call(server, "ModelInfer", request))
    assert err.code() == grpc.StatusCode.INTERNAL
    assert "logged as request" in (err.details() or "")
    samples = scrape(server)
    assert value(samples, "mmoe_requests_total", route="grpc:ModelInfer", status="INTERNAL") >= 1
    # Still serving.
    assert httpx.post(f"{server.url}/predict", json=body(2)).status_code == 200
