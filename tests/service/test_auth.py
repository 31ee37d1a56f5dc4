"""MMOE_API_KEY: scoring (/predict, /v2/.../infer) and /admin/* need the key, as
`Authorization: Bearer` or `x-api-key`; health, readiness and metrics do not."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from tests.server import ServerProcess

KEY = "k3y-for-tests"
BODY = {"candidates": {"user_id": ["u1", "u2"], "category": ["c1", "c2"]}}
V2_BODY = {
    "inputs": [
        {"name": "user_id", "shape": [1], "datatype": "BYTES", "data": ["u1"]},
        {"name": "category", "shape": [1], "datatype": "BYTES", "data": ["c1"]},
    ]
}


@pytest.fixture(scope="module")
def server(tiny_onnx: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("auth") / "server.log"
    env = {"MMOE_API_KEY": KEY, "MMOE_ACCESS_LOG": "true"}
    with ServerProcess(tiny_onnx, env, log_path=log) as running:
        yield running


PROTECTED = [
    ("/predict", BODY),
    ("/v2/models/tiny/infer", V2_BODY),
    ("/v2/models/tiny/versions/7/infer", V2_BODY),
    ("/admin/reload", {}),
]


@pytest.mark.parametrize(("path", "body"), PROTECTED, ids=[p for p, _ in PROTECTED])
def test_protected_routes_need_the_key(server: ServerProcess, path: str, body: object) -> None:
    url = server.url + path
    for headers in (
        {},
        {"x-api-key": "wrong"},
        {"authorization": "Bearer wrong"},
        {"authorization": KEY},  # no scheme
        {"authorization": f"Basic {KEY}"},
        {"x-api-key": KEY[:-1]},
    ):
        r = httpx.post(url, json=body, headers=headers)
        assert r.status_code == 401, (headers, r.text)
        assert r.headers["www-authenticate"] == "Bearer"
        assert "API key" in r.text
    for headers in (
        {"x-api-key": KEY},
        {"authorization": f"Bearer {KEY}"},
        {"authorization": f"bearer {KEY}"},
    ):
        r = httpx.post(url, json=body, headers=headers, timeout=60)
        assert r.status_code == 200, (headers, r.text)


def test_kserve_errors_keep_the_v2_shape(server: ServerProcess) -> None:
    r = httpx.post(f"{server.url}/v2/models/tiny/infer", json=V2_BODY)
    assert r.status_code == 401
    error = r.json()["error"]
    assert isinstance(error, str) and "API key" in error


def test_health_metrics_and_metadata_are_open(server: ServerProcess) -> None:
    for path in (
        "/livez",
        "/readyz",
        "/metrics",
        "/metadata",
        "/docs",
        "/v2/health/live",
        "/v2/health/ready",
        "/v2/models/tiny",
        "/v2/models/tiny/ready",
    ):
        assert httpx.get(server.url + path).status_code == 200, path


def test_triton_client_sends_the_key_as_a_header(server: ServerProcess) -> None:
    client = triton.InferenceServerClient(server.url.removeprefix("http://"))
    tensors = []
    for name in ("user_id", "category"):
        t = triton.InferInput(name, [1], "BYTES")
        t.set_data_from_numpy(np.array(["x1"], dtype=np.object_))
        tensors.append(t)
    try:
        with pytest.raises(InferenceServerException, match="API key") as refused:
            client.infer("tiny", tensors)
        assert refused.value.status() == "401"
        result = client.infer("tiny", tensors, headers={"Authorization": f"Bearer {KEY}"})
        assert result.as_numpy("probs_ctr") is not None
    finally:
        client.close()


def test_the_key_is_never_shown(server: ServerProcess) -> None:
    httpx.post(f"{server.url}/predict", json=BODY, headers={"x-api-key": KEY})
    for path in ("/metadata", "/metrics", "/openapi.json"):
        assert KEY not in httpx.get(server.url + path).text
    assert KEY not in server.log()
