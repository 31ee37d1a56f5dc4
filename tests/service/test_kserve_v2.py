"""service/kserve_v2.py in-process: V2 tensors -> feeds, as both transports decode them."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from mmoe.contract.metadata import FeatureInfo
from mmoe.service.errors import PayloadError
from mmoe.service.kserve_v2 import feeds, tensor_array
from mmoe.service.payload import MAX_ID_CHARS, column_array

TAGS = FeatureInfo(name="tags", kind="tags", dtype="string", max_len=4, separator="|", default=[])
USER = FeatureInfo(name="user", kind="categorical", dtype="string")


def _rule(arr: np.ndarray) -> np.ndarray:
    """The tag rule applied row by row (payload.column_array), the reference."""
    return column_array(TAGS, [list(row) for row in arr], "tags")


@pytest.mark.parametrize("width", [1, 3, 4, 6])
def test_tag_tensors_get_the_tag_rule_in_bulk_or_not(width: int) -> None:
    rng = np.random.default_rng(width)
    for _ in range(200):
        arr = rng.choice(np.array(["", "", "b1", "b2", "b3"], dtype=object), size=(5, width))
        got = feeds({"tags": TAGS}, {"tags": arr}, 100).feeds["tags"]
        np.testing.assert_array_equal(got, _rule(arr))
        assert got.shape == (5, TAGS.max_len)


def _raw(*values: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(v)) + v for v in values)


def test_raw_bytes_and_values_decode_alike() -> None:
    values = ["u1", "ünïcode", "", "x" * MAX_ID_CHARS]
    from_raw = tensor_array("f", "BYTES", [4], raw=_raw(*(v.encode() for v in values)))
    from_values = tensor_array("f", "BYTES", [4], values=[v.encode() for v in values])
    from_json = tensor_array("f", "BYTES", [4], values=values)
    for arr in (from_raw, from_values, from_json):
        assert arr.tolist() == values


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (_raw(b"u1")[:-1], "truncated BYTES element"),
        (_raw(b"u1") + b"\x01\x00", "truncated BYTES element"),
        (_raw(b"\xff"), "UTF-8"),
        (_raw(b"x" * (MAX_ID_CHARS + 1)), f"a value {MAX_ID_CHARS + 1} long"),
    ],
)
def test_bad_raw_bytes_are_refused(raw: bytes, reason: str) -> None:
    with pytest.raises(PayloadError, match=reason) as refused:
        tensor_array("inputs[user]", "BYTES", [1], raw=raw)
    assert refused.value.field == "inputs[user]"


def test_ids_must_not_be_floats_and_numbers_must_be_numbers() -> None:
    with pytest.raises(PayloadError, match="not floating point"):
        feeds({"user": USER}, {"user": np.array([1.0])}, 10)
    with pytest.raises(PayloadError, match="more than the limit"):
        feeds({"user": USER}, {"user": np.array(["a"] * 11, dtype=object)}, 10)
