"""Serving a model with request context: /predict passes the context once ([1]-shaped), KServe V2
takes context inputs of shape [1] or [N], each on its own, dynamic batching merges requests with
different contexts, and every way of sending a request (any split of the features between
`context` and `candidates`) gives the scores of the same request sent flat, and PyTorch's."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from hypothesis import given, settings
from hypothesis import strategies as st
from tritonclient.utils import InferenceServerException

from mmoe.contract.metadata import read_metadata
from mmoe.service.payload import RequestDecoder
from mmoe.service.predictor import Predictor
from tests.conftest import TINY_CONTEXT
from tests.server import ServerProcess
from tests.service.test_batching import post_together, runtime_calls

N = 5
MAX_TAGS = 4  # tag_brand_list max_len in tests/data/tiny.yaml
CONTEXT: dict[str, Any] = {"user_id": "u12", "age_level": 3, "hour": 9.5, "tag_brand_list": "b1|b3"}
CANDIDATES: dict[str, list[Any]] = {
    "item_id": ["i1", "i2", "never-seen", "", "i5"],
    "category": ["c1", "c7", "c-unknown", "c3", "c1"],
    "price": [12.5, 1.0, 0.0, 1e6, None],
}


def flat(context: dict[str, Any], candidates: dict[str, list[Any]]) -> dict[str, list[Any]]:
    """The request with its context sent as candidate columns, one value per candidate."""
    n = len(next(iter(candidates.values())))
    return {**candidates, **{k: [v] * n for k, v in context.items()}}


def metadata(path: Path) -> Any:
    import onnx

    return read_metadata({p.key: p.value for p in onnx.load(str(path)).metadata_props})


# ------------------------------------------------------------------------- decoding (in-process)


def test_declared_context_is_passed_once_and_other_context_broadcast(
    tiny_context_onnx: Path,
) -> None:
    decoder = RequestDecoder(metadata(tiny_context_onnx), max_rows=100)
    context = {"user_id": "u12", "hour": 9.5, "tag_brand_list": ["b1"], "category": "c1"}
    body = {"context": context, "candidates": {"item_id": ["a", "b", "c"], "price": [1, 2, 3]}}
    decoded = decoder.decode(httpx.Request("POST", "/", json=body).content)
    shapes = {k: v.shape for k, v in decoded.feeds.items()}
    assert decoded.n == 3
    assert shapes == {
        "user_id": (1,),
        "hour": (1,),
        "tag_brand_list": (1, MAX_TAGS),
        "age_level": (1,),  # declared context, left to its default: once too
        "category": (3,),  # not declared context: broadcast, as before
        "item_id": (3,),
        "price": (3,),
    }
    assert decoded.feeds["age_level"][0] == "0" and decoded.feeds["category"].tolist() == ["c1"] * 3


def test_declared_context_may_come_as_a_column_or_in_rows(tiny_context_onnx: Path) -> None:
    decoder = RequestDecoder(metadata(tiny_context_onnx), max_rows=100)
    columns = decoder.decode(
        httpx.Request("POST", "/", json={"candidates": flat(CONTEXT, CANDIDATES)}).content
    )
    assert {v.shape[0] for v in columns.feeds.values()} == {N}
    rows = [{k: v[i] for k, v in flat(CONTEXT, CANDIDATES).items()} for i in range(N)]
    instances = decoder.decode(httpx.Request("POST", "/", json={"instances": rows}).content)
    for name, arr in columns.feeds.items():
        np.testing.assert_array_equal(instances.feeds[name], arr)


def test_context_features_split_between_context_and_candidates_are_all_per_row(
    tiny_context_onnx: Path,
) -> None:
    """The graph takes its context inputs all once or all per row: when one comes per
    candidate, the ones given once are repeated to the N rows."""
    decoder = RequestDecoder(metadata(tiny_context_onnx), max_rows=100)
    context = {"user_id": "u12", "hour": 9.5}  # age_level per candidate, tags left out
    candidates = {**CANDIDATES, "age_level": [3, 3, 4, 1, 3]}
    decoded = decoder.decode(
        httpx.Request("POST", "/", json={"context": context, "candidates": candidates}).content
    )
    assert {k: v.shape[0] for k, v in decoded.feeds.items()} == {k: N for k in decoded.feeds}
    assert decoded.feeds["user_id"].tolist() == ["u12"] * N
    assert decoded.feeds["tag_brand_list"].shape == (N, MAX_TAGS)
    assert decoded.feeds["age_level"].tolist() == ["3", "3", "4", "1", "3"]


# Values each feature may take in a drawn request (None where the feature has a default).
POOL: dict[str, list[Any]] = {
    "user_id": ["u12", "u3", "never-seen", 7],
    "item_id": ["i1", "i2", "", 42, None],
    "category": ["c1", "c7", "c-unknown"],
    "age_level": [3, "1", "9", None],
    "price": [12.5, 0.0, 1e6, -3.0, None],
    "hour": [9.5, 0.0, 23.0, None],
    "tag_brand_list": ["b1|b3", [], ["b2", "b9", "b1", "b4", "b5"], [7], None],
}


@pytest.fixture(scope="module")
def scorer(tiny_context_onnx: Path) -> tuple[RequestDecoder, Predictor]:
    predictor = Predictor(tiny_context_onnx, provider="cpu")
    return RequestDecoder(predictor.meta, max_rows=100), predictor


def scores(scorer: tuple[RequestDecoder, Predictor], body: dict[str, Any]) -> dict[str, Any]:
    decoder, predictor = scorer
    decoded = decoder.decode(httpx.Request("POST", "/", json=body).content)
    return predictor.run(decoded.feeds)


@settings(max_examples=80, deadline=None)
@given(data=st.data())
def test_any_split_between_context_and_candidates_scores_as_the_flat_request(
    scorer: tuple[RequestDecoder, Predictor], data: st.DataObject
) -> None:
    """Each feature drawn into `context` (one value: declared context or not), a column, or
    left out (if it has a default): the scores are those of the flat request, in columns and
    in rows."""
    decoder, _ = scorer
    n = data.draw(st.integers(1, 6), label="n")
    context: dict[str, Any] = {}
    columns: dict[str, list[Any]] = {}
    for f in decoder.features:
        pool = [v for v in POOL[f.name] if v is not None or not f.required]
        where = data.draw(
            st.sampled_from(["context", "column"] + ([] if f.required else ["left out"])),
            label=f.name,
        )
        if where == "context":
            context[f.name] = data.draw(st.sampled_from(pool))
        elif where == "column":
            columns[f.name] = data.draw(st.lists(st.sampled_from(pool), min_size=n, max_size=n))
    if not columns:  # a request has one column at least
        name = next(iter(context))
        columns[name] = [context.pop(name)] * n
    flat = {**columns, **{k: [v] * n for k, v in context.items()}}
    got = scores(scorer, {"context": context, "candidates": columns})
    want = scores(scorer, {"candidates": flat})
    rows = scores(scorer, {"instances": [{k: v[i] for k, v in flat.items()} for i in range(n)]})
    for name, value in want.items():
        assert got[name].shape == value.shape == (n,)
        np.testing.assert_allclose(got[name], value, atol=1e-5)
        np.testing.assert_allclose(rows[name], value, atol=1e-5)


def test_a_model_without_context_gets_every_input_broadcast(tiny_onnx: Path) -> None:
    decoder = RequestDecoder(metadata(tiny_onnx), max_rows=100)
    body = {"context": CONTEXT, "candidates": CANDIDATES}
    decoded = decoder.decode(httpx.Request("POST", "/", json=body).content)
    assert {v.shape[0] for v in decoded.feeds.values()} == {N}


# ---------------------------------------------------------------------------- a real server


@pytest.fixture(scope="module")
def server(
    tiny_context_onnx: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("context") / "server.log"
    with ServerProcess(tiny_context_onnx, log_path=log) as running:
        yield running


def predict(server: ServerProcess, body: dict[str, Any]) -> dict[str, np.ndarray]:
    r = httpx.post(f"{server.url}/predict", json=body)
    assert r.status_code == 200, r.text
    return {task: np.array(s, dtype=np.float32) for task, s in r.json()["scores"].items()}


def pytorch(run_dir: Path, rows: dict[str, list[Any]]) -> dict[str, np.ndarray]:
    from mmoe.export.parity import torch_outputs
    from mmoe.model.checkpoint import load_run

    run = load_run(run_dir)
    cols: dict[str, list[Any]] = {}
    for f in run.schema.features:
        values = rows.get(f.name, [None] * len(rows["item_id"]))
        if f.kind == "tags":  # as lists, as the service splits them
            values = [v.split(f.separator) if isinstance(v, str) else v for v in values]
        elif f.kind == "categorical":
            values = [None if v is None else str(v) for v in values]
        cols[f.name] = values
    out = torch_outputs(run.model, run.schema, cols)
    return {t.name: out[f"probs_{t.name}"] for t in run.model.tasks}


@pytest.mark.slow
@pytest.mark.parametrize("n", [1, N])
def test_predict_with_context_scores_as_flat_and_as_pytorch(
    server: ServerProcess, tiny_context_run: Path, n: int
) -> None:
    candidates = {k: v[:n] for k, v in CANDIDATES.items()}
    with_context = predict(server, {"context": CONTEXT, "candidates": candidates})
    sent_flat = predict(server, {"candidates": flat(CONTEXT, candidates)})
    expected = pytorch(tiny_context_run, flat(CONTEXT, candidates))
    for task, scores in with_context.items():
        assert scores.shape == (n,)
        np.testing.assert_allclose(scores, sent_flat[task], atol=1e-5)
        np.testing.assert_allclose(scores, expected[task], atol=1e-5)


@pytest.mark.slow
def test_every_split_of_the_context_features_scores_as_flat(server: ServerProcess) -> None:
    """Each of the 2^4 ways of sending the four context features, some in `context` and the
    others as candidate columns, over a real server: 200 and the flat request's scores."""
    want = predict(server, {"candidates": flat(CONTEXT, CANDIDATES)})
    names = list(CONTEXT)
    for mask in range(2 ** len(names)):
        once = {k: CONTEXT[k] for i, k in enumerate(names) if mask >> i & 1}
        per_row = {k: v for k, v in CONTEXT.items() if k not in once}
        got = predict(server, {"context": once, "candidates": flat(per_row, CANDIDATES)})
        for task, value in want.items():
            np.testing.assert_allclose(got[task], value, atol=1e-5, err_msg=f"once: {once}")


