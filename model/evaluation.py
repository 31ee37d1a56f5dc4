"""Evaluation of a model on encoded rows: exported outputs, per-task metrics, gate statistics,
and the reference rates that monitoring compares live traffic with."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from mmoe.model.batches import Batch
from mmoe.model.config import RunConfig
from mmoe.model.losses import task_loss
from mmoe.model.metrics import task_metrics
from mmoe.model.network import PLE, MMoE, RankingModel, output_names, task_outputs
from mmoe.model.schema import (
    FeatureSchema,
    FittedFeature,
    categorical_strings,
    numeric_values,
    tag_tokens,
)

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


# ------------------------------------------------------------------- monitoring references
# What "normal" looked like at training time, for the service to compare live traffic with
# (docs/monitoring.md): each feature's values by outcome, counted as the exported graph counts
# them (export/graph.py), the mean score per task and the mean gate weights (gate_utilisation).

OUTCOMES = ("known", "oov", "default")


def feature_outcomes(f: FittedFeature, col: pa.Array | pa.ChunkedArray) -> dict[str, int]:
    """One feature's values in a raw column, counted by outcome:

    - categorical: one value per row. `default` when it is missing, empty or equal to the
      feature's default (a missing id is replaced by the default before the graph sees it, so
      the two cannot be told apart); `oov` when it is not in the vocabulary (features with a
      vocabulary only: a hashed id has no such thing); else `known`.
    - tags: each id of a row (after splitting, dropping empty ones and truncation) is `known`
      or `oov`; a row with no ids at all is one `default` value.
    - numeric: one value per row, `default` when missing (null or NaN), else `known`.
    """
    if f.kind == "numeric":
        missing = int(np.isnan(numeric_values(col)).sum())
        return {"known": len(col) - missing, "oov": 0, "default": missing}
    vocab = pa.array(f.vocab or [], pa.string())
    if f.kind == "tags":
        assert f.separator is not None and f.max_len is not None
        null_as = f.default if isinstance(f.default, list) else None
        lists = tag_tokens(col, f.separator, f.max_len, null_as)
        ids = pc.list_flatten(lists)
        oov = 0 if f.vocab is None else len(ids) - int(pc.sum(pc.is_in(ids, vocab)).as_py() or 0)
        empty = int(pc.sum(pc.equal(pc.list_value_length(lists), 0)).as_py() or 0)
        return {"known": len(ids) - oov, "oov": oov, "default": empty}
    default = f.default if isinstance(f.default, str) else ""
    values = categorical_strings(col, default)
    is_default = pc.or_(pc.equal(values, ""), pc.equal(values, default))
    n_default = int(pc.sum(is_default).as_py() or 0)
    oov = 0
    if f.vocab is not None:
        unknown = pc.and_(pc.invert(pc.is_in(values, vocab)), pc.invert(is_default))
        oov = int(pc.sum(unknown).as_py() or 0)
    return {"known": len(values) - n_default - oov, "oov": oov, "default": n_default}


def feature_rates(schema: FeatureSchema, table: pa.Table) -> dict[str, dict[str, float | None]]:
    """Each feature's share of values per outcome on the rows of `table` (see
    feature_outcomes); `oov` is None for features without a vocabulary."""
    rates: dict[str, dict[str, float | None]] = {}
    for f in schema.features:
        counts = feature_outcomes(f, table.column(f.column))
        total = sum(counts.values())
        share = {k: v / total if total else 0.0 for k, v in counts.items()}
        rates[f.name] = {**share, "oov": share["oov"] if f.vocab is not None else None}
    return rates


@torch.no_grad()
def mean_scores(model: RankingModel, data: Batch) -> dict[str, list[float]]:
    """The mean of each task's score (probability or regression value) over every row: one per
    score column (a multiclass task has one per class)."""
    out = predict(model, data)
    means: dict[str, list[float]] = {}
    for task in model.tasks:
        scores = out[output_names(task).score].astype(np.float64)
        means[task.name] = scores.reshape(len(scores), -1).mean(axis=0).tolist()
    return means
