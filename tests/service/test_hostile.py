"""Hostile requests against a real server: each is refused with a 4xx that names the reason, the
server's memory stays bounded, and the next normal request is scored.

The corpus covers /predict, the KServe V2 infer endpoint and the HTTP layer under them (request
heads, chunked bodies, stalled clients). Valid-but-odd input (emoji, RTL marks, an escaped NUL,
negative integer ids) is not hostile: it is scored like any unknown id, and tested as such.
"""

from __future__ import annotations

import json
import select
import socket
import struct
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from dataclasses import field as _field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.metrics import scrape, value
from tests.server import ServerProcess

MAX_BODY = 4 * 1024 * 1024
ENV = {"MMOE_MAX_BODY_BYTES": str(MAX_BODY), "MMOE_CLIENT_TIMEOUT_S": "1"}
JSON = {"content-type": "application/json"}
OK_BODY = {"candidates": {"user_id": ["u1", "u2"], "category": ["c1", "c2"]}}


def _cands(**columns: Any) -> bytes:
    return json.dumps({"candidates": {"user_id": ["u1"], "category": ["c1"], **columns}}).encode()


@dataclass
class Hostile:
    """One request and what the server must answer."""

    name: str
    body: bytes
    status: int
    code: str
    field: str | None = None  # the field the error must name (None: not checked)
    headers: dict[str, str] = _field(default_factory=lambda: dict(JSON))


