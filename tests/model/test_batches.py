"""The epoch's batches: a last batch of one row (which batch norm cannot train on) joins the
batch before it, so a run never dies on the size of its last batch and no row is dropped."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from mmoe.model.config import ConfigError, parse_config
from mmoe.model.data import write_table
from mmoe.model.synthetic import synthetic_ranking
from mmoe.model.train import Trainer, train


def bn_config(tiny_dict: dict[str, Any], batch_size: int) -> dict[str, Any]:
    tiny_dict["model"] |= {"batch_norm": True}
    tiny_dict["train"] |= {"batch_size": batch_size, "valid_fraction": 0.0, "epochs": 2}
    return tiny_dict


@pytest.mark.parametrize("rows", [513, 514])
def test_a_one_row_tail_batch_with_batch_norm_trains(
    tiny_dict: dict[str, Any], tmp_path: Path, rows: int
) -> None:
    """513 rows at batch 256: 2 batches of 256 and 1 row, which alone would fail in batch norm
    ("Expected more than 1 value per channel when training"); it joins the second batch. 514
    leaves 2 rows, a batch of its own."""
    data = tmp_path / "rows.parquet"
    write_table(synthetic_ranking(rows, seed=3), data)
    config = parse_config(bn_config(tiny_dict, 256))
    trainer = Trainer(config, data, tmp_path / "run")
    schema, n = trainer.fit_schema()
    sizes = [len(b) for b in trainer.batches.epoch(schema, 1, n)]
    assert sizes == ([256, 257] if rows == 513 else [256, 256, 2])
    assert sum(sizes) == rows  # no row dropped
    train(config, data, tmp_path / "run")
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["steps_per_epoch"] == len(sizes) and len(metrics["epochs"]) == 2


def test_batch_norm_needs_batches_of_two_rows(tiny_dict: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match=r"model\.batch_norm: .*train\.batch_size is 1"):
        parse_config(bn_config(tiny_dict, 1))
