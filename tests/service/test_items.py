"""The item table (service/items.py): loading a Parquet or Arrow file, every reason to refuse one,
and lookups that equal the contract's conversion of the same raw values."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.feather as feather
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mmoe.contract.metadata import FeatureInfo
from mmoe.contract.values import column_input
from mmoe.service.items import (
    ERROR,
    HIT,
    MISS,
    ItemRows,
    ItemTable,
    ItemTableError,
    file_signature,
)

USER = FeatureInfo(name="user_id", kind="categorical", dtype="string", context=True)
ITEM = FeatureInfo(name="item_id", kind="categorical", dtype="string", default="")
CATEGORY = FeatureInfo(name="category", kind="categorical", dtype="string")  # required
SHOP = FeatureInfo(name="shop", kind="categorical", dtype="string", default="none")
PRICE = FeatureInfo(name="price", kind="numeric", dtype="float32", default=1.0)
STOCK = FeatureInfo(name="stock", kind="numeric", dtype="float32")  # required
TAGS = FeatureInfo(
    name="tags", kind="tags", dtype="string", default=["d"], separator=";", max_len=3
)
BRANDS = FeatureInfo(name="brands", kind="tags", dtype="string", separator="|", max_len=2)
FEATURES = [USER, ITEM, CATEGORY, SHOP, PRICE, STOCK, TAGS, BRANDS]
HELD = [CATEGORY, SHOP, PRICE, STOCK, TAGS, BRANDS]

# Raw values as a data file holds them: nulls, integer ids, empty and over-long tags, tags as
# lists and as separated strings.
RAW: dict[str, list[Any]] = {
    "item_id": ["a", "b", "c", "d"],
    "category": ["c1", None, "c3", "c1"],
    "shop": [7, None, 12, -7],
    "price": [1.5, None, 1e6, -2.0],
    "stock": [3.0, None, 0.0, 5.0],
    "tags": [["x", "", "y", "z", "w"], None, [], ["q"]],
    "brands": ["b1|b2|b3", None, "", "|b4"],
}


def write(path: Path, columns: dict[str, Any], fmt: str = "") -> Path:
    table = pa.table(columns)
    fmt = fmt or path.suffix
    if fmt == ".parquet":
        pq.write_table(table, path)
    elif fmt == ".arrow":
        feather.write_feather(table, str(path), compression="uncompressed")
    else:  # an Arrow IPC stream
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
            w.write_table(table)
    return path


def expected(f: FeatureInfo, values: list[Any]) -> np.ndarray:
    """The contract's conversion of one raw value per row; a null of a feature without a
    default is what the graph reads as unknown ("" for an id, no tags, NaN)."""
    rows = []
    for v in values:
        if v is None and f.default is None:
            unknown = {"categorical": [""], "numeric": [np.nan], "tags": [[""] * (f.max_len or 0)]}
            rows.append(
                np.array(unknown[f.kind], dtype=np.float32 if f.kind == "numeric" else object)
            )
        else:
            rows.append(column_input(f, [v]))
    return np.concatenate(rows) if rows else column_input(f, [])


def assert_rows(rows: ItemRows, features: list[FeatureInfo], raw: dict[str, list[Any]]) -> None:
    assert list(rows.columns) == [f.name for f in features]
    for f in features:
        want = expected(f, raw[f.name])
        got = rows.columns[f.name]
        assert got.dtype == want.dtype and got.shape == want.shape, f.name
        np.testing.assert_array_equal(got, want, err_msg=f.name)


def raw_rows(ids: list[str]) -> dict[str, list[Any]]:
    """RAW's values for `ids`: a missing id as nulls."""
    where = {k: j for j, k in enumerate(RAW["item_id"])}
    return {
        name: [None if i not in where else values[where[i]] for i in ids]
        for name, values in RAW.items()
    }


@pytest.mark.parametrize("fmt", [".parquet", ".arrow", ".arrows"])
def test_lookups_equal_the_contracts_conversion_of_the_same_values(
    tmp_path: Path, fmt: str
) -> None:
    path = write(tmp_path / f"items{fmt}", RAW, fmt)
    table = ItemTable.load(path, FEATURES)
    assert table.key == "item_id" and table.features == HELD and table.rows == 4
    assert table.source == str(path)
    ids = ["c", "zz", "a", "b", "a", "d", ""]
    rows = table.lookup(np.array(ids, dtype=object))
    assert_rows(rows, HELD, raw_rows(ids))
    assert rows.found.tolist() == [True, False, True, True, True, True, False]
    assert rows.outcome.tolist() == [HIT, MISS, HIT, HIT, HIT, HIT, MISS]
    assert rows.counts() == {"hit": 5, "miss": 2, "stale": 0, "error": 0}
    again = asyncio.run(table.alookup(np.array(ids, dtype=object)))
    for name, column in rows.columns.items():
        np.testing.assert_array_equal(again.columns[name], column)


