"""`python -m mmoe.bench.taobao`: --seed draws new rows from one world (--world-seed), so a file
made with another --seed validates a model trained on the first."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from mmoe.bench.taobao import main
from mmoe.model.config import parse_config
from mmoe.model.train import train


def make(tmp: Path, name: str, *args: str) -> pa.Table:
    path = tmp / f"{name}.parquet"
    assert main(["--rows", "10000", *args, "--out", str(path)]) == 0
    return pq.read_table(path)


def mapping(table: pa.Table, key: str, value: str) -> dict[Any, Any]:
    return dict(zip(table[key].to_pylist(), table[value].to_pylist(), strict=True))


# Ids only: what a model learns of them holds in their world and nowhere else.
CONFIG = {
    "features": [
        {"name": name, "kind": "categorical", "embedding_dim": 4, "default": ""}
        for name in ("user_id", "cate_id", "brand", "adgroup_id")
    ],
    "tasks": [{"name": "ctr", "label": "clk", "tower": [8], "metrics": ["auc"]}],
    "model": {"experts": 2, "expert_units": [16]},
    "train": {"batch_size": 256, "epochs": 2, "lr": 0.02, "progress": False},
}


def test_seeds_sample_one_world_and_validate_each_other(tmp_path: Path) -> None:
    a = make(tmp_path, "a", "--seed", "1")
    b = make(tmp_path, "b", "--seed", "2")
    make(tmp_path, "other", "--seed", "2", "--world-seed", "9")
    assert a["adgroup_id"].to_pylist() != b["adgroup_id"].to_pylist()  # new rows
    for key, value in [
        ("adgroup_id", "cate_id"),
        ("adgroup_id", "customer"),
        ("user_id", "age_level"),
    ]:
        in_a, in_b = mapping(a, key, value), mapping(b, key, value)
        shared = set(in_a) & set(in_b)
        assert len(shared) > 100 and all(in_a[k] == in_b[k] for k in shared), (key, value)
    config = parse_config(CONFIG)
    aucs = {}
    for valid in ("b", "other"):
        train(config, tmp_path / "a.parquet", tmp_path / valid, tmp_path / f"{valid}.parquet")
        metrics = json.loads((tmp_path / valid / "metrics.json").read_text())
        aucs[valid] = metrics["best"]["auc_ctr"]
    # The same world: what was learnt holds on new rows; another world: chance.
    assert aucs["b"] > 0.56 and abs(aucs["other"] - 0.5) < 0.03, aucs
