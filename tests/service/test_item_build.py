"""`mmoe items build` (service/item_build.py): each item's most recent row of training or log
data, in file order or by a time column, with the model's item features."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest

from mmoe.service.item_build import build_table, main
from mmoe.service.items import ItemTable, ItemTableError
from tests.service.test_items import FEATURES

# Log rows: the user is request context, not an item feature; `ts` orders them by time.
LOG: dict[str, list[Any]] = {
    "user_id": ["u1", "u2", "u3", "u4", "u5", "u6", "u7"],
    "item_id": ["a", "b", "a", None, "b", "c", "a"],
    "price": [1.0, 2.0, 3.0, 4.0, None, 6.0, 7.0],
    "tags": [["x"], ["y"], ["z"], ["w"], ["v"], [], ["t"]],
    "ts": [5, 1, 3, 9, None, 2, 5],
    "clk": [0, 1, 0, 0, 1, 0, 1],
}


def log_file(tmp_path: Path, columns: dict[str, list[Any]] = LOG) -> Path:
    path = tmp_path / "log.parquet"
    pq.write_table(pa.table(columns), path)
    return path


def built(path: Path) -> dict[str, list[Any]]:
    return pq.read_table(path).to_pydict()


@pytest.mark.parametrize("batch_rows", [1, 3, 1000])
def test_each_item_takes_its_last_row_in_file_order(tmp_path: Path, batch_rows: int) -> None:
    out = tmp_path / "items.parquet"
    only = ["price", "tags"]
    report = build_table(
        log_file(tmp_path), out, FEATURES, "item_id", only=only, batch_rows=batch_rows
    )
    assert (report.rows, report.items, report.null_keys) == (7, 3, 1)
    # b's last row has no price: it stays null (the default when served), as in training.
    assert built(out) == {
        "item_id": ["a", "b", "c"],
        "price": [7.0, None, 6.0],
        "tags": [["t"], ["v"], []],
    }


def test_by_time_the_latest_row_wins_file_order_breaks_ties_and_no_time_is_oldest(
    tmp_path: Path,
) -> None:
    out = tmp_path / "items.parquet"
    only = ["price", "tags"]
    build_table(log_file(tmp_path), out, FEATURES, "item_id", time_column="ts", only=only)
    # a: ts 5 (row 0), 3, 5 (row 6): the later of the two at 5; b: ts 1, null: the one at 1.
    assert built(out) == {
        "item_id": ["a", "b", "c"],
        "price": [7.0, 2.0, 6.0],
        "tags": [["t"], ["y"], []],
    }
    build_table(
        log_file(tmp_path), out, FEATURES, "item_id", time_column="ts", only=only, batch_rows=2
    )
    assert built(out)["price"] == [7.0, 2.0, 6.0]


def test_the_columns_are_the_models_item_features_and_the_table_loads(tmp_path: Path) -> None:
    data = {k: v for k, v in LOG.items() if k != "ts"} | {
        "category": ["c1", "c2", "c1", "c9", "c2", "c3", "c1"],
        "shop": [1, 2, 1, 2, 2, 3, 1],
        "stock": [1.0] * 7,
        "brands": ["b1|b2", "", None, "b3", "b4", "b5", "b6|b7"],
    }
    out = tmp_path / "items.arrow"
    build_table(log_file(tmp_path, data), out, FEATURES, "item_id")
    table = ItemTable.load(out, FEATURES, key="item_id")
    assert table.rows == 3
    assert [f.name for f in table.features] == [
        "category",
        "shop",
        "price",
        "stock",
        "tags",
        "brands",
    ]
    rows = table.lookup(np.array(["a"], dtype=object))
    assert rows.columns["shop"].tolist() == ["1"] and rows.columns["brands"].tolist() == [
        ["b6", "b7"]
    ]


def test_data_columns_named_otherwise_and_csv_data(tmp_path: Path) -> None:
    path = tmp_path / "log.csv"
    pcsv.write_csv(pa.table({"iid": ["a", "b", "a"], "cost": [1.0, 2.0, 3.0]}), path)
    out = tmp_path / "items.parquet"
    columns = {"item_id": "iid", "price": "cost"}
    build_table(path, out, FEATURES, "item_id", columns=columns, only=["price"])
    assert built(out) == {"item_id": ["a", "b"], "price": [3.0, 2.0]}


@pytest.mark.parametrize(
    ("key", "only", "out", "reason"),
    [
        ("user_id", None, "items.parquet", "key 'user_id': an item key is one of the model's"),
        ("price", None, "items.parquet", "key 'price': an item key is one of the model's"),
        ("item_id", ["user_id"], "items.parquet", "feature 'user_id' is not an item feature"),
        ("item_id", ["category"], "items.parquet", "no column 'category' in the data"),
        ("item_id", ["price"], "items.csv", "name the output .parquet, or .arrow"),
    ],
)
def test_what_cannot_be_built_is_refused(
    tmp_path: Path, key: str, only: list[str] | None, out: str, reason: str
) -> None:
    with pytest.raises(ItemTableError) as err:
        build_table(log_file(tmp_path), tmp_path / out, FEATURES, key, only=only)
    assert reason in str(err.value)
    assert not (tmp_path / out).exists()


def test_the_command_reads_the_features_of_a_training_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A run's schema.json names each feature's data column."""
    fitted = [
        {"name": "user_id", "kind": "categorical", "column": "user_id", "context": True},
        {"name": "item_id", "kind": "categorical", "column": "iid", "default": ""},
        {"name": "price", "kind": "numeric", "column": "price", "default": 0.0},
    ]
    run = tmp_path / "run"
    run.mkdir()
    (run / "schema.json").write_text(json.dumps({"features": fitted}))
    data = log_file(tmp_path, {"iid": ["a", "a", "b"], "price": [1.0, 2.0, 3.0]})
    out = tmp_path / "items.parquet"
    args = ["--data", str(data), "--key", "item_id", "--out", str(out), "--config", str(run)]
    assert main(args) == 0
    assert "2 items from 3 rows" in capsys.readouterr().out
    assert built(out) == {"item_id": ["a", "b"], "price": [2.0, 3.0]}
    assert main([*args[:-1], str(tmp_path)]) == 2
    assert "schema.json: not a training run's fitted schema" in capsys.readouterr().err


def test_the_documented_item_commands_parse() -> None:
    from mmoe.cli import build_parser
    from tests.docs import ROOT, bash_commands

    commands = [
        argv[1:]
        for argv in bash_commands((ROOT / "docs" / "items.md").read_text())
        if argv[:2] == ["mmoe", "items"]
    ]
    assert len(commands) >= 3
    parser = build_parser()
    for argv in commands:
        args = parser.parse_args(argv)
        assert args.func is not None, argv