@pytest.mark.slow
def test_a_feature_in_both_context_and_candidates_is_refused_by_name(
    server: ServerProcess,
) -> None:
    body = {"context": {"user_id": "u1"}, "candidates": {**CANDIDATES, "user_id": ["u2"] * N}}
    r = httpx.post(f"{server.url}/predict", json=body)
    assert r.status_code == 422, r.text
    assert r.json()["error"]["field"] == "context.user_id"
    assert "give a feature once" in r.json()["error"]["reason"]


@pytest.fixture
def client(server: ServerProcess) -> Iterator[triton.InferenceServerClient]:
    c = triton.InferenceServerClient(server.url.removeprefix("http://"))
    yield c
    c.close()


def triton_inputs(rows: dict[str, list[Any]], binary: bool) -> list[triton.InferInput]:
    inputs = []
    for name, values in rows.items():
        if name in ("price", "hour"):
            arr = np.array([np.nan if v is None else v for v in values], dtype=np.float32)
            tensor = triton.InferInput(name, list(arr.shape), "FP32")
        else:
            if name == "tag_brand_list":  # [rows, max_len], padded with ""
                tags = [v.split("|") for v in values]
                cells: list[Any] = [[*t, *[""] * (MAX_TAGS - len(t))] for t in tags]
            else:
                cells = [str(v) for v in values]
            arr = np.array(cells, dtype=np.object_)
            tensor = triton.InferInput(name, list(arr.shape), "BYTES")
        tensor.set_data_from_numpy(arr, binary_data=binary)
        inputs.append(tensor)
    return inputs


