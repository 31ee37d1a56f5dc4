"""Multi-process training (DDP, gloo on the CPU): how rows are split between processes, and
`mmoe train --nproc 2` (torchrun) against a single process on the same data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
import yaml

from mmoe.model.config import load_config, parse_config
from mmoe.model.data import write_table
from mmoe.model.synthetic import synthetic_ranking
from mmoe.model.train import Trainer, train

ROOT = Path(__file__).resolve().parents[2]


def batch_rows(trainer: Trainer, epoch: int = 1) -> list[list[int]]:
    schema, rows = trainer.fit_schema()
    return [
        sorted(b.inputs["rid"].long().tolist()) for b in trainer.batches.epoch(schema, epoch, rows)
    ]


@pytest.mark.parametrize(("world", "rows"), [(2, 1003), (3, 1000), (4, 1001)])
def test_processes_share_every_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, world: int, rows: int
) -> None:
    """Each process takes its share of every global batch: together they see exactly the single
    process's batches, and all take the same number of steps (a last batch too small to give
    every process 2 rows joins the batch before it)."""
    data = tmp_path / "rows.parquet"
    write_table(
        pa.table({"rid": np.arange(rows, dtype=np.float64), "clk": np.arange(rows) % 2}), data
    )
    config = parse_config(
        {
            "features": [{"name": "rid", "kind": "numeric"}],
            "tasks": [{"name": "ctr", "label": "clk"}],
            "train": {"batch_size": 10, "read_rows": 97, "seed": 2},
        }
    )
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    single = batch_rows(Trainer(config, data, tmp_path / "run"))
    per_rank = []
    for rank in range(world):
        monkeypatch.setenv("WORLD_SIZE", str(world))
        monkeypatch.setenv("RANK", str(rank))
        per_rank.append(batch_rows(Trainer(config, data, tmp_path / "run")))
    steps = len(per_rank[0])
    assert all(len(r) == steps for r in per_rank)
    if len(single[-1]) < 2 * world:  # a tail the single process keeps, the processes merge
        single[-2:] = [sorted(single[-2] + single[-1])]
    assert steps == len(single)
    for i in range(steps):
        together = sorted(row for r in per_rank for row in r[i])
        assert together == single[i]
        assert max(len(r[i]) for r in per_rank) - min(len(r[i]) for r in per_rank) <= 1


def demo_like(tmp_path: Path) -> Path:
    """configs/demo.yaml, shorter; a batch size that does not split evenly over 2 processes."""
    config: dict[str, Any] = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    config["train"] |= {"epochs": 2, "batch_size": 511, "progress": False}
    path = tmp_path / "demo.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.slow
def test_two_processes_train_like_one(tmp_path: Path) -> None:
    data = tmp_path / "train.parquet"
    write_table(synthetic_ranking(30_001, seed=7), data)
    config = demo_like(tmp_path)
    train(load_config(config), data, tmp_path / "one")
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK")}
    env["OMP_NUM_THREADS"] = "1"
    command = ["train", "--nproc", "2", "--config", str(config), "--data", str(data)]
    proc = subprocess.run(
        [sys.executable, "-m", "mmoe", *command, "--out", str(tmp_path / "two")],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = json.loads((tmp_path / "one" / "metrics.json").read_text())
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert (one["world_size"], two["world_size"]) == (1, 2)
    for key in ("train_rows", "valid_rows", "steps_per_epoch"):
        assert one[key] == two[key], key
    assert len(two["epochs"]) == 2
    for name in ("auc_ctr", "auc_cvr"):
        assert two["best"][name] > 0.65
        assert abs(one["best"][name] - two["best"][name]) < 0.02, name
    # The demo config has batch norm, whose statistics each process takes over its own half of
    # the batch (torch has no SyncBatchNorm on CPU): close, not equal.
    for name in ("logloss_ctr", "logloss_cvr"):
        assert abs(one["best"][name] - two["best"][name]) < 0.02, name
    # the run directory is complete and loads
    from mmoe.model.checkpoint import load_run

    assert load_run(tmp_path / "two").metrics == two