NESTED = 100_000
PREDICT = [
    # Structure
    Hostile("nested-arrays", b"[" * NESTED + b"]" * NESTED, 422, "invalid_request"),
    Hostile(
        "nested-objects",
        b'{"candidates":' * 20_000 + b"{}" + b"}" * 20_000,
        422,
        "invalid_request",
        "candidates.candidates",
    ),
    Hostile(
        "nested-in-a-column",
        b'{"candidates":{"user_id":' + b"[" * NESTED + b"]" * NESTED + b"}}",
        422,
        "invalid_request",
        "candidates.user_id[0]",
    ),
    Hostile("empty-body", b"", 400, "malformed_json"),
    Hostile("truncated", json.dumps(OK_BODY).encode()[:-7], 400, "malformed_json"),
    Hostile("trailing-garbage", json.dumps(OK_BODY).encode() + b"}", 400, "malformed_json"),
    Hostile("two-documents", json.dumps(OK_BODY).encode() * 2, 400, "malformed_json"),
    Hostile("top-level-array", b"[]", 422, "invalid_request"),
    Hostile("top-level-null", b"null", 422, "invalid_request"),
    Hostile(
        "byte-order-mark", b"\xef\xbb\xbf" + json.dumps(OK_BODY).encode(), 400, "malformed_json"
    ),
    # Size: 10^6 elements are refused by the row limit, or by the body limit when bigger
    Hostile(
        "1e6-element-column",
        b'{"candidates":{"user_id":[' + b",".join([b"0"] * 10**6) + b'],"category":["c"]}}',
        413,
        "too_many_rows",
        "candidates.user_id",
    ),
    Hostile(
        "1e6-instances",
        b'{"instances":[' + b",".join([b"{}"] * 10**6) + b"]}",
        413,
        "too_many_rows",
        "instances",
    ),
    Hostile(
        "1e6-element-column-over-body-limit",
        b'{"candidates":{"user_id":[' + b",".join([b'"user_000000"'] * 10**6) + b"]}}",
        413,
        "body_too_large",
    ),
    Hostile(
        "huge-string-over-body-limit", _cands(item_id=["x" * (MAX_BODY + 1)]), 413, "body_too_large"
    ),
    Hostile(
        "huge-id", _cands(item_id=["x" * 100_000]), 422, "invalid_request", "candidates.item_id[0]"
    ),
    Hostile(
        "huge-tag-string",
        _cands(tag_brand_list=["b|" * 500_000]),
        422,
        "invalid_request",
        "candidates.tag_brand_list[0]",
    ),
    Hostile(
        "huge-tag",
        _cands(tag_brand_list=[["x" * 5000]]),
        422,
        "invalid_request",
        "candidates.tag_brand_list[0][0]",
    ),
    # Content types
    Hostile(
        "text-plain",
        json.dumps(OK_BODY).encode(),
        415,
        "unsupported_media_type",
        "content-type",
        {"content-type": "text/plain"},
    ),
    Hostile(
        "form",
        b"user_id=u1&category=c1",
        415,
        "unsupported_media_type",
        "content-type",
        {"content-type": "application/x-www-form-urlencoded"},
    ),
    Hostile(
        "multipart",
        b"--x\r\n\r\n--x--",
        415,
        "unsupported_media_type",
        "content-type",
        {"content-type": "multipart/form-data; boundary=x"},
    ),
    Hostile(
        "octet-stream",
        json.dumps(OK_BODY).encode(),
        415,
        "unsupported_media_type",
        "content-type",
        {"content-type": "application/octet-stream"},
    ),
    # Unicode that is not valid
    Hostile("lone-high-surrogate", _cands(item_id=["\ud800"]), 400, "malformed_json"),
    Hostile("lone-low-surrogate", _cands(item_id=["a\udc00b"]), 400, "malformed_json"),
    Hostile("invalid-utf8-value", _cands().replace(b'"u1"', b'"\xff\xfe"'), 400, "malformed_json"),
    Hostile(
        "invalid-utf8-key", _cands().replace(b'"category"', b'"categ\xc3"'), 400, "malformed_json"
    ),
    Hostile("overlong-utf8", _cands().replace(b'"u1"', b'"\xc0\xaf"'), 400, "malformed_json"),
    Hostile("raw-nul-byte", _cands().replace(b'"u1"', b'"u\x001"'), 400, "malformed_json"),
    Hostile("raw-control-char", _cands().replace(b'"u1"', b'"u\n1"'), 400, "malformed_json"),
    # Numbers
    Hostile(
        "nan-literal", _cands().replace(b'"c1"]', b'"c1"],"price":[NaN]'), 400, "malformed_json"
    ),
    Hostile(
        "infinity-literal",
        _cands().replace(b'"c1"]', b'"c1"],"price":[Infinity]'),
        400,
        "malformed_json",
    ),
    Hostile(
        "minus-infinity-literal",
        _cands().replace(b'"c1"]', b'"c1"],"price":[-Infinity]'),
        400,
        "malformed_json",
    ),
    Hostile("nan-string", _cands(price=["NaN"]), 422, "invalid_request", "candidates.price[0]"),
    Hostile(
        "float32-overflow", _cands(price=[1e39]), 422, "invalid_request", "candidates.price[0]"
    ),
    Hostile(
        "float64-overflow",
        _cands().replace(b'"c1"]', b'"c1"],"price":[1e400]'),
        422,
        "invalid_request",
        "candidates.price[0]",
    ),
    Hostile(
        "int-of-5000-digits",
        _cands().replace(b'"u1"]', b'"u1"],"item_id":[' + b"9" * 5000 + b"]"),
        422,
        "invalid_request",
        "candidates.item_id[0]",
    ),
    # Duplicate keys (JSON parsers keep one silently; the server refuses them)
    Hostile(
        "duplicate-column",
        b'{"candidates":{"user_id":["u1"],"category":["c1"],"user_id":["u2"]}}',
        422,
        "duplicate_key",
        "user_id",
    ),
    Hostile(
        "duplicate-escaped-key",
        b'{"candidates":{"user_id":["u1"],"category":["c1"],"user\\u005fid":["u2"]}}',
        422,
        "duplicate_key",
        "user_id",
    ),
    Hostile(
        "duplicate-top-level",
        b'{"candidates":{"user_id":["u1"],"category":["c1"]},'
        b'"candidates":{"user_id":["u2"],"category":["c2"]}}',
        422,
        "duplicate_key",
        "candidates",
    ),
    Hostile(
        "duplicate-in-context",
        b'{"context":{"user_id":"u1","user_id":"u2"},"candidates":{"category":["c1"]}}',
        422,
        "duplicate_key",
        "user_id",
    ),
    Hostile(
        "duplicate-in-an-instance",
        b'{"instances":[{"user_id":"u1","category":"c1"},'
        b'{"user_id":"u1","category":"c1","category":"c2"}]}',
        422,
        "duplicate_key",
        "category",
    ),
    # Categorical ids of the wrong kind
    Hostile("float-id", _cands(item_id=[1.5]), 422, "invalid_request", "candidates.item_id[0]"),
    Hostile(
        "integral-float-id", _cands(item_id=[3.0]), 422, "invalid_request", "candidates.item_id[0]"
    ),
    Hostile("bool-id", _cands(item_id=[True]), 422, "invalid_request", "candidates.item_id[0]"),
    Hostile(
        "object-id", _cands(item_id=[{"a": 1}]), 422, "invalid_request", "candidates.item_id[0]"
    ),
    # Lists where scalars belong, and the reverse
    Hostile(
        "list-in-context",
        json.dumps({"context": {"user_id": ["u1"]}, "candidates": {"category": ["c1"]}}).encode(),
        422,
        "invalid_request",
        "context.user_id",
    ),
    Hostile(
        "nested-list-in-column",
        _cands(item_id=[["a"]]),
        422,
        "invalid_request",
        "candidates.item_id[0]",
    ),
    Hostile(
        "scalar-for-column",
        json.dumps({"candidates": {"user_id": "u1", "category": ["c1"]}}).encode(),
        422,
        "invalid_request",
        "candidates.user_id",
    ),
    Hostile(
        "scalar-for-tags-list",
        _cands(tag_brand_list=[[["b"]]]),
        422,
        "invalid_request",
        "candidates.tag_brand_list[0][0]",
    ),
    Hostile(
        "object-for-candidates", b'{"candidates":[["u1"]]}', 422, "invalid_request", "candidates"
    ),
    Hostile(
        "scalar-for-instances",
        b'{"instances":{"user_id":"u1"}}',
        422,
        "invalid_request",
        "instances",
    ),
    Hostile(
        "string-for-tasks",
        _cands().replace(b"}}", b'},"tasks":"ctr"}'),
        422,
        "invalid_request",
        "tasks",
    ),
]


