"""POST /predict on a real server: the columnar and row forms, context broadcast, defaults, task
selection, and scores equal to onnxruntime run in-process on the arrays the request stands for."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnxruntime as ort
import pytest

from tests.server import ServerProcess

CONTEXT = {"user_id": "u12", "age_level": 3}
CANDIDATES: dict[str, list[Any]] = {
    "item_id": ["i1", "i2", "never-seen", "", "i5", 42],
    "category": ["c1", "c7", "c-unknown", "c3", "c1", "c2"],
    "price": [12.5, None, 0.0, 1e6, -3.0, 7],
    "hour": [0, 6, 12.5, 23, 18, 9],
    "tag_brand_list": [["b1", "b2"], [], "b7|b8|b9", None, ["b1", "b2", "b3", "b4", "b5"], [7]],
}
N = 6
MAX_TAGS = 4  # tag_brand_list max_len in tests/data/tiny.yaml


@pytest.fixture(scope="module")
def server(tiny_onnx: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One server for the tests that do not change settings (starting one takes seconds)."""
    log = tmp_path_factory.mktemp("predict") / "server.log"
    with ServerProcess(tiny_onnx, log_path=log) as running:
        yield running


def predict(server: ServerProcess, body: dict[str, Any]) -> dict[str, Any]:
    r = httpx.post(f"{server.url}/predict", json=body, timeout=30)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/json"
    result: dict[str, Any] = r.json()
    return result


def assert_same_scores(a: dict[str, list[float]], b: dict[str, list[float]]) -> None:
    assert set(a) == set(b)
    for task in a:
        np.testing.assert_allclose(a[task], b[task], rtol=0, atol=1e-6)


def tags_row(value: Any) -> list[str]:
    tokens = [] if value is None else value.split("|") if isinstance(value, str) else value
    tokens = [str(t) for t in tokens][:MAX_TAGS]
    return tokens + [""] * (MAX_TAGS - len(tokens))


def expected_scores(model: Path) -> dict[str, np.ndarray]:
    """What the graph gives for CONTEXT + CANDIDATES, with the defaults of tiny.yaml filled in
    by hand: the arrays the service must build from the request."""
    feeds = {
        "user_id": np.array([CONTEXT["user_id"]] * N, dtype=object),
        "age_level": np.array([str(CONTEXT["age_level"])] * N, dtype=object),
        "item_id": np.array([str(v) for v in CANDIDATES["item_id"]], dtype=object),
        "category": np.array(CANDIDATES["category"], dtype=object),
        "price": np.array([np.nan if v is None else v for v in CANDIDATES["price"]], np.float32),
        "hour": np.array(CANDIDATES["hour"], dtype=np.float32),
        "tag_brand_list": np.array(
            [tags_row(v) for v in CANDIDATES["tag_brand_list"]], dtype=object
        ),
    }
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    names = ["probs_ctr", "probs_cvr"]
    ctr, cvr = session.run(names, feeds)
    return {"ctr": ctr, "cvr": cvr}


def test_columnar_scores_equal_onnxruntime_in_candidate_order(
    server: ServerProcess, tiny_onnx: Path
) -> None:
    body = predict(server, {"context": CONTEXT, "candidates": CANDIDATES})
    assert body["model"] == {"name": "tiny", "version": "7"}
    assert body["n"] == N
    assert set(body["scores"]) == {"ctr", "cvr"}
    expected = expected_scores(tiny_onnx)
    for task in ("ctr", "cvr"):
        got = np.array(body["scores"][task])
        assert got.shape == (N,)
        np.testing.assert_allclose(got, expected[task], rtol=0, atol=1e-6)
    # the candidates differ, so equal scores in another order would be caught
    assert len(set(np.round(expected["ctr"], 7))) == N


def test_each_candidate_scored_alone_gets_its_own_score(server: ServerProcess) -> None:
    batch = predict(server, {"context": CONTEXT, "candidates": CANDIDATES})["scores"]
    for i in range(N):
        one = {k: [v[i]] for k, v in CANDIDATES.items()}
        alone = predict(server, {"context": CONTEXT, "candidates": one})["scores"]
        for task in ("ctr", "cvr"):
            assert alone[task][0] == pytest.approx(batch[task][i], abs=1e-6)


def test_row_form_equals_columnar_form(server: ServerProcess) -> None:
    columnar = predict(server, {"context": CONTEXT, "candidates": CANDIDATES})
    instances = [{**CONTEXT, **{k: v[i] for k, v in CANDIDATES.items()}} for i in range(N)]
    rows = predict(server, {"instances": instances})
    assert rows["n"] == N
    assert_same_scores(rows["scores"], columnar["scores"])


