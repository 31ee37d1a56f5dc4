"""The fitted feature schema: vocabularies, hashing, numeric transforms and tags follow the index
layout documented in model/schema.py, for values arriving as strings, ints or floats."""

from __future__ import annotations

from typing import Any

import mmh3
import numpy as np
import pyarrow as pa
import pytest

from mmoe.model.config import parse_config
from mmoe.model.schema import (
    MISSING_INDEX,
    OOV_INDEX,
    VOCAB_OFFSET,
    FeatureSchema,
    SchemaFitter,
    categorical_strings,
)


def fit(features: list[dict[str, Any]], table: pa.Table, **model: Any) -> FeatureSchema:
    config = parse_config(
        {"features": features, "tasks": [{"name": "t", "label": "y"}], "model": model}
    )
    return SchemaFitter(config).fit(table.to_batches(max_chunksize=3))


def test_categorical_values_as_strings_ints_and_floats_with_nan() -> None:
    assert categorical_strings(pa.array(["a", None, ""])).to_pylist() == ["a", "", ""]
    assert categorical_strings(pa.array([3, None, -1])).to_pylist() == ["3", "", "-1"]
    floats = pa.array([3.0, float("nan"), None, 12.0], from_pandas=False)
    assert categorical_strings(floats, null_as="0").to_pylist() == ["3", "0", "0", "12"]
    dictionary = pa.array(["x", "y", "x"]).dictionary_encode()
    assert categorical_strings(dictionary).to_pylist() == ["x", "y", "x"]
    with pytest.raises(ValueError, match="non-integer float"):
        categorical_strings(pa.array([1.5]))
    with pytest.raises(ValueError, match="non-integer float"):
        categorical_strings(pa.array([float("inf")]))


def test_float_ids_encode_like_their_integer_form() -> None:
    table = pa.table(
        {"a": pa.array([1.0, 2.0, float("nan"), 1.0], from_pandas=False), "y": [0, 1, 0, 1]}
    )
    schema = fit([{"name": "a", "kind": "categorical"}], table)
    as_ints = pa.table({"a": pa.array([1, 2, None, 1]), "y": [0, 1, 0, 1]})
    np.testing.assert_array_equal(schema.encode(table)["a"], schema.encode(as_ints)["a"])
    assert schema.encode(table)["a"][2] == MISSING_INDEX


def test_vocabulary_min_count_max_size_oov_and_missing() -> None:
    values = ["a"] * 5 + ["b"] * 3 + ["c"] * 3 + ["d"] + [None, ""]
    table = pa.table({"v": values, "y": [0] * len(values)})
    schema = fit(
        [{"name": "v", "kind": "categorical", "vocab": {"min_count": 2, "max_size": 2}}], table
    )
    f = schema["v"]
    # most frequent first, ties by value; "c" is cut by max_size, "d" by min_count
    assert f.vocab == ["a", "b"]
    assert f.num_embeddings == 2 + VOCAB_OFFSET
    probe = pa.table({"v": ["a", "b", "c", "d", "never", None, ""], "y": [0] * 7})
    assert schema.encode(probe)["v"].tolist() == [
        VOCAB_OFFSET,
        VOCAB_OFFSET + 1,
        OOV_INDEX,
        OOV_INDEX,
        OOV_INDEX,
        MISSING_INDEX,
        MISSING_INDEX,
    ]


def test_categorical_default_fills_missing_values() -> None:
    table = pa.table({"v": ["x", None, "x"], "y": [0, 0, 0]})
    schema = fit([{"name": "v", "kind": "categorical", "default": "x"}], table)
    assert schema["v"].vocab == ["x"]
    assert schema.encode(table)["v"].tolist() == [VOCAB_OFFSET] * 3


def test_hash_buckets_are_murmur3_with_missing_at_zero() -> None:
    ids = ["u1", "u2", "", None, 17]
    table = pa.table(
        {"v": pa.array([str(i) if i is not None else None for i in ids]), "y": [0] * 5}
    )
    schema = fit([{"name": "v", "kind": "categorical", "hash_buckets": 7}], table)
    got = schema.encode(table)["v"].tolist()
    want = [1 + mmh3.hash(s, 0, signed=False) % 7 for s in ("u1", "u2")]
    assert got[:2] == want
    assert got[2:4] == [MISSING_INDEX, MISSING_INDEX]
    assert got[4] == 1 + mmh3.hash("17", 0, signed=False) % 7
    assert schema["v"].vocab is None and schema["v"].num_embeddings == 8


def test_numeric_default_transforms_and_boundaries() -> None:
    x = [1.0, None, 3.0, 7.0]
    table = pa.table({"x": pa.array(x, pa.float64()), "y": [0] * 4})
    schema = fit(
        [
            {"name": "raw", "column": "x", "kind": "numeric", "default": 5.0},
            {
                "name": "log",
                "column": "x",
                "kind": "numeric",
                "default": -2.0,
                "transform": "log1p",
            },
            {
                "name": "std",
                "column": "x",
                "kind": "numeric",
                "default": 3.0,
                "transform": "standard",
            },
            {
                "name": "bucket",
                "column": "x",
                "kind": "numeric",
                "default": 0.0,
                "boundaries": [1, 3],
            },
        ],
        table,
    )
    enc = schema.encode(table)
    np.testing.assert_allclose(enc["raw"], [1, 5, 3, 7])
    np.testing.assert_allclose(enc["log"], np.log1p([1, 0, 3, 7]), rtol=1e-6)  # max(x, 0)
    filled = np.array([1, 3, 3, 7])
    assert schema["std"].mean == pytest.approx(filled.mean())
    assert schema["std"].std == pytest.approx(filled.std())
    np.testing.assert_allclose(enc["std"], (filled - filled.mean()) / filled.std(), rtol=1e-6)
    # searchsorted(side="right"): a value on a boundary goes to the bucket above it
    assert enc["bucket"].tolist() == [1, 0, 2, 2]
    assert schema["bucket"].embedded and schema["bucket"].num_embeddings == 3
    assert [f.name for f in schema.dense_features] == ["raw", "log", "std"]