def _tensor(name: str, shape: list[int], datatype: str, data: Any = None, **params: Any) -> dict:
    t: dict[str, Any] = {"name": name, "shape": shape, "datatype": datatype}
    if data is not None:
        t["data"] = data
    if params:
        t["parameters"] = params
    return t


IDS = [_tensor("user_id", [1], "BYTES", ["u1"]), _tensor("category", [1], "BYTES", ["c1"])]


def _infer(*extra: dict, inputs: list[dict] | None = None) -> bytes:
    return json.dumps({"inputs": [*(IDS if inputs is None else inputs), *extra]}).encode()


def _binary(tensors: list[dict], blob: bytes, header: str | None = None) -> tuple[bytes, dict]:
    head = json.dumps({"inputs": tensors}).encode()
    return head + blob, {
        "content-type": "application/octet-stream",
        "inference-header-content-length": str(len(head)) if header is None else header,
    }


def _bytes_elements(*values: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(v)) + v for v in values)


def _kserve_binary(
    name: str, tensors: list[dict], blob: bytes, status: int, header: str | None = None
) -> Hostile:
    body, headers = _binary(tensors, blob, header)
    return Hostile(name, body, status, "", None, headers)


U1 = _bytes_elements(b"u1")
KSERVE = [
    Hostile(
        "nested-data",
        b'{"inputs":[{"name":"user_id","shape":[1],"datatype":"BYTES",'
        b'"data":' + b"[" * NESTED + b"]" * NESTED + b"}]}",
        400,
        "",
    ),
    Hostile(
        "nested-parameters",
        b'{"inputs":[],"parameters":{"p":' + b"[" * NESTED + b"]" * NESTED + b"}}",
        400,
        "",
    ),
    Hostile("invalid-utf8-json", _infer().replace(b'"u1"', b'"\xff"'), 400, ""),
    Hostile("ragged-data", _infer(_tensor("price", [1], "FP32", [[1.0], [2.0, 3.0]])), 422, ""),
    Hostile(
        "three-dimensions",
        _infer(inputs=[_tensor("user_id", [1, 1, 1], "BYTES", ["u"]), IDS[1]]),
        422,
        "",
    ),
    Hostile(
        "wrapping-shape",
        _infer(inputs=[_tensor("user_id", [2**62, 2**62], "BYTES", []), IDS[1]]),
        422,
        "",
    ),
    Hostile(
        "empty-data-huge-shape",
        _infer(inputs=[_tensor("user_id", [0, 2**62], "BYTES", []), IDS[1]]),
        422,
        "",
    ),
    Hostile(
        "negative-dimension",
        _infer(inputs=[_tensor("user_id", [-1], "BYTES", ["u"]), IDS[1]]),
        422,
        "",
    ),
    Hostile(
        "count-mismatch", _infer(inputs=[_tensor("user_id", [3], "BYTES", ["u"]), IDS[1]]), 422, ""
    ),
    Hostile(
        "float-datatype-for-ids",
        _infer(inputs=[_tensor("user_id", [1], "FP32", [1.0]), IDS[1]]),
        422,
        "",
    ),
    Hostile("bytes-datatype-for-numbers", _infer(_tensor("price", [1], "BYTES", ["1"])), 422, ""),
    Hostile("unknown-datatype", _infer(_tensor("price", [1], "BF16", [1.0])), 422, ""),
    Hostile(
        "bool-datatype", _infer(inputs=[_tensor("user_id", [1], "BOOL", [True]), IDS[1]]), 422, ""
    ),
    Hostile("strings-as-fp32", _infer(_tensor("price", [1], "FP32", ["a"])), 422, ""),
    Hostile("fp32-overflow", _infer(_tensor("price", [1], "FP64", [1e300])), 422, ""),
    Hostile(
        "huge-bytes-value",
        _infer(inputs=[_tensor("user_id", [1], "BYTES", ["x" * 5000]), IDS[1]]),
        422,
        "",
    ),
    Hostile(
        "duplicate-key",
        _infer().replace(b'"datatype": "BYTES"', b'"datatype": "BYTES", "datatype": "FP32"', 1),
        422,
        "",
    ),
    Hostile("unknown-input", _infer(_tensor("nope", [1], "FP32", [1.0])), 422, ""),
    Hostile("input-twice", _infer(IDS[0]), 422, ""),
    Hostile("tags-not-2d", _infer(_tensor("tag_brand_list", [1], "BYTES", ["b"])), 422, ""),
    Hostile(
        "1e6-rows", _infer(inputs=[_tensor("user_id", [10**6], "INT64", [0] * 10**6)]), 413, ""
    ),
    _kserve_binary(
        "binary-non-utf8",
        [_tensor("user_id", [1], "BYTES", binary_data_size=6), IDS[1]],
        _bytes_elements(b"\xff\xfe"),
        422,
    ),
    _kserve_binary(
        "binary-size-past-end",
        [_tensor("user_id", [1], "BYTES", binary_data_size=10**9), IDS[1]],
        U1,
        422,
    ),
    _kserve_binary(
        "binary-size-negative",
        [_tensor("user_id", [1], "BYTES", binary_data_size=-1), IDS[1]],
        U1,
        422,
    ),
    _kserve_binary(
        "binary-size-bool",
        [_tensor("user_id", [1], "BYTES", binary_data_size=True), IDS[1]],
        U1,
        422,
    ),
    _kserve_binary(
        "binary-size-float",
        [_tensor("user_id", [1], "BYTES", binary_data_size=1.5), IDS[1]],
        U1,
        422,
    ),
    _kserve_binary(
        "binary-element-length-lie",
        [_tensor("user_id", [1], "BYTES", binary_data_size=5), IDS[1]],
        struct.pack("<I", 2**32 - 1) + b"x",
        422,
    ),
    _kserve_binary(
        "binary-fp32-wrong-size",
        [*IDS, _tensor("price", [1], "FP32", binary_data_size=3)],
        b"\0\0\0",
        422,
    ),
    _kserve_binary("header-length-not-a-number", IDS, b"", 400, header="12a"),
    _kserve_binary("header-length-past-end", IDS, b"", 400, header="999999"),
    _kserve_binary("header-length-negative", IDS, b"", 400, header="-1"),
    _kserve_binary("header-length-cuts-json", IDS, b"", 400, header="5"),
    Hostile("text-plain", _infer(), 415, "", None, {"content-type": "text/plain"}),
]
# Valid, if odd: scored (unknown ids fall in the out-of-vocabulary bucket), never an error.
ODD_BUT_VALID = {
    "escaped-nul": ["u\u00001"],
    "rtl-override": ["\u202eu1\u202c"],
    "emoji": ["\U0001f600\u200d\U0001f525"],
    "combining-marks": ["e\u0301\u0301\u0301"],
    "private-use": ["\ue000"],
    "negative-int-id": [-5],
    "int64-extremes": [-(2**63)],
}