def test_context_broadcasts_like_a_repeated_column(server: ServerProcess) -> None:
    broadcast = predict(server, {"context": CONTEXT, "candidates": CANDIDATES})
    repeated = {**CANDIDATES, **{k: [v] * N for k, v in CONTEXT.items()}}
    columns = predict(server, {"candidates": repeated})
    assert_same_scores(columns["scores"], broadcast["scores"])


def test_omitted_features_take_their_defaults(server: ServerProcess) -> None:
    required_only = {"user_id": ["u3", "u4"], "category": ["c1", "c2"]}
    omitted = predict(server, {"candidates": required_only})
    nulls = {
        **required_only,
        "item_id": [None, None],
        "price": [None, None],
        "hour": [None, None],
        "tag_brand_list": [None, None],
    }
    explicit = {
        **required_only,
        "item_id": ["", ""],
        "age_level": ["0", "0"],
        "price": [1.0, 1.0],
        "hour": [12.0, 12.0],
        "tag_brand_list": [[], []],
    }
    expected = predict(server, {"candidates": explicit})["scores"]
    assert_same_scores(omitted["scores"], expected)
    assert_same_scores(predict(server, {"candidates": nulls})["scores"], expected)


def test_values_in_their_other_accepted_forms_score_the_same(server: ServerProcess) -> None:
    as_strings = {
        "user_id": ["u12", "u12", "u3"],
        "category": ["c1", "c2", "c1"],
        "item_id": ["42", "7", "-3"],
        "tag_brand_list": [["b1", "b2"], [], ["b3"]],
    }
    other_forms = {  # integer ids, alone or mixed with strings; a tag string with separators
        **as_strings,
        "item_id": [42, "7", -3],
        "tag_brand_list": ["b1|b2", [], "b3"],
    }
    assert predict(server, {"candidates": {**as_strings, "item_id": [42, 7, -3]}}) == predict(
        server, {"candidates": as_strings}
    )
    a = predict(server, {"candidates": as_strings})["scores"]
    b = predict(server, {"candidates": other_forms})["scores"]
    assert_same_scores(a, b)


def test_tasks_selects_which_scores_come_back(server: ServerProcess) -> None:
    both = predict(server, {"context": CONTEXT, "candidates": CANDIDATES})["scores"]
    only_cvr = predict(server, {"context": CONTEXT, "candidates": CANDIDATES, "tasks": ["cvr"]})
    assert_same_scores(only_cvr["scores"], {"cvr": both["cvr"]})

    r = httpx.post(
        f"{server.url}/predict",
        json={"context": CONTEXT, "candidates": CANDIDATES, "tasks": ["ctr", "clicks"]},
    )
    assert r.status_code == 422
    error = r.json()["error"]
    assert error["field"] == "tasks[1]"
    assert "ctr" in error["reason"] and "cvr" in error["reason"]


def test_unknown_categorical_values_are_scored_not_refused(server: ServerProcess) -> None:
    body = predict(
        server,
        {"candidates": {"user_id": ["nobody-ever"], "category": ["brand-new"]}},
    )
    assert body["n"] == 1
    assert 0.0 < body["scores"]["ctr"][0] < 1.0


def test_unknown_feature_is_refused_or_ignored_as_configured(
    server: ServerProcess, start_server: Any, tiny_onnx: Path
) -> None:
    body = {"candidates": {"user_id": ["u1"], "category": ["c1"], "colour": ["red"]}}
    r = httpx.post(f"{server.url}/predict", json=body)
    assert r.status_code == 422
    assert r.json()["error"]["field"] == "candidates.colour"

    lenient = start_server(tiny_onnx, env={"MMOE_UNKNOWN_FEATURES": "ignore"})
    r = httpx.post(f"{lenient.url}/predict", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["n"] == 1


def test_row_and_body_limits_are_settings(start_server: Any, tiny_onnx: Path) -> None:
    server = start_server(
        tiny_onnx, env={"MMOE_MAX_BATCH_ROWS": "3"}, args=["--max-body-bytes", "2048"]
    )
    rows = {"user_id": ["u1"] * 4, "category": ["c1"] * 4}
    r = httpx.post(f"{server.url}/predict", json={"candidates": rows})
    assert r.status_code == 413
    assert r.json()["error"]["code"] == "too_many_rows"
    assert r.json()["error"]["field"].startswith("candidates")

    big = {"user_id": ["u" * 1000] * 3, "category": ["c1"] * 3}
    r = httpx.post(f"{server.url}/predict", json={"candidates": big})
    assert r.status_code == 413
    assert r.json()["error"]["code"] == "body_too_large"

    three = {"user_id": ["u1"] * 3, "category": ["c1"] * 3}
    assert httpx.post(f"{server.url}/predict", json={"candidates": three}).status_code == 200
