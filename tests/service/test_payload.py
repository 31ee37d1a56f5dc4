"""Request decoding in-process: a /predict body -> the graph's input arrays, or a PayloadError that
names the field and the reason (the server tests cover the same through HTTP)."""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson
import pytest

from mmoe.contract.metadata import FeatureInfo, ModelMetadata, TaskInfo
from mmoe.service.errors import PayloadError
from mmoe.service.payload import Decoded, RequestDecoder

FEATURES = [
    FeatureInfo(name="user", kind="categorical", dtype="string"),
    FeatureInfo(name="item", kind="categorical", dtype="string", default=""),
    FeatureInfo(name="price", kind="numeric", dtype="float32", default=1.0),
    FeatureInfo(name="hour", kind="numeric", dtype="float32"),
    FeatureInfo(name="tags", kind="tags", dtype="string", default=[], separator="|", max_len=3),
]
META = ModelMetadata(
    name="m",
    version="1",
    features=FEATURES,
    tasks=[
        TaskInfo(name="ctr", kind="binary", output="probs_ctr"),
        TaskInfo(name="cvr", kind="binary", output="probs_cvr"),
    ],
)


def decode(body: dict[str, Any] | bytes, max_rows: int = 8, **kwargs: Any) -> Decoded:
    raw = body if isinstance(body, bytes) else orjson.dumps(body)
    return RequestDecoder(META, max_rows=max_rows, **kwargs).decode(raw)


def refused(body: dict[str, Any] | bytes, **kwargs: Any) -> PayloadError:
    with pytest.raises(PayloadError) as err:
        decode(body, **kwargs)
    return err.value


COLUMNS = {
    "context": {"user": "u1", "hour": 9},
    "candidates": {
        "item": ["a", 7, None],
        "price": [2.5, None, 3],
        "tags": [["t1", "t2"], "t3|t4|t5|t6", []],
    },
}
ROWS = {
    "instances": [
        {"user": "u1", "hour": 9, "item": "a", "price": 2.5, "tags": ["t1", "t2"]},
        {"user": "u1", "hour": 9, "item": 7, "tags": "t3|t4|t5|t6"},
        {"user": "u1", "hour": 9, "item": None, "price": 3, "tags": []},
    ]
}


def test_columns_become_the_graph_inputs() -> None:
    got = decode(COLUMNS)
    assert got.n == 3 and got.tasks == ["ctr", "cvr"]
    assert got.feeds["user"].tolist() == ["u1"] * 3  # context broadcast to every candidate
    assert got.feeds["item"].tolist() == ["a", "7", ""]  # an int id is its decimal string
    price = got.feeds["price"]
    assert price.dtype == np.float32 and price[0] == 2.5 and price[2] == 3
    assert np.isnan(price[1])  # the graph puts the default in place of NaN
    assert got.feeds["hour"].tolist() == [9.0] * 3
    assert got.feeds["tags"].tolist() == [["t1", "t2", ""], ["t3", "t4", "t5"], ["", "", ""]]


def test_rows_decode_to_the_same_arrays_as_columns() -> None:
    by_rows, by_columns = decode(ROWS), decode(COLUMNS)
    assert by_rows.n == by_columns.n
    for name, column in by_columns.feeds.items():
        np.testing.assert_array_equal(by_rows.feeds[name], column, err_msg=name)


def test_omitted_features_with_a_default_take_it() -> None:
    got = decode({"candidates": {"user": ["u1", "u2"], "hour": [1, 2]}})
    assert got.feeds["item"].tolist() == ["", ""]
    assert np.isnan(got.feeds["price"]).all()
    assert got.feeds["tags"].shape == (2, 3)


def test_tasks_selects_some() -> None:
    assert decode({**COLUMNS, "tasks": ["cvr"]}).tasks == ["cvr"]


@pytest.mark.parametrize(
    ("body", "field", "reason"),
    [
        ({"candidates": {"user": ["u"]}}, "candidates.hour", "required feature missing"),
        ({"candidates": {"user": ["u", "v"], "hour": [1]}}, "candidates.hour", "has 1 values"),
        ({"candidates": {"user": ["u", None], "hour": [1, 2]}}, "candidates.user[1]", "null"),
        ({"candidates": {"user": ["u"], "hour": [None]}}, "candidates.hour[0]", "null"),
        ({"candidates": {"user": ["u"], "hour": [1e39]}}, "candidates.hour[0]", "float32"),
        ({"candidates": {"user": ["u"], "hour": ["9"]}}, "candidates.hour[0]", "Expected"),
        ({"candidates": {"user": ["u"], "hour": [1], "nope": [1]}}, "candidates.nope", "unknown"),
        ({"candidates": {"user": []}}, "candidates", "empty batch"),
        ({"context": {"user": "u"}}, "candidates", "required"),
        ({"instances": [{"user": "u"}]}, "instances[0].hour", "required feature missing"),
        ({**ROWS, "candidates": {"user": ["u"]}}, "instances", "not both"),
        (
            {"context": {"user": "u"}, "candidates": {"user": ["v"], "hour": [1]}},
            "context.user",
            "also given in candidates",
        ),
        ({**COLUMNS, "tasks": ["nope"]}, "tasks[0]", "['ctr', 'cvr']"),
    ],
)
def test_bad_bodies_name_the_field_and_the_reason(
    body: dict[str, Any], field: str, reason: str
) -> None:
    err = refused(body)
    assert (err.field, err.status) == (field, 422), (err.field, err.status, err.reason)
    assert reason in err.reason, err.reason


def test_unknown_features_can_be_dropped_instead() -> None:
    body = {"candidates": {"user": ["u"], "hour": [1], "nope": [1]}}
    assert "nope" not in decode(body, unknown_features="ignore").feeds


@pytest.mark.parametrize(
    "body", [{"candidates": {"user": ["u"] * 9, "hour": [1] * 9}}, {"instances": [{}] * 9}]
)
def test_more_rows_than_the_limit_is_413(body: dict[str, Any]) -> None:
    err = refused(body, max_rows=8)
    assert (err.status, err.code) == (413, "too_many_rows"), err.reason


DUP = "duplicate_key"


@pytest.mark.parametrize(
    ("raw", "status", "code"),
    [
        (b'{"candidates": ', 400, "malformed_json"),
        (b'{"candidates": {"hour": [NaN]}}', 400, "malformed_json"),
        (b'{"candidates": {"user": ["\xff"], "hour": [1]}}', 400, "malformed_json"),
        (b'{"candidates": {"user": ["u"], "user": ["v"], "hour": [1]}}', 422, "duplicate_key"),
        # colons inside values: the cheap count cannot tell, the exact check does
        (b'{"candidates": {"user": ["u:1"], "user": ["v"], "hour": [1]}}', 422, "duplicate_key"),
        (
            b'{"context": {"user": "a:b", "user": "c"}, "candidates": {"hour": [1]}}',
            422,
            "duplicate_key",
        ),
        (
            b'{"tasks": ["ctr"], "tasks": ["ctr"], "candidates": {"hour": [1]}}',
            422,
            "duplicate_key",
        ),
    ],
)
def test_malformed_bodies(raw: bytes, status: int, code: str) -> None:
    err = refused(raw)
    assert (err.status, err.code) == (status, code), err.reason


def test_values_holding_colons_are_not_taken_for_keys() -> None:
    body = {"context": {"user": "a:b"}, "candidates": {"hour": [1, 2]}}
    assert decode(body).feeds["user"].tolist()[0] == "a:b"