@pytest.fixture(scope="module")
def hostile_server(
    tiny_onnx: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("hostile") / "server.log"
    with ServerProcess(tiny_onnx, ENV, log_path=log) as server:
        yield server


def rss_kib(server: ServerProcess, key: str = "VmRSS") -> int:
    """All the server's processes together (with workers, a request reaches any of them)."""
    return server.rss_kib(key)


def assert_still_serves(server: ServerProcess) -> None:
    r = httpx.post(server.url + "/predict", json=OK_BODY, timeout=30)
    assert r.status_code == 200, r.text
    assert len(r.json()["scores"]["ctr"]) == 2


def send(server: ServerProcess, path: str, case: Hostile) -> httpx.Response:
    return httpx.post(server.url + path, content=case.body, headers=case.headers, timeout=60)


@pytest.mark.parametrize("case", PREDICT, ids=[c.name for c in PREDICT])
def test_predict_refuses(hostile_server: ServerProcess, case: Hostile) -> None:
    r = send(hostile_server, "/predict", case)
    assert r.status_code == case.status, r.text
    error = r.json()["error"]
    assert error["code"] == case.code, error
    assert error["reason"]
    if case.field is not None:
        assert error["field"] == case.field, error
    assert_still_serves(hostile_server)


@pytest.mark.parametrize("case", KSERVE, ids=[c.name for c in KSERVE])
def test_kserve_infer_refuses(hostile_server: ServerProcess, case: Hostile) -> None:
    model = httpx.get(hostile_server.url + "/readyz").json()["model"]
    r = send(hostile_server, f"/v2/models/{model}/infer", case)
    assert r.status_code == case.status, r.text
    assert isinstance(r.json()["error"], str) and r.json()["error"]  # the V2 error shape
    assert_still_serves(hostile_server)


@pytest.mark.parametrize("ids", ODD_BUT_VALID.values(), ids=list(ODD_BUT_VALID))
def test_odd_but_valid_ids_are_scored(hostile_server: ServerProcess, ids: list[Any]) -> None:
    r = httpx.post(hostile_server.url + "/predict", content=_cands(item_id=ids), headers=JSON)
    assert r.status_code == 200, r.text
    assert 0.0 < r.json()["scores"]["ctr"][0] < 1.0


@pytest.mark.slow
def test_memory_stays_bounded_under_the_whole_corpus(hostile_server: ServerProcess) -> None:
    """Two more passes over every hostile body: the first settles the allocator, the second must
    not grow the resident set (no leak), and the peak stays far below what an unbounded
    decoder would need."""
    model = httpx.get(hostile_server.url + "/readyz").json()["model"]

    def one_pass() -> None:
        for case in PREDICT:
            assert send(hostile_server, "/predict", case).status_code == case.status
        for case in KSERVE:
            assert send(hostile_server, f"/v2/models/{model}/infer", case).status_code < 500

    one_pass()
    settled = rss_kib(hostile_server)
    one_pass()
    after = rss_kib(hostile_server)
    peak = rss_kib(hostile_server, "VmHWM")
    print(f"RSS settled {settled} KiB, after {after} KiB, peak {peak} KiB")
    assert after - settled < 16 * 1024, (settled, after)
    assert peak < 1024 * 1024, peak  # 1 GiB: the bodies total well over that
    assert_still_serves(hostile_server)
    assert hostile_server.log_path is not None
    log = hostile_server.log_path.read_text()
    assert "Traceback" not in log and "Warning:" not in log, log[-3000:]  # only JSON lines


# ------------------------------------------------------------------- the HTTP layer, raw


def exchange(
    server: ServerProcess, head: bytes, chunks: Sequence[bytes] = (), wait: float = 10
) -> bytes:
    """Send a raw request (the head, then chunks until the server answers or stops reading) and
    return the server's one response."""
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=wait) as sock:
        sock.sendall(head)
        sock.settimeout(1)
        for chunk in chunks:
            if select.select([sock], [], [], 0)[0]:
                break  # answered early: stop sending
            try:
                sock.sendall(chunk)
            except OSError:  # the server stopped reading, or closed
                break
        sock.settimeout(wait)
        answer = b""
        while not _complete(answer):
            try:
                data = sock.recv(65536)
            except OSError:
                break
            if not data:
                break
            answer += data
        return answer


