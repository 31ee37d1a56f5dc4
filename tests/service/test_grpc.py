"""KServe V2 over gRPC (MMOE_GRPC_PORT): the unchanged `tritonclient.grpc` client, and a raw
stub for what it cannot send (typed contents, broken messages), against real server processes.
Scores equal /predict's; errors carry the HTTP path's text under their gRPC codes."""

from __future__ import annotations

import asyncio
import re
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton
from pydantic import ValidationError
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc
from tritonclient.utils import InferenceServerException

from mmoe.service.errors import ApiError
from mmoe.service.grpc_service import status_code
from mmoe.service.grpc_v2 import STOP_GRACE_S
from mmoe.service.settings import Settings
from tests.metrics import scrape, value
from tests.server import ServerProcess, free_port
from tests.service.test_kserve import MAX_TAGS, ROWS, predict_scores

NUMERIC = ("price", "hour")
KEY = "k3y-for-grpc-tests"
MAX_BODY = 1 << 20


class GrpcServer(ServerProcess):
    """`mmoe serve` with gRPC on a free port of its own (or the one given)."""

    def __init__(
        self,
        model: Path,
        env: dict[str, str] | None = None,
        log_path: Path | None = None,
        grpc_port: int | None = None,
    ) -> None:
        self.grpc_port = grpc_port or free_port()
        self.target = f"127.0.0.1:{self.grpc_port}"
        super().__init__(
            model, {"MMOE_GRPC_PORT": str(self.grpc_port), **(env or {})}, None, log_path
        )

    def start(self, wait_ready: bool = True, timeout: float = 60) -> GrpcServer:
        super().start(wait_ready, timeout)
        return self

    def __enter__(self) -> GrpcServer:
        return self.start()

    def client(self) -> triton.InferenceServerClient:
        return triton.InferenceServerClient(self.target)


@pytest.fixture(scope="module")
def server(tiny_onnx: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GrpcServer]:
    log = tmp_path_factory.mktemp("grpc") / "server.log"
    env = {"MMOE_MAX_BODY_BYTES": str(MAX_BODY), "MMOE_ACCESS_LOG": "true"}
    with GrpcServer(tiny_onnx, env, log) as running:
        yield running


@pytest.fixture
def client(server: GrpcServer) -> Iterator[triton.InferenceServerClient]:
    c = server.client()
    yield c
    c.close()


def tensor_values(name: str, values: list[Any]) -> np.ndarray:
    if name in NUMERIC:
        return np.array(values, dtype=np.float32)
    if name == "tag_brand_list":
        values = [[*tags, *[""] * (MAX_TAGS - len(tags))] for tags in values]
    return np.array(values, dtype=np.object_)


def triton_inputs(rows: dict[str, list[Any]]) -> list[triton.InferInput]:
    """tritonclient's tensors: it sends them as raw_input_contents."""
    inputs = []
    for name, values in rows.items():
        arr = tensor_values(name, values)
        tensor = triton.InferInput(name, list(arr.shape), "FP32" if name in NUMERIC else "BYTES")
        tensor.set_data_from_numpy(arr)
        inputs.append(tensor)
    return inputs


def typed_request(rows: dict[str, list[Any]], model: str = "tiny") -> pb.ModelInferRequest:
    """A ModelInferRequest with typed contents (fp32_contents, bytes_contents)."""
    request = pb.ModelInferRequest(model_name=model, id="typed-1")
    for name, values in rows.items():
        arr = tensor_values(name, values)
        t = request.inputs.add(name=name, shape=arr.shape)
        if name in NUMERIC:
            t.datatype = "FP32"
            t.contents.fp32_contents.extend(arr.ravel().tolist())
        else:
            t.datatype = "BYTES"
            t.contents.bytes_contents.extend(v.encode() for v in arr.ravel())
    return request


def raw_outputs(response: pb.ModelInferResponse) -> dict[str, np.ndarray]:
    return {
        o.name: np.frombuffer(raw, dtype="<f4").reshape(list(o.shape))
        for o, raw in zip(response.outputs, response.raw_output_contents, strict=True)
    }