def test_numeric_without_default_rejects_missing_values() -> None:
    table = pa.table({"x": pa.array([1.0, None]), "y": [0, 0]})
    schema = fit([{"name": "x", "kind": "numeric"}], table)
    with pytest.raises(ValueError, match="give it a `default`"):
        schema.encode(table)


def test_tags_from_lists_and_separated_strings_encode_alike() -> None:
    lists = [["a", "b"], [], None, ["b", "", "c", "a", "b"]]
    strings = ["a|b", "", None, "b||c|a|b"]
    feature = {"name": "t", "kind": "tags", "max_len": 3, "default": ["a"]}
    as_lists = pa.table({"t": pa.array(lists, pa.list_(pa.string())), "y": [0] * 4})
    as_strings = pa.table({"t": pa.array(strings), "y": [0] * 4})
    schema = fit([feature], as_lists)
    assert fit([feature], as_strings) == schema
    enc = schema.encode(as_lists)["t"]
    np.testing.assert_array_equal(enc, schema.encode(as_strings)["t"])
    vocab = schema["t"].vocab
    assert vocab is not None
    idx = {v: VOCAB_OFFSET + i for i, v in enumerate(vocab)}
    assert enc.tolist() == [
        [idx["a"], idx["b"], 0],
        [0, 0, 0],  # an empty list stays empty; padding is index 0
        [idx["a"], 0, 0],  # null -> the default
        [idx["b"], idx["c"], idx["a"]],  # empty tokens dropped, the first max_len kept
    ]


def test_int_tags() -> None:
    table = pa.table({"t": pa.array([[1, 2], [2]], pa.list_(pa.int64())), "y": [0, 0]})
    schema = fit([{"name": "t", "kind": "tags"}], table)
    assert schema["t"].vocab == ["2", "1"]


def test_shared_embedding_name_fits_one_vocabulary_over_both_features() -> None:
    table = pa.table(
        {
            "item": ["i1", "i2", "i1"],
            "history": pa.array([["i3"], ["i3", "i1"], []], pa.list_(pa.string())),
            "y": [0, 0, 0],
        }
    )
    schema = fit(
        [
            {"name": "item", "kind": "categorical", "embedding_name": "items", "embedding_dim": 4},
            {"name": "history", "kind": "tags", "embedding_name": "items", "embedding_dim": 4},
        ],
        table,
    )
    assert schema["item"].vocab == schema["history"].vocab == ["i1", "i3", "i2"]
    assert schema.tables == {"items": (3 + VOCAB_OFFSET, 4)}
    enc = schema.encode(table)
    assert enc["item"][0] == enc["history"][1][1]  # "i1" is one row of the shared table


def test_only_features_of_the_selected_groups_are_fitted() -> None:
    table = pa.table({"a": ["x"], "b": ["y"], "y": [0]})
    schema = fit(
        [
            {"name": "a", "kind": "categorical", "group": "user"},
            {"name": "b", "kind": "categorical", "group": "item"},
        ],
        table,
        groups=["item"],
    )
    assert [f.name for f in schema.features] == ["b"]
    assert list(schema.encode(table)) == ["b"]


def test_fitting_in_chunks_equals_fitting_at_once(tiny_data: Any) -> None:
    import pyarrow.parquet as pq

    from mmoe.model.config import load_config
    from tests.conftest import TINY_CONFIG

    config = load_config(TINY_CONFIG)
    table = pq.read_table(tiny_data)
    whole = SchemaFitter(config).fit([table])
    chunked = SchemaFitter(config).fit(table.to_batches(max_chunksize=500))
    assert whole == chunked


def test_schema_round_trips_through_json(tmp_path: Any) -> None:
    table = pa.table({"a": ["x", "y"], "n": [1.0, 2.0], "y": [0, 1]})
    schema = fit(
        [
            {"name": "a", "kind": "categorical"},
            {"name": "n", "kind": "numeric", "transform": "standard"},
        ],
        table,
    )
    schema.save(tmp_path / "schema.json")
    assert FeatureSchema.load(tmp_path / "schema.json") == schema


def test_numeric_statistics_record_what_training_saw() -> None:
    rng = np.random.default_rng(0)
    x = rng.lognormal(3, 1, 30_000)
    x[::50] = np.nan
    table = pa.table({"p": pa.array(x, from_pandas=True), "y": np.zeros(len(x))})
    config = parse_config(
        {
            "features": [{"name": "p", "kind": "numeric", "default": 0.0}],
            "tasks": [{"name": "t", "label": "y"}],
        }
    )
    stats = SchemaFitter(config).fit(table.to_batches(max_chunksize=7000))["p"].stats
    seen = x[~np.isnan(x)]
    assert stats is not None
    assert (stats.count, stats.missing) == (len(seen), len(x) - len(seen))
    assert (stats.min, stats.max) == (seen.min(), seen.max())
    # Quantiles from a sample of 10,000: within a percentile of the exact ones.
    for key, level in [("p1", 0.01), ("p50", 0.5), ("p99", 0.99)]:
        rank = np.searchsorted(np.sort(seen), stats.quantiles[key]) / len(seen)
        assert abs(rank - level) < 0.01, key


def test_schemas_saved_before_statistics_were_recorded_still_load() -> None:
    old = {"features": [{"name": "p", "kind": "numeric", "column": "p", "default": 1.0}]}
    assert FeatureSchema.model_validate(old)["p"].stats is None