def _complete(answer: bytes) -> bool:
    head, sep, body = answer.partition(b"\r\n\r\n")
    for line in head.lower().split(b"\r\n"):
        if sep and line.startswith(b"content-length:"):
            return len(body) >= int(line.split(b":")[1])
    return False


def status_and_error(answer: bytes) -> tuple[int, dict[str, Any]]:
    head, _, body = answer.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, json.loads(body)["error"]


def _chunked(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


POST = b"POST /predict HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"


def test_chunked_body_over_the_limit_without_content_length(hostile_server: ServerProcess) -> None:
    head = POST + b"transfer-encoding: chunked\r\n\r\n"
    chunks = [_chunked(b'{"candidates":{"user_id":["' + b"x" * 65536)]
    chunks += [_chunked(b"x" * 65536)] * (MAX_BODY // 65536 + 16) + [b"0\r\n\r\n"]
    status, error = status_and_error(exchange(hostile_server, head, chunks))
    assert (status, error["code"]) == (413, "body_too_large")
    assert_still_serves(hostile_server)


def test_declared_length_over_the_limit_is_refused_before_the_body(
    hostile_server: ServerProcess,
) -> None:
    head = POST + b"content-length: %d\r\n\r\n" % (10**12)
    status, error = status_and_error(exchange(hostile_server, head))
    assert (status, error["code"]) == (413, "body_too_large")
    assert_still_serves(hostile_server)


def test_huge_request_head_is_refused(hostile_server: ServerProcess) -> None:
    before = rss_kib(hostile_server)
    head = b"GET /livez HTTP/1.1\r\nhost: x\r\nx-big: "
    chunks = [b"a" * 65536] * 512 + [b"\r\n\r\n"]  # 32 MiB of one header
    status, error = status_and_error(exchange(hostile_server, head, chunks))
    assert (status, error["code"]) == (431, "request_head_too_large")
    assert rss_kib(hostile_server) - before < 16 * 1024  # not buffered
    assert_still_serves(hostile_server)


def test_stalled_head_is_timed_out(hostile_server: ServerProcess) -> None:
    status, error = status_and_error(
        exchange(hostile_server, b"GET /livez HTTP/1.1\r\nhost: x\r\n")
    )
    assert (status, error["code"]) == (408, "request_timeout")
    status, error = status_and_error(exchange(hostile_server, b""))  # connects, sends nothing
    assert (status, error["code"]) == (408, "request_timeout")


def test_stalled_body_is_timed_out(hostile_server: ServerProcess) -> None:
    head = POST + b"content-length: 100\r\n\r\n"
    status, error = status_and_error(exchange(hostile_server, head, [b'{"candidates":']))
    assert (status, error["code"]) == (408, "request_timeout")
    assert_still_serves(hostile_server)


def _requests_counted(server: ServerProcess, status: str) -> float:
    return value(scrape(server), "mmoe_requests_total", route="/predict", status=status)


def test_client_leaving_mid_body_is_counted_as_499_not_an_error(
    hostile_server: ServerProcess,
) -> None:
    """Nobody is left to answer: counted as 499 (client closed request), nothing logged as a
    server error, and the server goes on."""
    before = _requests_counted(hostile_server, "499")
    host, port = hostile_server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(POST + b"content-length: 100\r\n\r\n" + b'{"candidates":')
        time.sleep(0.2)  # the server is waiting for the rest of the body
    deadline = time.monotonic() + 10
    while _requests_counted(hostile_server, "499") == before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _requests_counted(hostile_server, "499") == before + 1
    assert _requests_counted(hostile_server, "500") == 0
    assert_still_serves(hostile_server)
    assert hostile_server.log_path is not None
    assert "Traceback" not in hostile_server.log_path.read_text()


def test_deep_nesting_under_an_ignored_unknown_feature(start_server: Any, tiny_onnx: Path) -> None:
    server = start_server(tiny_onnx, env={"MMOE_UNKNOWN_FEATURES": "ignore"})
    body = _cands().replace(b'"u1"]', b'"u1"],"extra":' + b"[" * NESTED + b"]" * NESTED)
    r = httpx.post(server.url + "/predict", content=body, headers=JSON)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "malformed_json"
    assert_still_serves(server)