def test_a_missing_id_takes_each_features_default_or_the_graphs_unknown(tmp_path: Path) -> None:
    table = ItemTable.load(write(tmp_path / "items.parquet", RAW), FEATURES)
    rows = table.lookup(np.array(["nope"], dtype=object))
    assert rows.columns["shop"].tolist() == ["none"]
    assert rows.columns["category"].tolist() == [""]
    assert np.isnan(rows.columns["price"][0]) and np.isnan(rows.columns["stock"][0])
    assert rows.columns["tags"].tolist() == [["d", "", ""]]
    assert rows.columns["brands"].tolist() == [["", ""]]


def test_one_row_and_zero_row_lookups(tmp_path: Path) -> None:
    table = ItemTable.load(write(tmp_path / "items.parquet", RAW), FEATURES)
    one = table.lookup(np.array(["d"], dtype=object))
    assert_rows(one, HELD, raw_rows(["d"]))
    none = table.lookup(np.array([], dtype=object))
    assert none.columns["tags"].shape == (0, 3) and none.columns["price"].dtype == np.float32
    assert none.counts() == {"hit": 0, "miss": 0, "stale": 0, "error": 0}
    assert_rows(none, HELD, raw_rows([]))


def test_an_empty_table_misses_every_id(tmp_path: Path) -> None:
    schema = pa.schema([("item_id", pa.string()), ("price", pa.float64())])
    pq.write_table(schema.empty_table(), tmp_path / "empty.parquet")
    table = ItemTable.load(tmp_path / "empty.parquet", FEATURES)
    rows = table.lookup(np.array(["a", "b"], dtype=object))
    assert table.rows == 0 and rows.found.tolist() == [False, False]
    assert np.isnan(rows.columns["price"]).all()


def test_integer_ids_are_their_decimal_strings(tmp_path: Path) -> None:
    path = write(
        tmp_path / "items.parquet",
        {"item_id": [10, 20, 3], "shop": [1.0, None, 4.0], "price": [1, 2, 3]},
    )
    table = ItemTable.load(path, FEATURES)
    rows = table.lookup(np.array(["20", "3", "4", "10"], dtype=object))
    assert rows.found.tolist() == [True, True, False, True]
    # Integral floats (pandas' integers with missing values) are ids too.
    assert rows.columns["shop"].tolist() == ["none", "4", "none", "1"]
    want = np.array([2.0, 3.0, np.nan, 1.0], dtype=np.float32)  # NaN: the graph's default
    np.testing.assert_array_equal(rows.columns["price"], want)


def test_the_key_is_the_one_id_column_with_unique_values_or_the_one_named(
    tmp_path: Path,
) -> None:
    # shop is an id column too, but repeats a value: item_id is the key.
    path = write(tmp_path / "a.parquet", {"shop": ["s1", "s1"], "item_id": ["a", "b"]})
    assert ItemTable.load(path, FEATURES).key == "item_id"
    path = write(tmp_path / "b.parquet", {"shop": ["s1", "s2"], "item_id": ["a", "b"]})
    with pytest.raises(ItemTableError, match="several columns could be the key"):
        ItemTable.load(path, FEATURES)
    table = ItemTable.load(path, FEATURES, key="shop")
    assert table.key == "shop" and [f.name for f in table.features] == ["item_id"]
    rows = table.lookup(np.array(["s2"], dtype=object))
    assert rows.columns["item_id"].tolist() == ["b"]