@pytest.mark.slow
@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
@pytest.mark.parametrize("context_rows", ["once", "per row", "mixed"])
def test_kserve_takes_context_inputs_once_or_per_row(
    server: ServerProcess, client: triton.InferenceServerClient, binary: bool, context_rows: str
) -> None:
    candidates = {**CANDIDATES, "price": [12.5, 1.0, 0.0, 1e6, 3.0]}  # JSON has no NaN
    expected = predict(server, {"context": CONTEXT, "candidates": candidates})
    rows = {**candidates}
    for i, (k, v) in enumerate(CONTEXT.items()):
        once = context_rows == "once" or (context_rows == "mixed" and i % 2 == 0)
        rows[k] = [v] if once else [v] * N
    result = client.infer("tiny", triton_inputs(rows, binary))
    for task, scores in expected.items():
        got = result.as_numpy(f"probs_{task}")
        assert got is not None and got.shape == (N,)
        np.testing.assert_allclose(got, scores, atol=1e-5)


@pytest.mark.slow
def test_kserve_refuses_one_row_for_an_input_that_is_not_context(
    server: ServerProcess, client: triton.InferenceServerClient
) -> None:
    candidates = {**CANDIDATES, "price": [12.5, 1.0, 0.0, 1e6, 3.0]}  # JSON has no NaN
    rows = {**candidates, "category": ["c1"], **{k: [v] for k, v in CONTEXT.items()}}
    with pytest.raises(InferenceServerException, match=r"inputs\[category\]") as err:
        client.infer("tiny", triton_inputs(rows, binary=False))
    assert "only context inputs" in str(err.value) and "user_id" in str(err.value)
    rows = {**candidates, **{k: [v] * 3 for k, v in CONTEXT.items()}}
    with pytest.raises(InferenceServerException, match=r"inputs\[age_level\].*batch size 1"):
        client.infer("tiny", triton_inputs(rows, binary=False))
    # A 4xx, not a 500.
    one = {"name": "category", "shape": [1], "datatype": "BYTES", "data": ["c1"]}
    two = {"name": "item_id", "shape": [2], "datatype": "BYTES", "data": ["a", "b"]}
    body = {"inputs": [one, two]}
    r = httpx.post(f"{server.url}/v2/models/tiny/infer", json=body)
    assert r.status_code == 422 and "inputs[" in r.json()["error"], r.text