def stub_call(server: GrpcServer, method: str, request: Any, **kwargs: Any) -> Any:
    with grpc.insecure_channel(server.target) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        return getattr(stub, method)(request, timeout=30, **kwargs)


def grpc_error(call: Callable[[], Any]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


def metrics(server: ServerProcess) -> str:
    return httpx.get(f"{server.url}/metrics").text


# ------------------------------------------------------------------------------ scoring


def test_triton_grpc_client_gets_exactly_the_predict_scores(
    server: GrpcServer, client: triton.InferenceServerClient
) -> None:
    expected = predict_scores(server, ROWS)
    outputs = [triton.InferRequestedOutput(f"probs_{t}") for t in expected]
    result = client.infer("tiny", triton_inputs(ROWS), outputs=outputs, request_id="r-1")
    response = result.get_response()
    assert response.model_name == "tiny" and response.model_version == "7"
    assert response.id == "r-1"
    assert [o.name for o in response.outputs] == ["probs_ctr", "probs_cvr"]
    for task, scores in expected.items():
        got = result.as_numpy(f"probs_{task}")
        assert got is not None and got.dtype == np.float32 and got.shape == (len(scores),)
        np.testing.assert_array_equal(got, scores)


def test_typed_contents_get_exactly_the_predict_scores(server: GrpcServer) -> None:
    expected = predict_scores(server, ROWS)
    response = stub_call(server, "ModelInfer", typed_request(ROWS))
    assert response.id == "typed-1"
    got = raw_outputs(response)
    # every output when none is asked for, logits included
    assert set(got) == {"probs_ctr", "logits_ctr", "probs_cvr", "logits_cvr"}
    for task, scores in expected.items():
        np.testing.assert_array_equal(got[f"probs_{task}"], scores)


def test_features_with_defaults_may_be_left_out(
    server: GrpcServer, client: triton.InferenceServerClient
) -> None:
    required = {k: ROWS[k] for k in ("user_id", "category")}
    expected = predict_scores(server, required)
    result = client.infer("tiny", triton_inputs(required), model_version="7")
    np.testing.assert_array_equal(result.as_numpy("probs_cvr"), expected["cvr"])


def test_health_and_metadata(client: triton.InferenceServerClient) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("tiny")
    assert client.is_model_ready("tiny", "7")
    assert not client.is_model_ready("tiny", "6")
    assert not client.is_model_ready("other")
    meta = client.get_model_metadata("tiny", as_json=True)
    assert meta["name"] == "tiny" and meta["versions"] == ["7"]
    assert meta["platform"] == "onnxruntime_onnx"
    inputs = {i["name"]: (i["datatype"], i["shape"]) for i in meta["inputs"]}
    assert inputs["user_id"] == ("BYTES", ["-1"])  # int64 shapes are strings in proto3 JSON
    assert inputs["price"] == ("FP32", ["-1"])
    assert inputs["tag_brand_list"] == ("BYTES", ["-1", str(MAX_TAGS)])
    assert {o["name"] for o in meta["outputs"]} == {
        "probs_ctr",
        "logits_ctr",
        "probs_cvr",
        "logits_cvr",
    }
    assert client.get_server_metadata(as_json=True)["name"] == "mmoe-ranking"


def test_model_metadata_matches_http(server: GrpcServer) -> None:
    over_http = httpx.get(f"{server.url}/v2/models/tiny").json()
    over_grpc = stub_call(server, "ModelMetadata", pb.ModelMetadataRequest(name="tiny"))
    assert list(over_grpc.versions) == over_http["versions"]
    for key in ("inputs", "outputs"):
        assert [(t.name, t.datatype, list(t.shape)) for t in getattr(over_grpc, key)] == [
            (t["name"], t["datatype"], t["shape"]) for t in over_http[key]
        ]


# ------------------------------------------------------------------------------- errors

# (case, the input tensors as rows, the model's features left as given): each is refused by
# HTTP with 422 and by gRPC with INVALID_ARGUMENT, with the very same message.
WITHOUT_USER = {k: v for k, v in ROWS.items() if k != "user_id"}
BAD_INPUTS: dict[str, list[dict[str, Any]]] = {
    "required-missing": [
        {"name": k, "datatype": "FP32" if k in NUMERIC else "BYTES", "values": v}
        for k, v in WITHOUT_USER.items()
        if k != "tag_brand_list"
    ],
    "unknown-input": [
        {"name": "user_id", "datatype": "BYTES", "values": ["u1"]},
        {"name": "category", "datatype": "BYTES", "values": ["c1"]},
        {"name": "colour", "datatype": "FP32", "values": [1.0]},
    ],
    "count-mismatch": [
        {"name": "user_id", "datatype": "BYTES", "values": ["u1"], "shape": [3]},
        {"name": "category", "datatype": "BYTES", "values": ["c1"]},
    ],
    "float-ids": [
        {"name": "user_id", "datatype": "FP32", "values": [1.0]},
        {"name": "category", "datatype": "BYTES", "values": ["c1"]},
    ],
    "batch-sizes-differ": [
        {"name": "user_id", "datatype": "BYTES", "values": ["u1", "u2"]},
        {"name": "category", "datatype": "BYTES", "values": ["c1"]},
    ],
    "tags-not-2d": [
        {"name": "user_id", "datatype": "BYTES", "values": ["u1"]},
        {"name": "category", "datatype": "BYTES", "values": ["c1"]},
        {"name": "tag_brand_list", "datatype": "BYTES", "values": ["b1"]},
    ],
    "three-dimensions": [
        {"name": "user_id", "datatype": "BYTES", "values": ["u1"], "shape": [1, 1, 1]},
        {"name": "category", "datatype": "BYTES", "values": ["c1"]},
    ],
    "id-too-long": [
        {"name": "user_id", "datatype": "BYTES", "values": ["x" * 5000]},
        {"name": "category", "datatype": "BYTES", "values": ["c1"]},
    ],
    "fp32-overflow": [
        {"name": "user_id", "datatype": "BYTES", "values": ["u1"]},
        {"name": "category", "datatype": "BYTES", "values": ["c1"]},
        {"name": "price", "datatype": "FP64", "values": [1e300]},
    ],
}
_TYPED_FIELD = {"BYTES": "bytes_contents", "FP32": "fp32_contents", "FP64": "fp64_contents"}


def _shape(t: dict[str, Any]) -> list[int]:
    return t.get("shape", [len(t["values"])])


def _typed(tensors: list[dict[str, Any]]) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="tiny")
    for t in tensors:
        entry = request.inputs.add(name=t["name"], datatype=t["datatype"], shape=_shape(t))
        values = t["values"]
        if t["datatype"] == "BYTES":
            values = [v.encode() for v in values]
        getattr(entry.contents, _TYPED_FIELD[t["datatype"]]).extend(values)
    return request