REFUSALS: list[tuple[str, dict[str, Any], str | None, str]] = [
    (
        "a column the model does not take",
        {"item_id": ["a"], "colour": ["red"]},
        None,
        "column 'colour': the model has no feature 'colour'",
    ),
    (
        "a request-context feature",
        {"item_id": ["a"], "user_id": ["u1"]},
        None,
        "column 'user_id': user_id is request context",
    ),
    (
        "strings for a number",
        {"item_id": ["a"], "price": ["12.5"]},
        None,
        "column 'price' is string but price is a numeric feature: expected numbers",
    ),
    (
        "booleans for an id",
        {"item_id": ["a"], "shop": [True]},
        None,
        "column 'shop' is bool but shop is a categorical feature",
    ),
    (
        "numbers for tags",
        {"item_id": ["a"], "tags": [[1.5]]},
        None,
        "column 'tags' is list<float> but tags is a tags feature",
    ),
    (
        "fractional numbers for an id",
        {"item_id": ["a", "b"], "shop": [1.0, 2.5]},
        None,
        "column 'shop' holds 2.5: ids given as numbers must be integers",
    ),
    (
        "a number float32 cannot hold",
        {"item_id": ["a", "b"], "price": [1.0, 1e300]},
        None,
        "column 'price', row 1: 1e+300 is outside the float32 range",
    ),
    (
        "duplicate keys",
        {"item_id": ["a", "b", "a"]},
        "item_id",
        "key column 'item_id': duplicate key 'a' (rows 0 and 2)",
    ),
    (
        "duplicate keys, found without a name",
        {"item_id": ["a", "b", "a"], "price": [1.0, 2.0, 3.0]},
        None,
        "key column 'item_id': duplicate key 'a' (rows 0 and 2)",
    ),
    ("a null key", {"item_id": ["a", None]}, "item_id", "key column 'item_id', row 1: null"),
    ("a missing key column", {"shop": ["s1"]}, "item_id", "no key column 'item_id'"),
    (
        "a key that is not an id",
        {"item_id": ["a"], "price": [1.0]},
        "price",
        "key column 'price': an item key must be a categorical (id) feature",
    ),
    ("no key column at all", {"price": [1.0]}, None, "no key column"),
]


@pytest.mark.parametrize(
    ("columns", "key", "reason"), [r[1:] for r in REFUSALS], ids=[r[0] for r in REFUSALS]
)
def test_a_table_the_model_cannot_serve_is_refused_with_the_reason(
    tmp_path: Path, columns: dict[str, Any], key: str | None, reason: str
) -> None:
    path = write(tmp_path / "items.parquet", columns)
    with pytest.raises(ItemTableError) as err:
        ItemTable.load(path, FEATURES, key=key)
    assert reason in str(err.value)


def test_a_file_that_is_no_table_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ItemTableError, match="no such file"):
        ItemTable.load(tmp_path / "missing.parquet", FEATURES)
    (tmp_path / "items.csv").write_text("item_id,price\na,1\n")
    with pytest.raises(ItemTableError, match="not a Parquet or Arrow IPC"):
        ItemTable.load(tmp_path / "items.csv", FEATURES)


def test_the_signature_tells_a_new_file(tmp_path: Path) -> None:
    path = write(tmp_path / "items.parquet", RAW)
    table = ItemTable.load(path, FEATURES)
    assert table.signature() == file_signature(path)
    write(tmp_path / "next.parquet", {"item_id": ["a"]})
    os.replace(tmp_path / "next.parquet", path)
    assert table.signature() != file_signature(path)
    described = table.describe()
    assert described["rows"] == 4 and described["key"] == "item_id"
    assert described["features"] == [f.name for f in HELD] and described["source"] == str(path)


def test_outcomes_are_named_in_order() -> None:
    rows = ItemRows({}, np.array([True, False]), np.array([HIT, ERROR], dtype=np.int8))
    assert rows.counts() == {"hit": 1, "miss": 0, "stale": 0, "error": 1}


_ID = st.one_of(st.sampled_from(["a", "b", "", "a b", "ü"]), st.integers(-3, 3))
_TAG_ROW = st.one_of(
    st.none(),
    st.lists(st.sampled_from(["a", "b", "", "c", "dd"]), max_size=6),
    st.lists(st.sampled_from(["a", "b", ""]), max_size=6).map(";".join),
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    tags=st.lists(_TAG_ROW, min_size=1, max_size=8),
    ints=st.lists(st.one_of(st.none(), st.lists(st.integers(-5, 5), max_size=4)), max_size=8),
    shops=st.lists(st.one_of(st.none(), _ID.filter(lambda v: isinstance(v, str))), max_size=8),
)
def test_any_column_converts_as_the_contract_converts_it(
    tmp_path: Path, tags: list[Any], ints: list[Any], shops: list[Any]
) -> None:
    """Tags as separated strings (their column is strings) or lists; integer tags; ids."""
    n = len(tags)
    as_lists = [t.split(";") if isinstance(t, str) else t for t in tags]
    ints = (ints + [None] * n)[:n]
    shops = (shops + [None] * n)[:n]
    columns: dict[str, Any] = {
        "item_id": [f"i{j}" for j in range(n)],
        "tags": as_lists,
        "brands": pa.array(ints, pa.list_(pa.int64())),
        "shop": pa.array(shops, pa.string()),
    }
    joined = [None if t is None else ";".join(t) for t in as_lists]
    path = write(tmp_path / "items.parquet", columns)
    ids = np.array([f"i{j}" for j in reversed(range(n))], dtype=object)
    rows = ItemTable.load(path, FEATURES, key="item_id").lookup(ids)
    back = list(reversed(range(n)))
    np.testing.assert_array_equal(rows.columns["tags"], expected(TAGS, [as_lists[j] for j in back]))
    np.testing.assert_array_equal(rows.columns["brands"], expected(BRANDS, [ints[j] for j in back]))
    np.testing.assert_array_equal(rows.columns["shop"], expected(SHOP, [shops[j] for j in back]))
    strings = write(tmp_path / "strings.parquet", {"item_id": columns["item_id"], "tags": joined})
    as_text = ItemTable.load(strings, FEATURES).lookup(ids)
    np.testing.assert_array_equal(
        as_text.columns["tags"], expected(TAGS, [joined[j] for j in back])
    )


