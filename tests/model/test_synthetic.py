"""`mmoe data synthetic-ranking`: one world per --world-seed, rows drawn from it by --seed, so a
file made with another --seed validates a model trained on the first."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mmoe.model.config import parse_config
from mmoe.model.train import train
from tests.cli import mmoe


def make(tmp: Path, name: str, *args: str) -> pa.Table:
    path = tmp / f"{name}.parquet"
    mmoe("data", "synthetic-ranking", "--rows", "6000", *args, "--out", str(path))
    return pq.read_table(path)


def mapping(table: pa.Table, key: str, value: str) -> dict[Any, Any]:
    return dict(zip(table[key].to_pylist(), table[value].to_pylist(), strict=True))


def test_row_seeds_sample_one_world_and_world_seeds_change_it(tmp_path: Path) -> None:
    a = make(tmp_path, "a", "--seed", "1")
    b = make(tmp_path, "b", "--seed", "2")
    other = make(tmp_path, "other", "--seed", "1", "--world-seed", "5")
    assert a["user_id"].to_pylist() != b["user_id"].to_pylist()  # different rows
    for key, value in [("item_id", "category"), ("user_id", "age_level"), ("user_id", "gender")]:
        in_a, in_b, in_other = (mapping(t, key, value) for t in (a, b, other))
        shared = set(in_a) & set(in_b)
        assert len(shared) > 100
        assert all(in_a[k] == in_b[k] for k in shared), (key, value)
        shared_other = set(in_a) & set(in_other)
        assert sum(in_a[k] != in_other[k] for k in shared_other) > len(shared_other) / 4


def test_help_says_which_seed_draws_what() -> None:
    text = " ".join(mmoe("data", "synthetic-ranking", "--help").split())
    assert "--seed draws the rows from that world, --world-seed the world itself" in text
    assert "same --world-seed are samples of one world" in text


@pytest.mark.slow
def test_a_model_trained_on_one_seed_scores_as_well_on_another(
    tmp_path: Path, tiny_dict: dict[str, Any]
) -> None:
    make(tmp_path, "a", "--seed", "1")
    make(tmp_path, "b", "--seed", "2")
    config = parse_config(tiny_dict | {"train": tiny_dict["train"] | {"epochs": 2}})
    train(config, tmp_path / "a.parquet", tmp_path / "own")  # held-out rows of the same file
    train(config, tmp_path / "a.parquet", tmp_path / "other", tmp_path / "b.parquet")
    own, other = (
        json.loads((tmp_path / run / "metrics.json").read_text())["best"]
        for run in ("own", "other")
    )
    assert own["auc_ctr"] > 0.65
    assert other["auc_ctr"] > own["auc_ctr"] - 0.03, (own, other)
