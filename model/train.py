"""Training: fit the feature schema, train the network, keep the best epoch, write RUN_DIR.

Data is streamed: the file is read `train.read_rows` rows at a time (rows shuffled within each
chunk when `train.shuffle`), and batches of exactly `train.batch_size` rows are cut across chunk
boundaries, so the chunk size changes neither the validation split nor (without shuffling) the
batches. Validation rows are held out by a hash of their row number and the seed.

Single process by default; under `torchrun` (WORLD_SIZE > 1) the processes train one model with
DistributedDataParallel (gloo). `train.batch_size` stays the global batch: every process takes
its share of each batch, so all take the same number of steps and the result matches a single
process within noise. Rank 0 fits the schema (and sends it to the others), evaluates, decides
on early stopping and writes the run.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from mmoe.model.checkpoint import (
    build_model,
    config_hash,
    save_config,
    save_valid_sample,
    save_weights,
)
from mmoe.model.config import RunConfig, TaskConfig, higher_is_better
from mmoe.model.data import DataSource
from mmoe.model.metrics import task_metrics
from mmoe.model.network import PLE, MMoE, RankingModel, task_outputs
from mmoe.model.schema import FeatureSchema, SchemaFitter, numeric_values


@dataclass
class Batch:
    inputs: dict[str, torch.Tensor]
    labels: dict[str, torch.Tensor]  # per task; NaN = missing
    weights: dict[str, torch.Tensor]  # per task loss weight; 0 = not in this task's loss
    # per task: the label is present and the row is in the task's space (`only_where`); the
    # rows its metrics are computed on
    masks: dict[str, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(next(iter(self.inputs.values())))

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Batch:
        return Batch(
            {k: fn(v) for k, v in self.inputs.items()},
            {k: fn(v) for k, v in self.labels.items()},
            {k: fn(v) for k, v in self.weights.items()},
            {k: fn(v) for k, v in self.masks.items()},
        )

    def take(self, idx: torch.Tensor) -> Batch:
        return self._map(lambda v: v[idx])

    def slice(self, start: int, stop: int) -> Batch:
        return self._map(lambda v: v[start:stop])

    @staticmethod
    def concat(a: Batch, b: Batch) -> Batch:
        def cat(x: dict[str, torch.Tensor], y: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            return {k: torch.cat([x[k], y[k]]) for k in x}

        return Batch(
            cat(a.inputs, b.inputs),
            cat(a.labels, b.labels),
            cat(a.weights, b.weights),
            cat(a.masks, b.masks),
        )


def encode_table(
    table: pa.Table, schema: FeatureSchema, tasks: list[TaskConfig], with_labels: bool = True
) -> Batch:
    """Raw rows -> tensors: encoded features, labels, per-task loss weights and metric masks."""
    inputs = {k: torch.from_numpy(v) for k, v in schema.encode(table).items()}
    labels: dict[str, torch.Tensor] = {}
    weights: dict[str, torch.Tensor] = {}
    masks: dict[str, torch.Tensor] = {}
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
            if t.kind == "regression" and not np.isfinite(y[present]).all():
                raise ValueError(f"task {t.name!r}: label column {t.label!r} has inf values")
            in_task = present.copy()
            for col, value in t.only_where.items():
                in_task &= numeric_values(table.column(col)) == value
            w = in_task.astype(np.float32)
            if t.sample_weight:
                sw = numeric_values(table.column(t.sample_weight))
                if (sw[~np.isnan(sw)] < 0).any():
                    raise ValueError(
                        f"task {t.name!r}: sample_weight column {t.sample_weight!r} has "
                        "negative values"
                    )
                w *= np.nan_to_num(sw, nan=0.0).astype(np.float32)
            labels[t.name] = torch.from_numpy(y.astype(np.float32))
            weights[t.name] = torch.from_numpy(w)
            masks[t.name] = torch.from_numpy(in_task)
    return Batch(inputs, labels, weights, masks)


def task_loss(
    task: TaskConfig, logits: torch.Tensor, y: torch.Tensor, w: torch.Tensor
) -> torch.Tensor:
    """sum(w * loss) / count(w > 0): the mean over the rows that count for this task, each
    scaled by its sample weight (TensorFlow's SUM_BY_NONZERO_WEIGHTS, as in EasyRec)."""
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


def held_out(seed: int, first_row: int, n: int, fraction: float) -> np.ndarray:
    """Whether each of rows first_row..first_row+n-1 of a file is a validation row: a hash of
    the row number and the seed (splitmix64), so the split does not depend on chunking."""
    if fraction <= 0:
        return np.zeros(n, dtype=bool)
    with np.errstate(over="ignore"):
        z = np.arange(first_row, first_row + n, dtype=np.uint64) + np.uint64(seed & (2**63 - 1))
        z = z * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / 2.0**53 < fraction


@dataclass
class History:
    epochs: list[dict[str, Any]] = field(default_factory=list)
    best_epoch: int = 0
    best: dict[str, float] = field(default_factory=dict)
    gates: dict[str, list[float]] | None = None
    gate_experts: list[str] | None = None
    stopped_early: bool = False


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
        self.log: Callable[[str], None] = (
            (lambda msg: print(msg, flush=True)) if self.rank == 0 else (lambda msg: None)
        )

    # ------------------------------------------------------------------------- data

    def _chunks(self, validation: bool) -> Iterator[pa.Table]:
        """The training file's training rows (or, with `validation`, its held-out rows)."""
        t = self.config.train
        fraction = 0.0 if self.valid_source is not None else t.valid_fraction
        first = 0
        for chunk in self.train_source.batches(t.read_rows):
            held = held_out(t.seed, first, chunk.num_rows, fraction)
            first += chunk.num_rows
            keep = held if validation else ~held
            if keep.all():
                yield chunk
            elif keep.any():
                yield chunk.filter(pa.array(keep))

    def _valid_table(self) -> pa.Table | None:
        if self.valid_source is not None:
            parts = list(self.valid_source.batches(self.config.train.read_rows))
        else:
            parts = list(self._chunks(validation=True))
        return pa.concat_tables(parts) if parts else None

    def steps_per_epoch(self, rows: int) -> int:
        full, last = divmod(rows, self.config.train.batch_size)
        # A last partial batch too small to give every process a row is dropped.
        return full + (1 if last >= self.world else 0)

    def epoch_batches(self, schema: FeatureSchema, epoch: int, rows: int) -> Iterator[Batch]:
        """This process's share of each of the epoch's batches (all of it in one process).

        Row j of the epoch's row stream belongs to batch j // B, and to process
        (j % B) % world; each chunk is encoded once, only the rows this process needs.
        """
        cfg = self.config
        size, world = cfg.train.batch_size, self.world
        end = self.steps_per_epoch(rows) * size  # stream positions past this are dropped
        pending: Batch | None = None
        pending_ids = np.zeros(0, dtype=np.int64)
        first = 0  # stream position of the chunk's first row
        for i, chunk in enumerate(self._chunks(validation=False)):
            n = chunk.num_rows
            if cfg.train.shuffle:
                order = np.random.default_rng([cfg.train.seed, epoch, i]).permutation(n)
            else:
                order = np.arange(n)
            pos = np.arange(first, first + n)
            first += n
            mine = ((pos % size) % world == self.rank) & (pos < end)
            if not mine.any():
                continue
            data = encode_table(chunk.take(pa.array(order[mine])), schema, cfg.tasks)
            ids = pos[mine] // size
            if pending is not None:
                data = Batch.concat(pending, data)
                ids = np.concatenate([pending_ids, ids])
            # Batches whose rows have all been read; the rest waits for the next chunk.
            complete = int(np.searchsorted(ids, first // size))
            yield from _split_by_id(data, ids[:complete])
            pending = data.slice(complete, len(data)) if complete < len(data) else None
            pending_ids = ids[complete:]
        if pending is not None:
            yield from _split_by_id(pending, pending_ids)

    # ------------------------------------------------------------------------- run

    def fit_schema(self) -> tuple[FeatureSchema, int]:
        fitter = SchemaFitter(self.config)
        rows = 0
        for chunk in self._chunks(validation=False):
            fitter.update(chunk)
            rows += chunk.num_rows
        if rows == 0:
            raise ValueError(f"{self.train_source.path}: no training rows")
        return fitter.build(), rows

    def _shared_schema(self) -> tuple[FeatureSchema, int]:
        """Rank 0 fits the schema and sends it (or its error) to every process."""
        payload: list[Any] = [None, 0, None]
        if self.rank == 0:
            try:
                schema, rows = self.fit_schema()
                payload = [schema.model_dump_json(), rows, None]
            except ValueError as err:
                payload = [None, 0, str(err)]
        if self.world > 1:
            dist.broadcast_object_list(payload, src=0)
        if payload[2] is not None:
            raise ValueError(payload[2])
        return FeatureSchema.model_validate_json(payload[0]), int(payload[1])

    def run(self) -> History:
        distributed = self.world > 1
        threads = torch.get_num_threads()
        if self.config.train.threads:
            torch.set_num_threads(self.config.train.threads)
        if distributed:
            dist.init_process_group("gloo")
        try:
            return self._run()
        finally:
            if distributed:
                dist.destroy_process_group()
            torch.set_num_threads(threads)

    def _run(self) -> History:
        cfg = self.config
        t0 = time.perf_counter()
        schema, n_rows = self._shared_schema()
        if self.rank == 0:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            schema.save(self.out_dir / "schema.json")
            save_config(cfg, self.out_dir)
        self.log(f"schema fitted on {n_rows} rows in {time.perf_counter() - t0:.1f}s")

        torch.manual_seed(cfg.train.seed)
        model = build_model(cfg, schema)
        torch.manual_seed(cfg.train.seed + self.rank)  # dropout differs between processes
        ddp: nn.Module = nn.parallel.DistributedDataParallel(model) if self.world > 1 else model
        opt_cls = torch.optim.AdamW if cfg.train.optimizer == "adamw" else torch.optim.Adam
        optimizer = opt_cls(
            model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay
        )
        steps = self.steps_per_epoch(n_rows)
        if cfg.train.batch_size < self.world or steps == 0:
            raise ValueError(
                f"{self.world} processes need train.batch_size and the training rows ({n_rows}) "
                f"to be at least {self.world}"
            )
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, self._lr_lambda(steps * cfg.train.epochs, steps)
        )
        valid = None
        if self.rank == 0:
            valid_table = self._valid_table()
            if valid_table is not None and valid_table.num_rows:
                valid = encode_table(valid_table, schema, cfg.tasks)
        history = History()
        best_value: float | None = None
        stale = 0
        for epoch in range(1, cfg.train.epochs + 1):
            t_epoch = time.perf_counter()
            losses = self._train_epoch(ddp, model, optimizer, scheduler, schema, epoch, n_rows)
            stop = False
            if self.rank == 0:
                record: dict[str, Any] = {
                    "epoch": epoch,
                    "train_loss": losses,
                    "lr": optimizer.param_groups[0]["lr"],
                }
                if valid is not None:
                    record["valid"] = evaluate(model, cfg, valid)
                record["seconds"] = round(time.perf_counter() - t_epoch, 2)
                history.epochs.append(record)
                value = self._monitored(record)
                improved = best_value is None or (
                    value > best_value if self._maximise() else value < best_value
                )
                summary = " ".join(f"{k}={v:.4f}" for k, v in record.get("valid", {}).items())
                self.log(f"epoch {epoch}: train loss {losses['total']:.4f}  valid {summary}")
                if improved:
                    best_value, stale = value, 0
                    history.best_epoch = epoch
                    history.best = dict(record.get("valid", {}))
                    save_weights(model, self.out_dir)
                else:
                    stale += 1
                    es = cfg.train.early_stopping
                    if es is not None and stale >= es.patience and epoch < cfg.train.epochs:
                        self.log(f"early stopping: no better {es.metric} for {stale} epochs")
                        stop = history.stopped_early = True
            if self.world > 1:
                flag = [stop]
                dist.broadcast_object_list(flag, src=0)
                stop = bool(flag[0])
            if stop:
                break
        if self.world > 1:
            _check_in_sync(model)
        if self.rank == 0:
            # Analyses use the best weights, as export does.
            state = torch.load(self.out_dir / "weights.pt", weights_only=True)
            model.load_state_dict(state)
            if valid is not None and isinstance(model.net, MMoE | PLE):
                history.gates, history.gate_experts = gate_utilisation(model, valid)
            valid_rows = len(valid) if valid is not None else 0
            self._write_metrics(history, n_rows, valid_rows, steps, time.perf_counter() - t0)
            save_valid_sample(valid_table, cfg, self.out_dir)
            best = " ".join(f"{k}={v:.4f}" for k, v in history.best.items())
            self.log(f"best epoch {history.best_epoch}: {best}")
            self.log(f"run written to {self.out_dir}")
        if self.world > 1:
            dist.barrier()  # every process returns once the run is written
        return history

    def _maximise(self) -> bool:
        es = self.config.train.early_stopping
        if es is not None:
            return es.maximise
        return True  # _monitored negates lower-is-better metrics

    def _monitored(self, record: dict[str, Any]) -> float:
        """The value that picks the best epoch: the early-stopping metric, else the first
        metric of the first task (negated when lower is better), else (no validation data) the
        negated training loss."""
        es = self.config.train.early_stopping
        valid = record.get("valid", {})
        if es is not None:
            source = {"loss": record["train_loss"]["total"], **valid}
            return float(source[es.metric])
        if valid:
            name, value = next(iter(valid.items()))
            return value if higher_is_better(name) else -value
        return -float(record["train_loss"]["total"])

    def _lr_lambda(self, total_steps: int, steps_per_epoch: int) -> Callable[[int], float]:
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
        epoch: int,
        n_rows: int,
    ) -> dict[str, float]:
        cfg = self.config
        model.train()
        names = [t.name for t in cfg.tasks]
        sums = torch.zeros(len(names) + 1, dtype=torch.float64)  # per task, then total
        steps = 0
        bar = tqdm(
            total=self.steps_per_epoch(n_rows),
            desc=f"epoch {epoch}",
            disable=not (cfg.train.progress and self.rank == 0),
            file=sys.stderr,
            leave=False,
            dynamic_ncols=True,
        )
        for batch in self.epoch_batches(schema, epoch, n_rows):
            logits, emb_sq = ddp(batch.inputs, with_embedding_l2=True)
            per_task = [
                task_loss(t, logits[t.name], batch.labels[t.name], batch.weights[t.name])
                for t in cfg.tasks
            ]
            loss = torch.stack([t.weight * v for t, v in zip(cfg.tasks, per_task, strict=True)])
            loss = loss.sum()
            if cfg.model.l2:
                loss = loss + cfg.model.l2 * dense_l2(model)
            if cfg.model.embedding_l2:
                loss = loss + cfg.model.embedding_l2 * emb_sq
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            steps += 1
            sums += torch.stack([*per_task, loss]).detach().double()
            bar.update(1)
            running = sums / steps
            bar.set_postfix(
                {"loss": f"{running[-1]:.4f}"}
                | {n: f"{running[i]:.4f}" for i, n in enumerate(names)},
                refresh=False,
            )
        bar.refresh()  # the epoch's final running losses, however short the epoch was
        bar.close()
        if self.world > 1:  # the mean over every process's batches
            dist.all_reduce(sums)
            sums /= self.world
        means = (sums / max(steps, 1)).tolist()
        return {n: means[i] for i, n in enumerate(names)} | {"total": means[-1]}

    def _write_metrics(
        self, history: History, n_rows: int, valid_rows: int, steps: int, seconds: float
    ) -> None:
        cfg = self.config
        payload = {
            "name": cfg.name,
            "version": cfg.version,
            "config_hash": config_hash(cfg),
            "train_rows": n_rows,
            "valid_rows": valid_rows,
            "steps_per_epoch": steps,
            "train_seconds": round(seconds, 2),
            "world_size": self.world,
            "threads": torch.get_num_threads(),
            "best_epoch": history.best_epoch,
            "best": history.best,
            "stopped_early": history.stopped_early,
            "epochs": history.epochs,
            "gates": history.gates,
            "gate_experts": history.gate_experts,
        }
        (self.out_dir / "metrics.json").write_text(json.dumps(payload, indent=1, allow_nan=True))


def _check_in_sync(model: nn.Module) -> None:
    """Every process must end with rank 0's weights (DDP averages the same gradients into the
    same optimiser steps); a difference means the processes trained different models."""
    with torch.no_grad():
        flat = torch.cat([p.detach().flatten().double() for p in model.parameters()])
        spread = torch.stack([flat, -flat])
        dist.all_reduce(spread, op=dist.ReduceOp.MAX)
        gap = float((spread[0] + spread[1]).max())  # max over processes - min over processes
    if gap > 0:
        raise RuntimeError(f"the processes' weights differ by up to {gap:.3g} after training")


def _split_by_id(data: Batch, ids: np.ndarray) -> Iterator[Batch]:
    """Consecutive runs of equal batch ids -> one Batch each."""
    if len(ids) == 0:
        return
    starts = np.flatnonzero(np.diff(ids)) + 1
    bounds = [0, *starts.tolist(), len(ids)]
    for a, b in itertools.pairwise(bounds):
        yield data.slice(a, b)


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


@torch.no_grad()
def evaluate(model: RankingModel, config: RunConfig, data: Batch) -> dict[str, float]:
    """Each task's metrics on the rows in its space (label present, `only_where` holds), and
    `loss`: the weighted sum of the task losses (without regularisation)."""
    was_training = model.training
    model.eval()
    metrics: dict[str, float] = {}
    total = 0.0
    logits: dict[str, list[torch.Tensor]] = {t.name: [] for t in config.tasks}
    for start in range(0, len(data), 8192):
        out = model({k: v[start : start + 8192] for k, v in data.inputs.items()})
        for t in config.tasks:
            logits[t.name].append(out[t.name])
    model.train(was_training)
    for t in config.tasks:
        z = torch.cat(logits[t.name])
        y, w = data.labels[t.name], data.weights[t.name]
        total += t.weight * float(task_loss(t, z, y, w))
        head = next(h for h in model.tasks if h.name == t.name)
        outputs = task_outputs(head, z)
        scores = outputs[f"y_{t.name}" if t.kind == "regression" else f"probs_{t.name}"]
        labels = np.where(data.masks[t.name].numpy(), y.numpy().astype(np.float64), np.nan)
        metrics.update(task_metrics(t.default_metrics, t.kind, labels, scores.numpy(), t.name))
    metrics["loss"] = total
    return metrics


@torch.no_grad()
def gate_utilisation(model: RankingModel, data: Batch) -> tuple[dict[str, list[float]], list[str]]:
    """Mean gate weight per task and expert on the given rows, and the experts' names."""
    was_training = model.training
    model.eval()
    x, _ = model.dense_input(data.inputs)
    net = model.net
    assert isinstance(net, MMoE | PLE)
    g = net.gate_weights(x).mean(dim=1)  # [tasks, experts]
    model.train(was_training)
    return {t.name: g[i].tolist() for i, t in enumerate(model.tasks)}, net.expert_names


def train(
    config: RunConfig,
    train_path: str | Path,
    out_dir: str | Path,
    valid_path: str | Path | None = None,
) -> History:
    """Train and write RUN_DIR; returns the per-epoch history (complete on rank 0)."""
    return Trainer(config, train_path, out_dir, valid_path).run()


def main(argv: list[str] | None = None) -> int:
    """Entry point for `torchrun -m model.train --config ... --data ... --out ...`."""
    import argparse

    from mmoe.model.config import ConfigError, load_config

    p = argparse.ArgumentParser(prog="python -m mmoe.model.train")
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