def _raw(tensors: list[dict[str, Any]]) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="tiny")
    for t in tensors:
        request.inputs.add(name=t["name"], datatype=t["datatype"], shape=_shape(t))
        if t["datatype"] == "BYTES":
            blob = b"".join(struct.pack("<I", len(v.encode())) + v.encode() for v in t["values"])
        else:
            dtype = "<f4" if t["datatype"] == "FP32" else "<f8"
            blob = np.array(t["values"], dtype=dtype).tobytes()
        request.raw_input_contents.append(blob)
    return request


def _http(tensors: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "inputs": [
            {"name": t["name"], "datatype": t["datatype"], "shape": _shape(t), "data": t["values"]}
            for t in tensors
        ]
    }


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_invalid_argument_with_the_http_text(server: GrpcServer, case: str) -> None:
    tensors = BAD_INPUTS[case]
    r = httpx.post(f"{server.url}/v2/models/tiny/infer", json=_http(tensors))
    assert r.status_code == 422, r.text
    http_error = r.json()["error"]
    assert http_error.startswith("inputs"), http_error  # it names the input
    for build in (_typed, _raw):
        err = grpc_error(partial(stub_call, server, "ModelInfer", build(tensors)))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (build.__name__, err)
        assert err.details() == http_error, build.__name__


