"""Evaluation of a model on encoded rows: exported outputs, per-task metrics, gate statistics."""

from __future__ import annotations

import numpy as np
import torch

from mmoe.model.batches import Batch
from mmoe.model.config import RunConfig
from mmoe.model.losses import task_loss
from mmoe.model.metrics import task_metrics
from mmoe.model.network import PLE, MMoE, RankingModel, output_names, task_outputs

EVAL_ROWS = 8192  # rows per forward pass


@torch.no_grad()
def _logits(model: RankingModel, batch: Batch) -> dict[str, torch.Tensor]:
    """Per-task logits of every row, in eval mode (the model's mode is restored)."""
    was_training = model.training
    model.eval()
    parts: dict[str, list[torch.Tensor]] = {t.name: [] for t in model.tasks}
    for start in range(0, len(batch), EVAL_ROWS):
        out = model({k: v[start : start + EVAL_ROWS] for k, v in batch.inputs.items()})
        for name, z in out.items():
            parts[name].append(z)
    model.train(was_training)
    return {k: torch.cat(v) for k, v in parts.items()}


@torch.no_grad()
def predict(model: RankingModel, batch: Batch) -> dict[str, np.ndarray]:
    """Exported outputs (`probs_<task>`, `y_<task>`, `logits_<task>`) for encoded rows."""
    logits = _logits(model, batch)
    out: dict[str, np.ndarray] = {}
    for task in model.tasks:
        out.update({k: v.numpy() for k, v in task_outputs(task, logits[task.name]).items()})
    return out


@torch.no_grad()
def evaluate(model: RankingModel, config: RunConfig, data: Batch) -> dict[str, float]:
    """Each task's metrics on the rows in its space (label present, `only_where` holds), and
    `loss`: the sum of the task losses weighted by `tasks[i].weight` (without regularisation)."""
    logits = _logits(model, data)
    metrics: dict[str, float] = {}
    total = 0.0
    for t, head in zip(config.tasks, model.tasks, strict=True):
        z = logits[t.name]
        y, w = data.labels[t.name], data.weights[t.name]
        total += t.weight * float(task_loss(t, z, y, w))
        scores = task_outputs(head, z)[output_names(head).score]
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
