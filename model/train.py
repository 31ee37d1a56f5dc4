"""The training recipe: fit the feature schema, train the network, keep the best epoch, write
RUN_DIR. Data comes from `model/batches.py`, losses from `model/losses.py`, validation from
`model/evaluation.py`.

    recipe_main(args)     `mmoe train`, and each process torchrun starts (`-m mmoe train`)
      train(config, ...)  the Python API: Trainer(...).run()
        Trainer.setup()     schema, model (DDP), optimiser and schedule, validation rows
        Trainer.train()     per epoch: _train_epoch, validate, keep_best (early stopping)
        Trainer.finalize()  best weights' analyses, metrics.json, the validation sample

Single process by default; under `torchrun` (WORLD_SIZE > 1) the processes train one model with
DistributedDataParallel (gloo). `train.batch_size` stays the global batch: every process takes
its share of each batch, so all take the same number of steps and the result matches a single
process within noise. Rank 0 fits the schema (and sends it to the others), evaluates, decides
on early stopping and writes the run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from mmoe.model.batches import Batch, BatchStream, encode_table
from mmoe.model.checkpoint import (
    build_model,
    config_hash,
    prepare_run_dir,
    save_config,
    save_valid_sample,
    save_weights,
)
from mmoe.model.config import ConfigError, RunConfig, higher_is_better, load_config
from mmoe.model.data import DataSource
from mmoe.model.evaluation import evaluate, expert_health, feature_rates, mean_scores
from mmoe.model.losses import (
    TaskBalancer,
    UncertaintyWeighting,
    dense_l2,
    fit_label_scales,
    task_balancer,
    task_loss,
)
from mmoe.model.network import PLE, MMoE, RankingModel
from mmoe.model.schema import FeatureSchema, SchemaFitter

OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "adagrad": torch.optim.Adagrad,
}


@dataclass
class History:
    epochs: list[dict[str, Any]] = field(default_factory=list)
    best_epoch: int = 0
    best: dict[str, float] = field(default_factory=dict)
    gates: dict[str, list[float]] | None = None
    gate_experts: list[str] | None = None
    # On the validation rows, for monitoring: each feature's share of values per outcome
    # ("features") and the mean score per task ("scores"); see model/evaluation.py.
    reference: dict[str, Any] | None = None
    stopped_early: bool = False
    warnings: list[dict[str, Any]] = field(default_factory=list)


class Trainer:
    """The recipe, in torchtune's shape: `setup()` builds what training needs, `train()` runs
    the epochs, `finalize()` writes the run; `run()` does the three inside the process's
    resources (torch threads, the DDP process group). Each step is a method of its own."""

    def __init__(
        self,
        config: RunConfig,
        train_path: str | Path,
        out_dir: str | Path,
        valid_path: str | Path | None = None,
    ) -> None:
        self.config = config
        self.out_dir = Path(out_dir)
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        es = config.train.early_stopping
        no_valid = not valid_path and config.train.valid_fraction == 0
        if es is not None and es.metric != "loss" and no_valid:
            raise ConfigError(
                f"train.early_stopping.metric: {es.metric!r} is measured on validation rows "
                "and there are none (train.valid_fraction is 0 and no validation file); "
                "set train.valid_fraction, give a validation file, or use metric: loss"
            )
        self.batches = BatchStream(
            config,
            DataSource(train_path, config),
            DataSource(valid_path, config) if valid_path else None,
            self.world,
            self.rank,
        )
        self.log: Callable[[str], None] = (
            (lambda msg: print(msg, flush=True)) if self.rank == 0 else (lambda msg: None)
        )
        self.history = History()
        # Built by setup():
        self.schema: FeatureSchema
        self.n_rows: int  # training rows
        self.model: RankingModel
        self.ddp: nn.Module  # the model, wrapped by DDP in several processes
        self.balancer: TaskBalancer
        self.optimizer: torch.optim.Optimizer
        self.steps: int  # per epoch
        self.total_steps: int  # in the run: the epochs', or train.num_steps if fewer
        self.scheduler: torch.optim.lr_scheduler.LRScheduler
        self.valid: Batch | None = None  # encoded validation rows (rank 0)
        self.valid_table: pa.Table | None = None  # and as read (rank 0)
        self._started = 0.0  # when setup began
        # The best epoch so far (train()):
        self._best_value: float | None = None
        self._stale = 0  # epochs since it

    def run(self) -> History:
        """setup, train, finalize; returns the per-epoch history (complete on rank 0)."""
        distributed = self.world > 1
        threads = torch.get_num_threads()
        if self.config.train.threads:
            torch.set_num_threads(self.config.train.threads)
        if distributed:
            dist.init_process_group("gloo")
        try:
            self.setup()
            self.train()
            self.finalize()
            return self.history
        finally:
            if distributed:
                dist.destroy_process_group()
            torch.set_num_threads(threads)

    # ------------------------------------------------------------------------ setup

    def setup(self) -> None:
        """The schema (fitted, written), the model, the optimiser and its schedule, and the
        validation rows."""
        self._started = time.perf_counter()
        self.setup_schema()
        self.setup_model()
        self.setup_optimizer()
        self.setup_validation()

    def fit_schema(self) -> tuple[FeatureSchema, int]:
        """The feature schema fitted on the training rows, and how many there are."""
        fitter = SchemaFitter(self.config)
        rows = 0
        for chunk in self.batches.chunks():
            fitter.update(chunk)
            rows += chunk.num_rows
        if rows == 0:
            raise ValueError(f"{self.batches.train_source.path}: no training rows")
        return fitter.build(), rows

    def setup_schema(self) -> None:
        """Rank 0 fits the schema, sends it (or its error) to every process, and writes it and
        the config into RUN_DIR."""
        t0 = time.perf_counter()
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
        self.schema = FeatureSchema.model_validate_json(payload[0])
        self.n_rows = int(payload[1])
        if self.rank == 0:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self.schema.save(self.out_dir / "schema.json")
            save_config(self.config, self.out_dir)
        self.log(f"schema fitted on {self.n_rows} rows in {time.perf_counter() - t0:.1f}s")

    def setup_model(self) -> None:
        """The model, its weights drawn from train.seed (the same in every process), wrapped by
        DDP in several processes."""
        seed = self.config.train.seed
        torch.manual_seed(seed)
        self.model = build_model(self.config, self.schema)
        torch.manual_seed(seed + self.rank)  # dropout differs between processes
        self.ddp = nn.parallel.DistributedDataParallel(self.model) if self.world > 1 else self.model

    def setup_optimizer(self) -> None:
        """The task balancer, the optimiser over the model's (and a learned balancer's)
        parameters, and the learning-rate schedule."""
        t = self.config.train
        opt_cls = OPTIMIZERS[t.optimizer]
        self.balancer = task_balancer(self.config)
        groups: list[dict[str, Any]] = [{"params": list(self.model.parameters())}]
        if self.balancer.network_parameters():
            assert isinstance(self.balancer, UncertaintyWeighting)
            groups.append(
                {
                    "params": self.balancer.network_parameters(),
                    "lr": self.balancer.lr,
                    "weight_decay": 0.0,
                }
            )
        self.optimizer = opt_cls(groups, lr=t.lr, weight_decay=t.weight_decay)
        self.steps = self.batches.steps_per_epoch(self.n_rows)
        if t.batch_size < self.world or self.steps == 0:
            raise ValueError(
                f"{self.world} processes need train.batch_size and the training rows "
                f"({self.n_rows}) to be at least {self.world}"
            )
        # train.num_steps ends the run early (at most the epochs' steps); the schedule spans it.
        self.total_steps = min(self.steps * t.epochs, t.num_steps or self.steps * t.epochs)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, self._lr_lambda(self.total_steps, self.steps)
        )

    def setup_validation(self) -> None:
        """Rank 0 reads and encodes the validation rows (a file, or those held out)."""
        if self.rank != 0:
            return
        self.valid_table = self.batches.valid_table()
        if self.valid_table is not None and self.valid_table.num_rows:
            self.valid = encode_table(self.valid_table, self.schema, self.config.tasks)

    # ------------------------------------------------------------------------ train

    def train(self) -> None:
        """The epochs: train, validate, keep the best weights, stop early."""
        cfg = self.config
        for epoch in range(1, cfg.train.epochs + 1):
            t_epoch = time.perf_counter()
            losses = self._train_epoch(epoch)
            train_seconds = time.perf_counter() - t_epoch
            if epoch == 1 and cfg.train.epochs > 1 and cfg.train.cache_mb > 0:
                self.log(self._cache_note())
            stop = False
            if self.rank == 0:
                record = self.validate(epoch, losses)
                # the training steps alone, and with validation
                record["train_seconds"] = round(train_seconds, 2)
                record["rows_per_second"] = round(self.n_rows / train_seconds)
                record["seconds"] = round(time.perf_counter() - t_epoch, 2)
                self.history.epochs.append(record)
                stop = self.keep_best(record)
            if self._all_stop(stop):
                break

    def validate(self, epoch: int, losses: dict[str, float]) -> dict[str, Any]:
        """The epoch's record: training losses, learning rate, task weights, and on the
        validation rows the metrics and expert health (warnings kept in the history)."""
        cfg = self.config
        names = [t.name for t in cfg.tasks]
        record: dict[str, Any] = {
            "epoch": epoch,
            "train_loss": losses,
            "lr": self.optimizer.param_groups[0]["lr"],
            "task_weights": dict(zip(names, self.balancer.weights(), strict=True)),
        }
        if self.valid is not None:
            record["valid"] = evaluate(self.model, cfg, self.valid)
            health = expert_health(self.model, self.valid)
            if health is not None:
                record["experts"] = health.record()
                for warning in health.warnings():
                    self._warn(epoch, warning)
        return record

    def keep_best(self, record: dict[str, Any]) -> bool:
        """Logs the epoch, saves the weights if it is the best so far, and says whether early
        stopping ends training here."""
        history, epoch = self.history, record["epoch"]
        name, value = self._monitored(record)
        if math.isnan(value):
            self._warn(
                epoch,
                f"{name} is NaN on the validation rows (a single class?): "
                "this epoch cannot be judged",
            )
        improved = not math.isnan(value) and (self._best_value is None or value > self._best_value)
        summary = " ".join(f"{k}={v:.4f}" for k, v in record.get("valid", {}).items())
        self.log(
            f"epoch {epoch}: train loss {record['train_loss']['total']:.4f} "
            f"({record['seconds']:.1f} s)  valid {summary}"
        )
        if improved:
            self._best_value, self._stale = value, 0
        else:
            self._stale += 1
        # Until an epoch can be judged, the latest weights are kept.
        if improved or self._best_value is None:
            history.best_epoch = epoch
            history.best = dict(record.get("valid", {}))
            save_weights(self.model, self.out_dir)
        es = self.config.train.early_stopping
        if self.scheduler.last_epoch == self.total_steps and epoch < self.config.train.epochs:
            self.log(f"stopping: train.num_steps {self.total_steps} steps done")
            return True
        if es is not None and self._stale >= es.patience and epoch < self.config.train.epochs:
            self.log(f"early stopping: no better {name} for {self._stale} epochs")
            history.stopped_early = True
            return True
        return False

    def _all_stop(self, stop: bool) -> bool:
        """Rank 0's decision, in every process."""
        if self.world > 1:
            flag = [stop]
            dist.broadcast_object_list(flag, src=0)
            stop = bool(flag[0])
        return stop

    # --------------------------------------------------------------------- finalize

    def finalize(self) -> None:
        """Rank 0 reloads the best weights and writes what RUN_DIR holds beside them: the
        gates and the monitoring reference on the validation rows, metrics.json and the
        validation sample. Every process returns once the run is written."""
        if self.world > 1:
            _check_in_sync(self.model)
        if self.rank == 0:
            self._analyse_best()
            valid_rows = len(self.valid) if self.valid is not None else 0
            seconds = time.perf_counter() - self._started
            self._write_metrics(self.history, self.n_rows, valid_rows, self.steps, seconds)
            save_valid_sample(self.valid_table, self.config, self.out_dir)
            best = " ".join(f"{k}={v:.4f}" for k, v in self.history.best.items())
            self.log(f"best epoch {self.history.best_epoch}: {best}")
            self.log(f"run written to {self.out_dir}")
        if self.world > 1:
            dist.barrier()

    def _analyse_best(self) -> None:
        """The best weights' gates and monitoring reference on the validation rows (analyses
        use the best weights, as export does)."""
        state = torch.load(self.out_dir / "weights.pt", weights_only=True)
        self.model.load_state_dict(state)
        if self.valid is None:
            return
        health = expert_health(self.model, self.valid)
        if health is not None:
            self.history.gates, self.history.gate_experts = health.gates, health.experts
        if self.valid_table is not None:
            self.history.reference = {
                "features": feature_rates(self.schema, self.valid_table),
                "scores": mean_scores(self.model, self.valid),
            }

    def _cache_note(self) -> str:
        b = self.batches
        if b.cached:
            return f"encoded training rows kept in memory ({b.cache_mib:.0f} MiB) for epochs 2+"
        return (
            f"encoded training rows exceed train.cache_mb ({self.config.train.cache_mb:g} MiB): "
            "every epoch reads the file"
        )

    def _warn(self, epoch: int, message: str) -> None:
        """Logged, and kept in metrics.json's `warnings`."""
        self.history.warnings.append({"epoch": epoch, "warning": message})
        self.log(f"warning: epoch {epoch}: {message}")

    def _monitored(self, record: dict[str, Any]) -> tuple[str, float]:
        """The metric that picks the best epoch and its value, signed so that larger is better:
        the early-stopping metric, else the first metric of the first task, else (no
        validation rows) the training loss. NaN when the metric is undefined on these rows."""
        es = self.config.train.early_stopping
        valid = record.get("valid", {})
        if es is not None:
            source = {"loss": record["train_loss"]["total"], **valid}
            if es.metric in source:
                value = float(source[es.metric])
                return es.metric, value if es.maximise else -value
            warned = self.history.warnings
            if not any(w["warning"].startswith("train.early_stopping") for w in warned):
                self._warn(
                    record["epoch"],
                    f"train.early_stopping.metric: {es.metric} needs validation rows and there "
                    "are none; the training loss picks the best epoch",
                )
        elif valid:
            name, value = next(iter(valid.items()))
            return name, value if higher_is_better(name) else -value
        return "training loss", -float(record["train_loss"]["total"])

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
            if t.lr_schedule == "exponential":
                decays = (step - t.warmup_steps) / t.decay_steps
                decays = math.floor(decays) if t.staircase else decays
                return max(t.decay_factor**decays, t.min_lr / t.lr)
            return 1.0

        return factor

    def _train_epoch(self, epoch: int) -> dict[str, float]:
        """One pass over the training rows; the mean loss per task and in total."""
        cfg, model, balancer = self.config, self.model, self.balancer
        optimizer, scheduler, n_rows = self.optimizer, self.scheduler, self.n_rows
        model.train()
        names = [t.name for t in cfg.tasks]
        sums = torch.zeros(len(names) + 1, dtype=torch.float64)  # per task, then total
        shared = (
            model.net.last_shared_layer()
            if cfg.train.loss_weighting.kind == "gradnorm" and isinstance(model.net, MMoE | PLE)
            else None
        )
        steps = 0
        bar = tqdm(
            total=self.batches.steps_per_epoch(n_rows),
            desc=f"epoch {epoch}",
            # Off a terminal (a log file, CI, `mmoe bench`) a bar would be one line per refresh;
            # the per-epoch line on stdout says what it would.
            disable=not (cfg.train.progress and self.rank == 0 and sys.stderr.isatty()),
            file=sys.stderr,
            leave=False,
            dynamic_ncols=True,
        )
        for batch in self.batches.epoch(self.schema, epoch, n_rows):
            if scheduler.last_epoch == cfg.train.num_steps:  # the run's last step is done
                break
            if scheduler.last_epoch == 0:  # regression outputs in their labels' units
                fit_label_scales(model, cfg.tasks, batch.labels)
            out = self.ddp(batch.inputs)
            logits = out.logits
            per_task = [
                task_loss(
                    t,
                    logits[t.name],
                    batch.labels[t.name],
                    batch.weights[t.name],
                    logits[t.multiply] if t.multiply else None,
                )
                for t in cfg.tasks
            ]
            task_losses = torch.stack(per_task)
            balancer.step(task_losses, shared)
            loss = balancer(task_losses)
            if cfg.model.l2:
                loss = loss + cfg.model.l2 * dense_l2(model)
            if cfg.model.embedding_l2:
                loss = loss + cfg.model.embedding_l2 * out.penalty
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if self.world > 1:  # DDP averages the network's gradients, not the balancer's
                for p in balancer.network_parameters():
                    assert p.grad is not None
                    dist.all_reduce(p.grad)
                    p.grad /= self.world
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
            "loss_weighting": cfg.train.loss_weighting.kind,
            "threads": torch.get_num_threads(),
            "best_epoch": history.best_epoch,
            "best": history.best,
            "stopped_early": history.stopped_early,
            "epochs": history.epochs,
            "gates": history.gates,
            "gate_experts": history.gate_experts,
            "reference": history.reference,
            "warnings": history.warnings,
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


