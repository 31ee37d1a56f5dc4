"""Training: fit the feature schema, train the network, keep the best epoch, write RUN_DIR.

Single process by default; under `torchrun` (WORLD_SIZE > 1) each process trains on its share of
every chunk with DistributedDataParallel (gloo on CPU, nccl on GPU). Rank 0 fits the schema and
writes the run; every rank evaluates the same validation rows, so all agree on early stopping
without extra communication.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from model.checkpoint import build_model, config_hash, save_config, save_weights
from model.config import RunConfig, TaskConfig
from model.data import DataSource
from model.metrics import task_metrics
from model.network import MMoE, RankingModel, task_outputs
from model.schema import FeatureSchema, SchemaFitter, numeric_values


@dataclass
class Batch:
    inputs: dict[str, torch.Tensor]
    labels: dict[str, torch.Tensor]  # per task; NaN = missing
    weights: dict[str, torch.Tensor]  # per task; 0 = not in this task's loss

    def __len__(self) -> int:
        return len(next(iter(self.labels.values())))

    def take(self, idx: torch.Tensor) -> Batch:
        return Batch(
            {k: v[idx] for k, v in self.inputs.items()},
            {k: v[idx] for k, v in self.labels.items()},
            {k: v[idx] for k, v in self.weights.items()},
        )


def encode_table(
    table: pa.Table, schema: FeatureSchema, tasks: list[TaskConfig], with_labels: bool = True
) -> Batch:
    """Raw rows -> tensors: encoded features, labels and per-task loss weights."""
    inputs = {k: torch.from_numpy(v) for k, v in schema.encode(table).items()}
    labels: dict[str, torch.Tensor] = {}
    weights: dict[str, torch.Tensor] = {}
    if with_labels:
        for t in tasks:
            y = numeric_values(table.column(t.label))
            present = ~np.isnan(y)
            if t.kind == "binary" and not np.isin(y[present], (0.0, 1.0)).all():
                raise ValueError(f"task {t.name!r}: label column {t.label!r} must hold 0/1")
            if t.kind == "multiclass":
                assert t.num_class is not None
                ok = (y[present] == np.round(y[present])) & (y[present] >= 0)
                if not (ok & (y[present] < t.num_class)).all():
                    raise ValueError(
                        f"task {t.name!r}: label column {t.label!r} must hold class ids "
                        f"0..{t.num_class - 1}"
                    )
            w = present.astype(np.float32)
            if t.sample_weight:
                sw = np.nan_to_num(numeric_values(table.column(t.sample_weight)), nan=0.0)
                w = w * sw.astype(np.float32)
            for col, value in t.only_where.items():
                w = w * (numeric_values(table.column(col)) == value)
            labels[t.name] = torch.from_numpy(y.astype(np.float32))
            weights[t.name] = torch.from_numpy(w.astype(np.float32))
    return Batch(inputs, labels, weights)


def task_loss(
    task: TaskConfig, logits: torch.Tensor, y: torch.Tensor, w: torch.Tensor
) -> torch.Tensor:
    """Weighted mean loss over the rows that count for this task (w > 0)."""
    y = torch.nan_to_num(y, nan=0.0)
    if task.kind == "binary":
        per_row = F.binary_cross_entropy_with_logits(logits[:, 0], y, reduction="none")
    elif task.kind == "regression":
        per_row = F.mse_loss(logits[:, 0], y, reduction="none")
    else:
        per_row = F.cross_entropy(logits, y.long(), reduction="none")
    return (per_row * w).sum() / (w > 0).sum().clamp(min=1)


def dense_l2(model: nn.Module) -> torch.Tensor:
    """Sum of squared dense weights (matrices, not biases, norms or embedding tables)."""
    total = torch.zeros(())
    for name, p in model.named_parameters():
        if p.ndim >= 2 and ".tables." not in f".{name}":
            total = total + (p * p).sum()
    return total


@dataclass
class History:
    epochs: list[dict[str, Any]] = field(default_factory=list)
    best_epoch: int = 0
    best: dict[str, float] = field(default_factory=dict)
    gates: dict[str, list[float]] | None = None


class Trainer:
    def __init__(
        self,
        config: RunConfig,
        train_path: str | Path,
        out_dir: str | Path,
        valid_path: str | Path | None = None,
    ) -> None:
        self.config = config
        self.out_dir = Path(out_dir)
        self.train_source = DataSource(train_path, config)
        self.valid_source = DataSource(valid_path, config) if valid_path else None
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.log = (lambda msg: print(msg, flush=True)) if self.rank == 0 else (lambda msg: None)

    # ------------------------------------------------------------------------- data

    def _held_out(self, chunk_index: int, n: int) -> np.ndarray:
        """Rows of a training chunk held back for validation (when there is no --valid)."""
        if self.valid_source is not None or self.config.train.valid_fraction == 0:
            return np.zeros(n, dtype=bool)
        rng = np.random.default_rng([self.config.train.seed, chunk_index])
        return rng.random(n) < self.config.train.valid_fraction

    def _train_chunks(self) -> Iterator[pa.Table]:
        for i, chunk in enumerate(self.train_source.batches(self.config.train.read_rows)):
            keep = ~self._held_out(i, chunk.num_rows)
            yield chunk.filter(pa.array(keep))

    def _valid_table(self) -> pa.Table | None:
        if self.valid_source is not None:
            return pa.concat_tables(self.valid_source.batches(self.config.train.read_rows))
        parts = [
            chunk.filter(pa.array(self._held_out(i, chunk.num_rows)))
            for i, chunk in enumerate(self.train_source.batches(self.config.train.read_rows))
        ]
        table = pa.concat_tables(parts) if parts else None
        return table if table is not None and table.num_rows else None

    # ------------------------------------------------------------------------- run

    def fit_schema(self) -> tuple[FeatureSchema, int]:
        fitter = SchemaFitter(self.config)
        rows = 0
        for chunk in self._train_chunks():
            fitter.update(chunk)
            rows += chunk.num_rows
        if rows == 0:
            raise ValueError(f"{self.train_source.path}: no training rows")
        return fitter.build(), rows

    def run(self) -> History:
        cfg = self.config
        torch.manual_seed(cfg.train.seed)
        distributed = self.world > 1
        if distributed:
            torch.distributed.init_process_group("gloo")
        t0 = time.perf_counter()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if self.rank == 0:
            schema, n_rows = self.fit_schema()
            schema.save(self.out_dir / "schema.json")
            save_config(cfg, self.out_dir)
        if distributed:
            counts = [0]
            if self.rank == 0:
                counts = [n_rows]
            torch.distributed.broadcast_object_list(counts, src=0)
            n_rows = counts[0]
            schema = FeatureSchema.load(self.out_dir / "schema.json")
        self.log(f"schema fitted on {n_rows} rows in {time.perf_counter() - t0:.1f}s")

        torch.manual_seed(cfg.train.seed)
        model = build_model(cfg, schema)
        ddp: nn.Module = nn.parallel.DistributedDataParallel(model) if distributed else model
        opt_cls = torch.optim.AdamW if cfg.train.optimizer == "adamw" else torch.optim.Adam
        optimizer = opt_cls(
            model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay
        )
        steps_per_epoch = math.ceil(n_rows / self.world / cfg.train.batch_size)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, self._lr_lambda(steps_per_epoch * cfg.train.epochs, steps_per_epoch)
        )
        valid_table = self._valid_table()
        valid = encode_table(valid_table, schema, cfg.tasks) if valid_table is not None else None
        history = History()
        best_value: float | None = None
        stale = 0
        gen = torch.Generator().manual_seed(cfg.train.seed + self.rank)
        for epoch in range(1, cfg.train.epochs + 1):
            losses = self._train_epoch(
                ddp, model, optimizer, scheduler, schema, gen, epoch, steps_per_epoch
            )
            record: dict[str, Any] = {"epoch": epoch, "train_loss": losses}
            if valid is not None:
                record["valid"] = evaluate(model, cfg, valid)
            history.epochs.append(record)
            value = self._monitored(record)
            improved = best_value is None or (
                value > best_value if self._mode() == "max" else value < best_value
            )
            summary = " ".join(f"{k}={v:.4f}" for k, v in record.get("valid", {}).items())
            self.log(f"epoch {epoch}: train loss {losses['total']:.4f}  valid {summary}")
            if improved:
                best_value, stale = value, 0
                history.best_epoch = epoch
                history.best = dict(record.get("valid", {}))
                if self.rank == 0:
                    save_weights(model, self.out_dir)
            else:
                stale += 1
                es = cfg.train.early_stopping
                if es is not None and stale >= es.patience:
                    self.log(f"early stopping: no better {es.metric} for {stale} epochs")
                    break
        if self.rank == 0:
            # Analyses use the best weights, as export does.
            state = torch.load(self.out_dir / "weights.pt", weights_only=True)
            model.load_state_dict(state)
            if valid is not None and isinstance(model.net, MMoE):
                history.gates = gate_utilisation(model, valid)
            self._write_metrics(history, n_rows, time.perf_counter() - t0)
        best = " ".join(f"{k}={v:.4f}" for k, v in history.best.items())
        self.log(f"best epoch {history.best_epoch}: {best}")
        self.log(f"run written to {self.out_dir}")
        if distributed:
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()
        return history

    def _mode(self) -> str:
        es = self.config.train.early_stopping
        return es.mode if es else "max"

    def _monitored(self, record: dict[str, Any]) -> float:
        """The value that picks the best epoch: the early-stopping metric, else the first
        metric of the first task, else (no validation data) the negated training loss."""
        es = self.config.train.early_stopping
        valid = record.get("valid", {})
        if es is not None:
            source = {"loss": record["train_loss"]["total"], **valid}
            if es.metric not in source:
                raise ValueError(
                    f"train.early_stopping.metric: {es.metric!r} is not computed; "
                    f"available: {sorted(source)}"
                )
            return float(source[es.metric])
        if valid:
            name, value = next(iter(valid.items()))
            lower_better = name.split("_")[0] in ("mse", "mae", "logloss")
            return -value if lower_better else value
        return -float(record["train_loss"]["total"])

    def _lr_lambda(self, total_steps: int, steps_per_epoch: int):
        t = self.config.train

        def factor(step: int) -> float:
            if step < t.warmup_steps:
                return (step + 1) / t.warmup_steps
            if t.lr_schedule == "cosine":
                progress = min(1.0, (step - t.warmup_steps) / max(1, total_steps - t.warmup_steps))
                return 0.5 * (1 + math.cos(math.pi * progress))
            if t.lr_schedule == "step":
                return float(t.step_gamma ** (step // max(1, steps_per_epoch)))
            return 1.0

        return factor

    def _train_epoch(
        self,
        ddp: nn.Module,
        model: RankingModel,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        schema: FeatureSchema,
        gen: torch.Generator,
        epoch: int,
        steps_per_epoch: int,
    ) -> dict[str, float]:
        cfg = self.config
        model.train()
        sums = {t.name: 0.0 for t in cfg.tasks} | {"total": 0.0}
        steps = 0
        bar = tqdm(
            total=steps_per_epoch,
            desc=f"epoch {epoch}",
            disable=None if (cfg.train.progress and self.rank == 0) else True,
            file=sys.stderr,
            leave=False,
        )
        join = ddp.join() if isinstance(ddp, nn.parallel.DistributedDataParallel) else nullcontext()
        with join:
            for chunk in self._train_chunks():
                if self.world > 1:
                    chunk = chunk.take(pa.array(np.arange(self.rank, chunk.num_rows, self.world)))
                if chunk.num_rows == 0:
                    continue
                data = encode_table(chunk, schema, cfg.tasks)
                order = torch.randperm(len(data), generator=gen)
                for start in range(0, len(data), cfg.train.batch_size):
                    batch = data.take(order[start : start + cfg.train.batch_size])
                    logits, emb_sq = ddp(batch.inputs, with_embedding_l2=True)
                    per_task = {
                        t.name: task_loss(
                            t, logits[t.name], batch.labels[t.name], batch.weights[t.name]
                        )
                        for t in cfg.tasks
                    }
                    loss = sum(t.weight * per_task[t.name] for t in cfg.tasks)
                    if cfg.model.l2:
                        loss = loss + cfg.model.l2 * dense_l2(model)
                    if cfg.model.embedding_l2:
                        loss = loss + cfg.model.embedding_l2 * emb_sq
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()  # type: ignore[union-attr]
                    optimizer.step()
                    scheduler.step()
                    steps += 1
                    for name, v in per_task.items():
                        sums[name] += v.item()
                    sums["total"] += loss.item()  # type: ignore[union-attr]
                    bar.update(1)
                    bar.set_postfix({k: f"{v / steps:.4f}" for k, v in sums.items()})
        bar.close()
        return {k: v / max(steps, 1) for k, v in sums.items()}

    def _write_metrics(self, history: History, n_rows: int, seconds: float) -> None:
        cfg = self.config
        payload = {
            "name": cfg.name,
            "version": cfg.version,
            "config_hash": config_hash(cfg),
            "train_rows": n_rows,
            "train_seconds": round(seconds, 2),
            "world_size": self.world,
            "best_epoch": history.best_epoch,
            "best": history.best,
            "epochs": history.epochs,
            "gates": history.gates,
        }
        (self.out_dir / "metrics.json").write_text(json.dumps(payload, indent=1, allow_nan=True))


@torch.no_grad()
def predict(model: RankingModel, batch: Batch, batch_size: int = 8192) -> dict[str, np.ndarray]:
    """Exported outputs (`probs_<task>`, `y_<task>`, `logits_<task>`) for encoded rows."""
    was_training = model.training
    model.eval()
    parts: dict[str, list[np.ndarray]] = {}
    n = len(next(iter(batch.inputs.values())))
    for start in range(0, n, batch_size):
        chunk = {k: v[start : start + batch_size] for k, v in batch.inputs.items()}
        logits = model(chunk)
        for task in model.tasks:
            for name, value in task_outputs(task, logits[task.name]).items():
                parts.setdefault(name, []).append(value.numpy())
    model.train(was_training)
    return {k: np.concatenate(v) for k, v in parts.items()}


def evaluate(model: RankingModel, config: RunConfig, data: Batch) -> dict[str, float]:
    out = predict(model, data)
    metrics: dict[str, float] = {}
    for t in config.tasks:
        scores = out[f"y_{t.name}"] if t.kind == "regression" else out[f"probs_{t.name}"]
        labels = data.labels[t.name].numpy().astype(np.float64)
        # Evaluate on the rows the task is trained on (only_where), as EasyRec's ESMM does.
        labels = np.where(data.weights[t.name].numpy() > 0, labels, np.nan)
        metrics.update(task_metrics(t.default_metrics, t.kind, labels, scores, t.name))
    return metrics


@torch.no_grad()
def gate_utilisation(model: RankingModel, data: Batch) -> dict[str, list[float]]:
    """Mean gate weight per task and expert on the given rows."""
    was_training = model.training
    model.eval()
    x, _ = model.dense_input(data.inputs)
    assert isinstance(model.net, MMoE)
    g = model.net.gate_weights(x).mean(dim=1)  # [tasks, K]
    model.train(was_training)
    return {t.name: g[i].tolist() for i, t in enumerate(model.tasks)}


def train(
    config: RunConfig,
    train_path: str | Path,
    out_dir: str | Path,
    valid_path: str | Path | None = None,
) -> History:
    """Train and write RUN_DIR; returns the per-epoch history."""
    return Trainer(config, train_path, out_dir, valid_path).run()


def main(argv: list[str] | None = None) -> int:
    """Entry point for `torchrun -m model.train --config ... --data ... --out ...`."""
    import argparse

    from model.config import ConfigError, load_config

    p = argparse.ArgumentParser(prog="python -m model.train")
    p.add_argument("--config", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--valid")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    try:
        train(load_config(args.config), args.data, args.out, args.valid)
    except (ConfigError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
