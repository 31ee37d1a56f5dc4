"""A training run on disk, and building the network a config describes.

RUN_DIR/
  config.yaml    the validated training config
  schema.json    the fitted FeatureSchema (vocabularies, statistics)
  weights.pt     the best state_dict (loaded with weights_only=True: no pickled code runs)
  metrics.json   per-epoch losses and validation metrics, and the best epoch
  valid_sample.parquet  a few hundred raw validation rows (the feature columns), which export
                 adds to its parity check (absent when there were no validation rows)
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import yaml

from mmoe.model.config import RunConfig, parse_config
from mmoe.model.network import (
    PLE,
    FeatureSpec,
    InputLayout,
    LabelScale,
    MMoE,
    RankingModel,
    TaskHead,
)
from mmoe.model.schema import FeatureSchema


def build_model(config: RunConfig, schema: FeatureSchema) -> RankingModel:
    """The RankingModel for a config and a fitted schema (weights freshly initialised)."""
    specs = [
        FeatureSpec(
            name=f.name,
            kind=f.kind,
            table=(f.table or f.name) if f.embedded else None,
            pooling=f.pooling or "mean",
        )
        for f in schema.features
    ]
    tasks = [
        TaskHead(t.name, t.kind, tuple(t.tower), t.num_class, t.multiply, t.product_name)
        for t in config.tasks
    ]
    m = config.model
    input_dim = InputLayout.of(specs, schema.tables).width
    common: dict[str, Any] = dict(
        expert_units=m.expert_units,
        tasks=tasks,
        gate_units=m.gate_units,
        activation=m.activation,
        dropout=m.dropout,
        batch_norm=m.batch_norm,
    )
    net: MMoE | PLE
    if m.kind == "ple":
        net = PLE(
            input_dim,
            num_shared_experts=m.experts,
            num_task_experts=m.task_experts,
            num_layers=m.ple_layers,
            layer_units=m.ple_expert_units,
            **common,
        )
    else:
        net = MMoE(input_dim, num_experts=m.experts, gate=m.gate, **common)
    reduction = m.senet.reduction_ratio if m.senet else None
    return RankingModel(specs, schema.tables, net, senet_reduction=reduction)


# Train settings that change how fast a run goes or what it prints, never the model it trains.
NOT_IDENTITY = {"progress", "threads", "cache_mb"}


def config_hash(config: RunConfig) -> str:
    """What identifies the model a config trains (train.progress, threads and cache_mb left
    out)."""
    text = json.dumps(
        config.model_dump(mode="json", exclude={"train": NOT_IDENTITY}), sort_keys=True
    )
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class Run:
    config: RunConfig
    schema: FeatureSchema
    model: RankingModel
    metrics: dict[str, Any]
    path: Path


class RunDirError(ValueError):
    """An output directory that a run may not be written into."""


def prepare_run_dir(path: str | Path, overwrite: bool = False) -> None:
    """Refuse an existing non-empty RUN_DIR (its old files, report plots, would mix with the
    new run's) unless `overwrite`, which empties it."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise RunDirError(f"--out {path} is a file, not a directory")
    if not path.exists() or not any(path.iterdir()):
        return
    if not overwrite:
        raise RunDirError(
            f"--out {path} exists and is not empty; pass --overwrite to replace it, or choose "
            "another directory"
        )
    for child in path.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


def save_config(config: RunConfig, run_dir: Path) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(
        yaml.safe_dump(config.model_dump(mode="json", exclude_none=True), sort_keys=False)
    )


def save_weights(model: RankingModel, run_dir: Path) -> None:
    tmp = run_dir / "weights.pt.tmp"
    torch.save(model.state_dict(), tmp)
    tmp.replace(run_dir / "weights.pt")


VALID_SAMPLE = "valid_sample.parquet"


def save_valid_sample(
    valid: pa.Table | None, config: RunConfig, run_dir: Path, rows: int = 256
) -> None:
    """Keep up to `rows` raw validation rows (drawn with the training seed, in file order; only
    the columns the features read) as RUN_DIR/valid_sample.parquet, for export's parity check.
    Without validation rows, an older sample is removed."""
    path = run_dir / VALID_SAMPLE
    if valid is None or valid.num_rows == 0:
        path.unlink(missing_ok=True)
        return
    n = min(rows, valid.num_rows)
    picked = np.sort(np.random.default_rng(config.train.seed).choice(valid.num_rows, n, False))
    columns = list(dict.fromkeys(f.column or f.name for f in config.input_features))
    pq.write_table(valid.select(columns).take(pa.array(picked)), path)


def load_run(run_dir: str | Path) -> Run:
    """Load a finished run; the model is in eval mode."""
    run_dir = Path(run_dir)
    for name in ("config.yaml", "schema.json", "weights.pt"):
        if not (run_dir / name).exists():
            raise FileNotFoundError(f"{run_dir} is not a training run: {name} is missing")
    config = parse_config(yaml.safe_load((run_dir / "config.yaml").read_text()))
    schema = FeatureSchema.load(run_dir / "schema.json")
    model = build_model(config, schema)
    state = torch.load(run_dir / "weights.pt", map_location="cpu", weights_only=True)
    # Runs saved before regression towers ended in a LabelScale have none: theirs is the
    # identity (scale 1, shift 0), which is what a new one holds.
    missing = model.load_state_dict(state, strict=False).missing_keys
    scales = {
        f"{name}.{buffer}"
        for name, module in model.named_modules()
        if isinstance(module, LabelScale)
        for buffer in ("scale", "shift")
    }
    wrong = [k for k in missing if k not in scales]
    unexpected = [k for k in state if k not in model.state_dict()]
    if wrong or unexpected:
        raise RuntimeError(
            f"{run_dir}/weights.pt does not fit its config: missing {wrong}, unexpected "
            f"{unexpected}"
        )
    model.eval()
    metrics_path = run_dir / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.exists() else {}
    return Run(config, schema, model, metrics, run_dir)