def train(
    config: RunConfig,
    train_path: str | Path,
    out_dir: str | Path,
    valid_path: str | Path | None = None,
) -> History:
    """Train and write RUN_DIR; returns the per-epoch history (complete on rank 0)."""
    return Trainer(config, train_path, out_dir, valid_path).run()


def recipe_main(args: argparse.Namespace) -> int:
    """`mmoe train ARGS` (model/cli.py's arguments): the config resolved (YAML, or an EasyRec
    pipeline.config translated), RUN_DIR prepared, then the recipe run here, or with `--nproc N`
    in N processes that torchrun starts with the same command. Under torchrun
    (`torchrun --nproc_per_node N -m mmoe train ARGS` does the same) every process runs this
    function; rank 0 prepares RUN_DIR and prints."""
    rank0 = int(os.environ.get("RANK", "0")) == 0
    try:
        config, notes = _resolve_config(args)
        if rank0:  # after the config: a bad one clears nothing
            prepare_run_dir(args.out, args.overwrite)
    except (ConfigError, ValueError, FileNotFoundError) as err:  # RunDirError too
        print(f"error: {err}", file=sys.stderr)
        return 2
    for note in notes if rank0 else []:
        print(f"note: {note}", file=sys.stderr)
    if args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        return _torchrun(args, config)
    try:
        train(config, args.data, args.out, args.valid)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def _resolve_config(args: argparse.Namespace) -> tuple[RunConfig, list[str]]:
    """The validated config of `--config` with the overrides applied, and what a translation
    of an EasyRec config decided (notes)."""
    from mmoe.model.easyrec import is_easyrec_config, load_pipeline_config

    if is_easyrec_config(args.config):
        config, _, notes = load_pipeline_config(args.config, args.overrides)
        return config, notes
    return load_config(args.config, args.overrides), []


def _torchrun(args: argparse.Namespace, config: RunConfig) -> int:
    """`mmoe train` in `args.nproc` processes; they read the resolved config from a YAML file."""
    import subprocess
    import tempfile

    import yaml

    with tempfile.TemporaryDirectory(prefix="mmoe-config-") as tmp:
        path = os.path.join(tmp, "config.yaml")
        with open(path, "w") as f:
            yaml.safe_dump(config.model_dump(mode="json", exclude_none=True), f, sort_keys=False)
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={args.nproc}",
            "-m",
            "mmoe",
            "train",
            "--config",
            path,
            "--data",
            args.data,
            "--out",
            args.out,
        ]
        if args.valid:
            cmd += ["--valid", args.valid]
        return subprocess.call(cmd)
