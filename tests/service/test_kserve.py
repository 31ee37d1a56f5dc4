"""The KServe V2 / Triton HTTP protocol under /v2: the unchanged `tritonclient.http` client gets
the scores /predict gives, with JSON tensors and with binary tensors."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from tests.metrics import scrape, value
from tests.server import ServerProcess

MAX_TAGS = 4  # tag_brand_list max_len in tests/data/tiny.yaml
ROWS: dict[str, list[Any]] = {
    "user_id": ["u12", "u3", "nobody", "u12", "u40"],
    "item_id": ["i1", "i2", "never-seen", "", "i5"],
    "category": ["c1", "c7", "c-unknown", "c3", "c1"],
    "age_level": ["3", "0", "1", "3", "6"],
    "price": [12.5, 1.0, 0.0, 1e6, -3.0],
    "hour": [0.0, 6.0, 12.5, 23.0, 18.0],
    "tag_brand_list": [["b1", "b2"], [], ["b7", "b8", "b9"], ["b4"], ["b1", "b2", "b3", "b4"]],
}
N = 5


@pytest.fixture(scope="module")
def server(tiny_onnx: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("kserve") / "server.log"
    with ServerProcess(tiny_onnx, log_path=log) as running:
        yield running


@pytest.fixture
def client(server: ServerProcess) -> Iterator[triton.InferenceServerClient]:
    c = triton.InferenceServerClient(server.url.removeprefix("http://"))
    yield c
    c.close()


def predict_scores(server: ServerProcess, rows: dict[str, list[Any]]) -> dict[str, np.ndarray]:
    r = httpx.post(f"{server.url}/predict", json={"candidates": rows}, timeout=30)
    assert r.status_code == 200, r.text
    return {task: np.array(s, dtype=np.float32) for task, s in r.json()["scores"].items()}


def triton_inputs(rows: dict[str, list[Any]], binary: bool) -> list[triton.InferInput]:
    inputs = []
    for name, values in rows.items():
        if name in ("price", "hour"):
            arr = np.array(values, dtype=np.float32)
            tensor = triton.InferInput(name, list(arr.shape), "FP32")
        else:
            if name == "tag_brand_list":
                values = [[*tags, *[""] * (MAX_TAGS - len(tags))] for tags in values]
            arr = np.array(values, dtype=np.object_)
            tensor = triton.InferInput(name, list(arr.shape), "BYTES")
        tensor.set_data_from_numpy(arr, binary_data=binary)
        inputs.append(tensor)
    return inputs


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_triton_client_gets_the_predict_scores(
    server: ServerProcess, client: triton.InferenceServerClient, binary: bool
) -> None:
    expected = predict_scores(server, ROWS)
    outputs = [triton.InferRequestedOutput(f"probs_{t}", binary_data=binary) for t in expected]
    result = client.infer("tiny", triton_inputs(ROWS, binary), outputs=outputs, request_id="r-1")
    response = result.get_response()
    assert response["model_name"] == "tiny" and response["model_version"] == "7"
    assert response["id"] == "r-1"
    assert [o["name"] for o in response["outputs"]] == ["probs_ctr", "probs_cvr"]
    for task, scores in expected.items():
        got = result.as_numpy(f"probs_{task}")
        assert got is not None and got.dtype == np.float32 and got.shape == (N,)
        np.testing.assert_allclose(got, scores, rtol=0, atol=1e-6)


def test_triton_client_leaves_out_features_that_have_defaults(
    server: ServerProcess, client: triton.InferenceServerClient
) -> None:
    required = {k: ROWS[k] for k in ("user_id", "category")}
    expected = predict_scores(server, required)
    result = client.infer("tiny", triton_inputs(required, binary=True), model_version="7")
    np.testing.assert_allclose(result.as_numpy("probs_cvr"), expected["cvr"], rtol=0, atol=1e-6)
    # every output comes back when none is asked for, logits included
    assert {o["name"] for o in result.get_response()["outputs"]} == {
        "probs_ctr",
        "logits_ctr",
        "probs_cvr",
        "logits_cvr",
    }


def test_triton_client_health_and_model_metadata(client: triton.InferenceServerClient) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("tiny")
    assert client.is_model_ready("tiny", "7")
    assert not client.is_model_ready("other")
    meta = client.get_model_metadata("tiny")
    assert meta["name"] == "tiny" and meta["versions"] == ["7"]
    inputs = {i["name"]: (i["datatype"], i["shape"]) for i in meta["inputs"]}
    assert inputs["user_id"] == ("BYTES", [-1])
    assert inputs["price"] == ("FP32", [-1])
    assert inputs["tag_brand_list"] == ("BYTES", [-1, MAX_TAGS])
    assert {o["name"] for o in meta["outputs"]} >= {"probs_ctr", "probs_cvr"}
    server_meta = client.get_server_metadata()
    assert "binary_tensor_data" in server_meta["extensions"]


def test_triton_client_sees_errors_that_name_the_input(
    client: triton.InferenceServerClient,
) -> None:
    without_user = {k: v for k, v in ROWS.items() if k != "user_id"}
    with pytest.raises(InferenceServerException, match="user_id") as missing:
        client.infer("tiny", triton_inputs(without_user, binary=True))
    assert missing.value.status() == "422"
    with pytest.raises(InferenceServerException, match="unknown model 'other'"):
        client.infer("other", triton_inputs(ROWS, binary=True))
    with pytest.raises(InferenceServerException, match="version"):
        client.infer("tiny", triton_inputs(ROWS, binary=True), model_version="6")


def test_v2_routes_over_plain_http(server: ServerProcess) -> None:
    with httpx.Client(base_url=f"{server.url}/v2") as http:
        assert http.get("/health/live").json() == {"live": True}
        assert http.get("/health/ready").json() == {"ready": True}
        assert http.get("/models/tiny/ready").json() == {"name": "tiny", "ready": True}
        assert http.get("/models/tiny/versions/7").json()["platform"] == "onnxruntime_onnx"
        r = http.get("/models/nope")
        assert r.status_code == 404 and "nope" in r.json()["error"]
        body = {
            "inputs": [
                {"name": "user_id", "shape": [2], "datatype": "BYTES", "data": ["u1", "u2"]},
                {"name": "category", "shape": [2, 1], "datatype": "BYTES", "data": ["c1", "c2"]},
                {"name": "price", "shape": [2], "datatype": "FP64", "data": [2.5, 7]},
            ],
            "outputs": [{"name": "probs_ctr"}],
        }
        r = http.post("/models/tiny/infer", json=body)
        assert r.status_code == 200, r.text
        out = r.json()["outputs"]
        assert [(o["name"], o["datatype"], o["shape"]) for o in out] == [("probs_ctr", "FP32", [2])]
    expected = predict_scores(
        server, {"user_id": ["u1", "u2"], "category": ["c1", "c2"], "price": [2.5, 7.0]}
    )
    np.testing.assert_allclose(out[0]["data"], expected["ctr"], rtol=0, atol=1e-6)
    counted = value(
        scrape(server), "mmoe_requests_total", route="/v2/models/{name}/infer", status="200"
    )
    assert counted > 0