@pytest.mark.slow
def test_kserve_metadata_marks_context_inputs(client: triton.InferenceServerClient) -> None:
    inputs = client.get_model_metadata("tiny")["inputs"]
    marked = [i["name"] for i in inputs if i.get("parameters", {}).get("context")]
    assert marked == list(TINY_CONTEXT)
    by_name = {i["name"]: i for i in inputs}
    assert by_name["tag_brand_list"]["shape"] == [-1, MAX_TAGS]


@pytest.mark.slow
def test_metadata_lists_context_features(server: ServerProcess) -> None:
    features = httpx.get(f"{server.url}/metadata").json()["features"]
    assert [f["name"] for f in features if f["context"]] == list(TINY_CONTEXT)


@pytest.mark.slow
def test_dynamic_batching_merges_requests_with_different_contexts(
    start_server: Any, tiny_context_onnx: Path
) -> None:
    env = {"MMOE_BATCH_MAX_ROWS": "64", "MMOE_BATCH_WAIT_MS": "200"}
    server = start_server(tiny_context_onnx, env=env)
    sizes = [1, 7, 3, 12, 5, 9]
    bodies: list[dict[str, Any]] = [
        {
            "context": {
                "user_id": f"u{i}",
                "age_level": i % 4,
                "hour": 3.0 * i,
                "tag_brand_list": [f"b{i}"] * (i % 3),
            },
            "candidates": {
                "item_id": [f"i{i}-{j}" for j in range(n)],
                "category": [f"c{(i + j) % 9}" for j in range(n)],
                "price": [float(i * 10 + j) for j in range(n)],
            },
        }
        for i, n in enumerate(sizes)
    ]
    alone = [predict(server, body) for body in bodies]
    before = runtime_calls(server)
    together = post_together(server, bodies)
    after = runtime_calls(server)
    assert after["count"] - before["count"] < len(bodies), "no request was merged with another"
    assert after["sum"] - before["sum"] == sum(sizes)  # rows counted per candidate
    for body, want, got in zip(bodies, alone, together, strict=True):
        assert got.status_code == 200, got.text
        scores = got.json()["scores"]
        for task in want:
            np.testing.assert_allclose(scores[task], want[task], atol=1e-6)
        flat_scores = predict(server, {"candidates": flat(body["context"], body["candidates"])})
        for task in want:
            np.testing.assert_allclose(scores[task], flat_scores[task], atol=1e-5)
