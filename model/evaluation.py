"""Evaluation of a model on encoded rows: exported outputs, per-task metrics, gate statistics."""

from __future__ import annotations

import numpy as np
import torch

from mmoe.model.batches import Batch
from mmoe.model.config import RunConfig
from mmoe.model.losses import task_loss
from mmoe.model.metrics import task_metrics
from mmoe.model.network import PLE, MMoE, RankingModel, model_outputs, output_names

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
    return {k: v.numpy() for k, v in model_outputs(model.tasks, _logits(model, batch)).items()}


@torch.no_grad()
def evaluate(model: RankingModel, config: RunConfig, data: Batch) -> dict[str, float]:
    """Each task's metrics on the rows in its space (label present, `only_where` holds), and
    `loss`: the sum of the task losses weighted by `tasks[i].weight` (without regularisation).

    An ESMM task (`multiply`) has its metrics twice: `<metric>_<product>` of the product on
    every row, and `<metric>_<task>` of its own probability (pCVR) on the rows where the task it
    multiplies has label 1 (the clicked rows), the space that probability is about."""
    logits = _logits(model, data)
    outputs = model_outputs(model.tasks, logits)
    metrics: dict[str, float] = {}
    total = 0.0
    for t, head in zip(config.tasks, model.tasks, strict=True):
        y, w = data.labels[t.name], data.weights[t.name]
        multiplier = logits[t.multiply] if t.multiply else None
        total += t.weight * float(task_loss(t, logits[t.name], y, w, multiplier))
        names = output_names(head)
        mask = data.masks[t.name].numpy()
        labels = y.numpy().astype(np.float64)
        if t.multiply is not None and t.product_name and names.product:
            product = outputs[names.product].numpy()
            metrics.update(
                task_metrics(
                    t.default_metrics,
                    t.kind,
                    np.where(mask, labels, np.nan),
                    product,
                    t.product_name,
                )
            )
            mask = mask & (data.labels[t.multiply].numpy() == 1)
        scores = outputs[names.score].numpy()
        own = task_metrics(
            t.default_metrics, t.kind, np.where(mask, labels, np.nan), scores, t.name
        )
        metrics.update(own)
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