def test_triton_client_sees_an_error_naming_the_input(
    client: triton.InferenceServerClient,
) -> None:
    with pytest.raises(InferenceServerException, match=r"inputs\[user_id\]") as missing:
        client.infer("tiny", triton_inputs(WITHOUT_USER))
    assert missing.value.status() == "StatusCode.INVALID_ARGUMENT"


def test_unknown_model_or_version_is_not_found(server: GrpcServer) -> None:
    rows = {k: ROWS[k] for k in ("user_id", "category")}
    err = grpc_error(lambda: stub_call(server, "ModelInfer", typed_request(rows, "other")))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert err.details() == "unknown model 'other'; serving 'tiny'"
    request = typed_request(rows)
    request.model_version = "6"
    err = grpc_error(lambda: stub_call(server, "ModelInfer", request))
    assert err.code() == grpc.StatusCode.NOT_FOUND and "version '7'" in err.details()
    err = grpc_error(
        lambda: stub_call(server, "ModelMetadata", pb.ModelMetadataRequest(name="other"))
    )
    assert err.code() == grpc.StatusCode.NOT_FOUND


def _mixed_contents() -> pb.ModelInferRequest:
    request = _raw(BAD_INPUTS["unknown-input"][:2])
    request.inputs[0].contents.bytes_contents.append(b"u1")
    return request


def _raw_count_mismatch() -> pb.ModelInferRequest:
    request = _raw(BAD_INPUTS["unknown-input"][:2])
    del request.raw_input_contents[1]
    return request


def _wrong_contents_field() -> pb.ModelInferRequest:
    request = _typed(BAD_INPUTS["unknown-input"][:2])
    request.inputs.add(name="price", datatype="FP32", shape=[1]).contents.fp64_contents.append(1)
    return request


def _fp16_typed() -> pb.ModelInferRequest:
    request = _typed(BAD_INPUTS["unknown-input"][:2])
    request.inputs.add(name="price", datatype="FP16", shape=[1])
    return request


def _no_values() -> pb.ModelInferRequest:
    request = _typed(BAD_INPUTS["unknown-input"][:2])
    request.inputs.add(name="price", datatype="FP32", shape=[1])
    return request


def _truncated_bytes() -> pb.ModelInferRequest:
    request = _raw(BAD_INPUTS["unknown-input"][:2])
    request.raw_input_contents[0] = struct.pack("<I", 9) + b"u1"
    return request


def _unknown_output() -> pb.ModelInferRequest:
    request = _typed(BAD_INPUTS["unknown-input"][:2])
    request.outputs.add(name="probs_nothing")
    return request


GRPC_ONLY = {
    "contents-and-raw": (_mixed_contents, "inputs[user_id]: give raw_input_contents or contents"),
    "raw-count-mismatch": (_raw_count_mismatch, "raw_input_contents: 1 entries for 2 inputs"),
    "wrong-contents-field": (_wrong_contents_field, "inputs[price]: FP32 values go in"),
    "fp16-typed": (_fp16_typed, "inputs[price]: FP16 has no typed contents"),
    "no-values": (_no_values, "inputs[price]: no values"),
    "truncated-bytes": (_truncated_bytes, "inputs[user_id]: truncated BYTES element"),
    "unknown-output": (_unknown_output, "outputs[probs_nothing]: unknown output"),
}


@pytest.mark.parametrize("case", list(GRPC_ONLY))
def test_what_only_grpc_can_get_wrong(server: GrpcServer, case: str) -> None:
    build, message = GRPC_ONLY[case]
    err = grpc_error(lambda: stub_call(server, "ModelInfer", build()))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details().startswith(message), err.details()


def test_a_message_that_is_not_protobuf_is_invalid_argument(server: GrpcServer) -> None:
    with grpc.insecure_channel(server.target) as channel:
        call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        err = grpc_error(lambda: call(b"\xff\xff\xff", timeout=30))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid ModelInferRequest" in err.details()