def test_a_pandas_index_column_is_not_part_of_the_table(tmp_path: Path) -> None:
    table = pa.table({"item_id": ["a", "b"], "__index_level_0__": [7, 9], "price": [1.0, 2.0]})
    pq.write_table(table, tmp_path / "items.parquet")
    loaded = ItemTable.load(tmp_path / "items.parquet", FEATURES)
    assert loaded.key == "item_id" and [f.name for f in loaded.features] == ["price"]


def test_a_column_given_twice_is_refused(tmp_path: Path) -> None:
    table = pa.table(
        [pa.array(["a"]), pa.array([1.0]), pa.array([2.0])], ["item_id", "price", "price"]
    )
    pq.write_table(table, tmp_path / "items.parquet")
    with pytest.raises(ItemTableError, match="column 'price' is there twice"):
        ItemTable.load(tmp_path / "items.parquet", FEATURES)


def test_keys_of_equal_hashes_are_told_apart_by_the_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a hash that collides all the time (a key's length), the keys still decide."""
    import mmoe.service.items as items

    monkeypatch.setattr(items, "hash", len, raising=False)
    keys = ["a", "b", "cc", "dd", "e", "fff"]
    path = write(tmp_path / "items.parquet", {"item_id": keys, "price": [1, 2, 3, 4, 5, 6]})
    table = ItemTable.load(path, FEATURES)
    rows = table.lookup(np.array(["e", "b", "x", "dd", "a", "cc", "yy", "fff"], dtype=object))
    assert rows.found.tolist() == [True, True, False, True, True, True, False, True]
    want = np.array([5, 2, np.nan, 4, 1, 3, np.nan, 6], dtype=np.float32)
    np.testing.assert_array_equal(rows.columns["price"], want)
    dup = write(tmp_path / "dup.parquet", {"item_id": ["a", "b", "c", "d", "b"]})
    with pytest.raises(ItemTableError, match="duplicate key 'b' \\(rows 1 and 4\\)"):
        ItemTable.load(dup, FEATURES)


def test_the_hash_index_finds_every_hash_it_holds() -> None:
    from mmoe.service.items import _HashIndex

    rng = np.random.default_rng(5)
    for n in (1, 2, 7, 100, 5000):
        hashes = rng.integers(0, 2**63 - 1, n, dtype=np.int64) * rng.choice([-1, 1], n)
        hashes[n // 2 :] &= 0xF  # crowd the low cells: long probe runs, equal hashes
        index = _HashIndex(hashes)
        clashed = {row for row, _ in index.clashes}
        rows = index.find(hashes)
        for row, (h, got) in enumerate(zip(hashes.tolist(), rows.tolist(), strict=True)):
            assert hashes[got] == h and (got == row or row in clashed)
        absent = np.setdiff1d(np.arange(-40, 40, dtype=np.int64), [*hashes, -1])  # -1: no hash
        assert (index.find(absent) == -1).all()
    # Seven distinct hashes that all start at the last of 16 cells: the probes run on into
    # the spare cells, and a lookup reads past its first window.
    last = -17 - 16 * np.arange(7, dtype=np.int64)
    index = _HashIndex(last)
    assert index.mask == 15 and not index.clashes
    assert np.flatnonzero(index.hashes != index.FREE).tolist() == list(range(15, 22))
    assert index.find(last).tolist() == list(range(7))
    crowded = _HashIndex(np.full(20, 3, dtype=np.int64) + 64 * np.arange(20))
    assert crowded.find(3 + 64 * np.arange(21)).tolist() == [*range(20), -1]


def test_the_metrics_count_every_outcome_a_lookup_gives() -> None:
    from mmoe.service.items import OUTCOMES
    from mmoe.service.metrics import ITEM_OUTCOMES

    assert ITEM_OUTCOMES == OUTCOMES
