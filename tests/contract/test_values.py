"""The raw-value rules (contract/values.py): what each kind of value becomes, the errors, and the
bulk tag path agreeing with the per-row rule."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mmoe.contract.metadata import FeatureInfo
from mmoe.contract.values import (
    InvalidValue,
    broadcast_input,
    column_input,
    graph_inputs,
    json_value,
    one_context_batch,
    tag_tokens,
)

ITEM = FeatureInfo(name="item", kind="categorical", dtype="string", default="none")
USER = FeatureInfo(name="user", kind="categorical", dtype="string")
PRICE = FeatureInfo(name="price", kind="numeric", dtype="float32", default=1.0)
AGE = FeatureInfo(name="age", kind="numeric", dtype="float32")
TAGS = FeatureInfo(
    name="tags", kind="tags", dtype="string", default=["d"], separator=";", max_len=3
)
NEEDED_TAGS = FeatureInfo(name="must", kind="tags", dtype="string", separator="|", max_len=2)


def test_categorical_null_takes_the_default_and_integers_their_decimal_string() -> None:
    out = column_input(ITEM, ["a", None, 42, -7, ""])
    assert out.dtype == object
    assert out.tolist() == ["a", "none", "42", "-7", ""]
    assert column_input(USER, [3, 4]).tolist() == ["3", "4"]


def test_required_null_names_its_row() -> None:
    with pytest.raises(InvalidValue) as err:
        column_input(USER, ["a", "b", None])
    assert err.value.row == 2 and "no default" in err.value.reason
    with pytest.raises(InvalidValue) as err:
        column_input(AGE, [1.0, None])
    assert err.value.row == 1
    with pytest.raises(InvalidValue) as err:
        column_input(NEEDED_TAGS, [["a"], None])
    assert err.value.row == 1


def test_numeric_null_is_nan_for_the_graph_and_float32_overflow_is_refused() -> None:
    out = column_input(PRICE, [1.5, None, 7, 1e6])
    assert out.dtype == np.float32
    assert np.isnan(out[1]) and out[[0, 2, 3]].tolist() == [1.5, 7.0, 1e6]
    with pytest.raises(InvalidValue, match="float32 range") as err:
        column_input(PRICE, [1.0, 1e300])
    assert err.value.row == 1


def test_tags_split_drop_empties_truncate_and_pad() -> None:
    out = column_input(TAGS, [["a", "b"], "x;;y", None, ["p", "", "q", "r", "s"], [], [5, "z"]])
    assert out.shape == (6, 3)
    assert out.tolist() == [
        ["a", "b", ""],
        ["x", "y", ""],
        ["d", "", ""],  # the default
        ["p", "q", "r"],  # "" dropped before the first max_len are kept
        ["", "", ""],
        ["5", "z", ""],
    ]


def test_broadcast_and_defaults_for_absent_features() -> None:
    feeds = graph_inputs([ITEM, PRICE, TAGS, USER], {"user": ["u1", "u2"]}, 2)
    assert feeds["item"].tolist() == ["none", "none"]
    assert np.isnan(feeds["price"]).all()
    assert feeds["tags"].tolist() == [["d", "", ""]] * 2
    assert broadcast_input(TAGS, "a;b", 3).tolist() == [["a", "b", ""]] * 3
    assert broadcast_input(ITEM, 9, 2).tolist() == ["9", "9"]
    with pytest.raises(InvalidValue, match="no default") as err:
        graph_inputs([USER], {}, 2)
    assert err.value.row is None


def test_context_inputs_reach_the_graph_all_once_or_all_per_row() -> None:
    once = {"user": np.array(["u1"], object), "tags": np.array([["a", "", ""]], object)}
    per_row = {"item": np.array(["i1", "i2", "i3"], object)}
    feeds = {**once, **per_row}
    assert one_context_batch(["user", "tags"], feeds, 3) is feeds  # all once: as given
    mixed = {**feeds, "tags": np.array([["a", "", ""], ["b", "", ""], ["", "", ""]], object)}
    out = one_context_batch(["user", "tags"], mixed, 3)
    assert out["user"].tolist() == ["u1"] * 3 and out["tags"] is mixed["tags"]
    assert out["item"] is mixed["item"] and mixed["user"].shape == (1,)  # the input unchanged
    assert one_context_batch([], per_row, 3) is per_row


def test_json_value_turns_missing_numbers_into_null() -> None:
    assert [json_value(v) for v in [1.5, float("nan"), float("inf"), "a", 3]] == [
        1.5,
        None,
        None,
        "a",
        3,
    ]


_token = st.one_of(st.sampled_from(["", "a", "b", "ü", "x y"]), st.integers(-3, 30))
_tag_value = st.one_of(
    st.none(),
    st.lists(_token, max_size=6),
    st.lists(st.sampled_from(["", "a", "b", "c"]), max_size=6).map(";".join),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(_tag_value, min_size=1, max_size=8))
def test_bulk_tags_equal_the_per_row_rule(values: list[Any]) -> None:
    out = column_input(TAGS, values)
    for row, value in zip(out.tolist(), values, strict=True):
        tokens = tag_tokens(TAGS, value)
        assert row == tokens + [""] * (3 - len(tokens))