def test_a_message_over_the_body_limit_is_refused(server: GrpcServer) -> None:
    request = typed_request({"user_id": ["u" * 1000] * (MAX_BODY // 1000 + 10)})
    err = grpc_error(lambda: stub_call(server, "ModelInfer", request))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_the_rest_of_the_protocol_is_unimplemented(server: GrpcServer) -> None:
    err = grpc_error(lambda: stub_call(server, "ModelConfig", pb.ModelConfigRequest(name="tiny")))
    assert err.code() == grpc.StatusCode.UNIMPLEMENTED


def test_grpc_calls_are_counted_and_logged_like_http(server: GrpcServer) -> None:
    stub_call(server, "ModelInfer", typed_request(ROWS), metadata=[("x-request-id", "trace-7")])
    grpc_error(lambda: stub_call(server, "ModelInfer", typed_request({"no_such_input": ["x"]})))
    samples = scrape(server)
    infer = {"route": "grpc:ModelInfer"}
    assert value(samples, "mmoe_requests_total", **infer, status="OK") > 0
    assert value(samples, "mmoe_requests_total", **infer, status="INVALID_ARGUMENT") > 0
    assert value(samples, "mmoe_request_latency_seconds_count", **infer) > 0
    # The answered calls carry the model that answered them.
    assert value(samples, "mmoe_requests_total", **infer, model="tiny", version="7") > 0
    deadline = time.monotonic() + 10
    while '"request_id": "trace-7"' not in server.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    line = next(x for x in server.log().splitlines() if '"request_id": "trace-7"' in x)
    assert '"status": "OK"' in line and "ModelInfer" in line


# ------------------------------------------------------------------- other server settings


@pytest.fixture(scope="module")
def keyed(tiny_onnx: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GrpcServer]:
    log = tmp_path_factory.mktemp("grpc-key") / "server.log"
    with GrpcServer(tiny_onnx, {"MMOE_API_KEY": KEY}, log) as running:
        yield running


def test_the_api_key_is_needed_to_infer(keyed: GrpcServer) -> None:
    rows = {k: ROWS[k] for k in ("user_id", "category")}
    client = keyed.client()
    try:
        for headers in ({}, {"x-api-key": "wrong"}, {"authorization": "Bearer wrong"}):
            with pytest.raises(InferenceServerException, match="API key") as refused:
                client.infer("tiny", triton_inputs(rows), headers=headers)
            assert refused.value.status() == "StatusCode.UNAUTHENTICATED"
        for headers in ({"x-api-key": KEY}, {"authorization": f"Bearer {KEY}"}):
            result = client.infer("tiny", triton_inputs(rows), headers=headers)
            assert result.as_numpy("probs_ctr") is not None
        assert client.is_server_ready() and client.is_model_ready("tiny")  # health stays open
    finally:
        client.close()
    assert KEY not in keyed.log()


@pytest.mark.slow
def test_overload_is_unavailable_with_retry_after(tiny_onnx: Path, tmp_path: Path) -> None:
    """One runtime call at a time, one waiting, 1 ms to score: of 8 concurrent calls of 4096
    rows, some are shed (queue full or timeout), each as UNAVAILABLE, never anything else."""
    env = {
        "MMOE_INFERENCE_WORKERS": "1",
        "MMOE_MAX_QUEUE": "1",
        "MMOE_REQUEST_TIMEOUT_MS": "1",
    }
    server = GrpcServer(tiny_onnx, env, tmp_path / "server.log")
    rows = 4096
    request = typed_request(
        {"user_id": [f"u{i}" for i in range(rows)], "category": ["c1"] * rows}
    ).SerializeToString()

    async def burst() -> list[grpc.aio.AioRpcError | bytes]:
        async with grpc.aio.insecure_channel(server.target) as channel:
            call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
            return await asyncio.gather(
                *(call(request, timeout=30) for _ in range(8)), return_exceptions=True
            )

    with server:
        results = asyncio.run(burst())
        errors = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
        assert errors, "nothing was shed"
        assert all(isinstance(r, bytes | grpc.aio.AioRpcError) for r in results), results
        for err in errors:
            assert err.code() == grpc.StatusCode.UNAVAILABLE, err
            assert "retry later" in err.details()
            assert ("retry-after", "1") in tuple(err.trailing_metadata() or ())
        assert 'route="grpc:ModelInfer",status="UNAVAILABLE"' in metrics(server)
        assert "mmoe_shed_total" in metrics(server)


@pytest.mark.slow
def test_before_a_model_loads_the_server_is_live_but_unavailable(tmp_path: Path) -> None:
    server = GrpcServer(tmp_path / "not-yet.onnx", None, tmp_path / "server.log")
    server.start(wait_ready=False)
    try:
        client = server.client()
        assert client.is_server_live()
        assert not client.is_server_ready()
        assert not client.is_model_ready("tiny")
        client.close()
        err = grpc_error(lambda: stub_call(server, "ModelInfer", typed_request(ROWS)))
        assert err.code() == grpc.StatusCode.UNAVAILABLE
        assert "not-yet.onnx" in err.details()
    finally:
        server.stop()


@pytest.mark.slow
def test_two_processes_share_the_grpc_port(tiny_onnx: Path, tmp_path: Path) -> None:
    """SO_REUSEPORT: a second server binds the same gRPC port (as each worker of a
    multi-process server would), and the kernel spreads connections over both."""
    first = GrpcServer(tiny_onnx, None, tmp_path / "first.log")
    second = GrpcServer(tiny_onnx, None, tmp_path / "second.log", grpc_port=first.grpc_port)
    with first, second:
        for _ in range(24):  # a new connection each time
            with grpc.insecure_channel(first.target) as channel:
                stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
                assert stub.ServerLive(pb.ServerLiveRequest(), timeout=30).live
        for server in (first, second):
            counted = value(scrape(server), "mmoe_requests_total", route="grpc:ServerLive")
            assert counted > 0, server.log()


@pytest.mark.slow
def test_a_grpc_port_in_use_stops_the_start(tiny_onnx: Path, tmp_path: Path) -> None:
    with socket.socket() as taken:  # a listener without SO_REUSEPORT: nobody may share it
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = GrpcServer(tiny_onnx, None, tmp_path / "server.log", grpc_port=port)
        with pytest.raises(RuntimeError, match="exited"):
            server.start()
    # The whole log: every worker logs the failure, with its traceback, before the server stops.
    assert server.log_path is not None
    assert f"cannot serve gRPC: 127.0.0.1:{port} cannot be bound" in server.log_path.read_text()


@pytest.mark.slow
def test_sigterm_lets_a_grpc_call_finish_then_exits(tiny_onnx: Path, tmp_path: Path) -> None:
    """A call still in progress at SIGTERM is answered (the batcher holds it for 1.5 s, waiting
    for company), then the server exits."""
    env = {"MMOE_BATCH_MAX_ROWS": "1024", "MMOE_BATCH_WAIT_MS": "1500"}
    server = GrpcServer(tiny_onnx, env, tmp_path / "server.log").start()
    rows = {k: ROWS[k] for k in ("user_id", "category")}

    async def call_then_stop() -> tuple[pb.ModelInferResponse, float]:
        async with grpc.aio.insecure_channel(server.target) as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            assert (await stub.ServerLive(pb.ServerLiveRequest(), timeout=30)).live
            start = time.monotonic()
            pending = asyncio.ensure_future(stub.ModelInfer(typed_request(rows), timeout=30))
            await asyncio.sleep(0.3)
            server.signal(signal.SIGTERM)
            return await pending, time.monotonic() - start

    response, seconds = asyncio.run(call_then_stop())
    assert seconds >= 1.4  # it was held past the signal, not answered before it
    assert len(raw_outputs(response)["probs_ctr"]) == len(ROWS["user_id"])
    assert server.proc is not None
    assert server.proc.wait(30 + STOP_GRACE_S) in (0, -signal.SIGTERM)
    assert "Application shutdown complete" in server.log()


# ---------------------------------------------------------------------------- in-process


def test_grpcio_is_loaded_only_when_the_port_is_set() -> None:
    """grpcio and the protocol's messages cost about 0.25 s of start-up."""
    code = (
        "import sys; from mmoe.service.app import create_app; create_app(); "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('grpc', 'tritonclient')))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_the_grpc_port_must_not_be_the_http_port() -> None:
    with pytest.raises(ValidationError, match="grpc_port"):
        Settings(port=8000, grpc_port=8000)
    assert Settings().grpc_port is None


@pytest.mark.parametrize(
    ("status", "code"),
    [
        (400, grpc.StatusCode.INVALID_ARGUMENT),
        (401, grpc.StatusCode.UNAUTHENTICATED),
        (404, grpc.StatusCode.NOT_FOUND),
        (408, grpc.StatusCode.INVALID_ARGUMENT),
        (413, grpc.StatusCode.INVALID_ARGUMENT),
        (415, grpc.StatusCode.INVALID_ARGUMENT),
        (422, grpc.StatusCode.INVALID_ARGUMENT),
        (503, grpc.StatusCode.UNAVAILABLE),
    ],
)
def test_http_statuses_map_to_grpc_codes(status: int, code: grpc.StatusCode) -> None:
    assert status_code(ApiError(status, "x", "reason")) is code


def test_the_docs_example_runs(server: GrpcServer, capsys: pytest.CaptureFixture[str]) -> None:
    """docs/grpc.md's client example, against the tiny model (same feature names)."""
    docs = (Path(__file__).resolve().parents[2] / "docs" / "grpc.md").read_text()
    (example,) = re.findall(r"```python\n(.*?)```", docs, re.DOTALL)
    assert '"localhost:8001"' in example and 'infer("demo"' in example
    example = example.replace('"localhost:8001"', repr(server.target))
    exec(example.replace('infer("demo"', 'infer("tiny"'), {})
    printed = capsys.readouterr().out
    scores = np.array(printed.strip(" []\n").split(), dtype=np.float32)
    expected: dict[str, list[Any]] = {
        "user_id": ["u93", "u93"],
        "item_id": ["i1", "i2"],
        "category": ["c1", "c2"],
    }
    expected["price"] = [12.5, 3.0]
    np.testing.assert_allclose(scores, predict_scores(server, expected)["ctr"], atol=1e-6)


def test_context_inputs_sent_once_score_as_predict(tiny_context_onnx: Path, tmp_path: Path) -> None:
    """A model with declared context takes those inputs with one row over gRPC too, and scores
    them as /predict does with the same values in `context`."""
    context = {"user_id": "u3", "age_level": "3", "hour": 9.0, "tag_brand_list": ["b1", "b2"]}
    candidates = {k: v for k, v in ROWS.items() if k not in context}
    with GrpcServer(tiny_context_onnx, log_path=tmp_path / "server.log") as server:
        r = httpx.post(
            f"{server.url}/predict",
            json={"context": context, "candidates": candidates},
            timeout=30,
        )
        assert r.status_code == 200, r.text
        want = {t: np.array(s, dtype=np.float32) for t, s in r.json()["scores"].items()}
        once = {k: [v] for k, v in context.items()}
        meta = stub_call(server, "ModelMetadata", pb.ModelMetadataRequest(name="tiny"))
        assert {i.name for i in meta.inputs} >= set(context)
        with server.client() as client:
            result = client.infer("tiny", triton_inputs({**candidates, **once}))
        for task, scores in want.items():
            np.testing.assert_allclose(result.as_numpy(f"probs_{task}"), scores, atol=1e-6)
        # Some context inputs once, the others per row: the same scores.
        n = len(candidates["item_id"])
        mixed = {k: [v] if i % 2 else [v] * n for i, (k, v) in enumerate(context.items())}
        with server.client() as client:
            result = client.infer("tiny", triton_inputs({**candidates, **mixed}))
        for task, scores in want.items():
            np.testing.assert_allclose(result.as_numpy(f"probs_{task}"), scores, atol=1e-5)
        # A per-row input sent with one row is refused by name.
        one_row = {**candidates, "item_id": ["i1"], **once}
        err = grpc_error(lambda: stub_call(server, "ModelInfer", typed_request(one_row)))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "inputs[item_id]" in (err.details() or "")
