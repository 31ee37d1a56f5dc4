"""Evaluation of a model on encoded rows: exported outputs, per-task metrics, gate statistics,
and the reference rates that monitoring compares live traffic with."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
import torch.nn.functional as F

from mmoe.contract.outputs import output_names
from mmoe.model.batches import Batch
from mmoe.model.config import RunConfig
from mmoe.model.losses import task_loss
from mmoe.model.metrics import task_metrics
from mmoe.model.network import PLE, MMoE, RankingModel, model_outputs
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
        for name, z in out.logits.items():
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
        names = output_names(head.name, head.kind, head.product)
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


# Expert-health thresholds. An expert is starved when every task gives it less than this
# fraction of a uniform gate's weight (1/K); a gate is near-uniform when its mean entropy is
# above this fraction of log(number of experts it can choose); experts are near-identical when
# their outputs' mean pairwise cosine similarity is above this.
STARVED = 0.1
UNIFORM = 0.999
IDENTICAL = 0.98


@dataclass
class ExpertHealth:
    """Gate and expert statistics on a set of rows (validation rows, in training)."""

    experts: list[str]
    gates: dict[str, list[float]]  # per task: mean gate weight per expert
    gate_entropy: dict[str, float]  # per task: mean entropy / log(experts it can choose)
    # mean pairwise cosine similarity of the experts' outputs (NaN for one expert)
    expert_similarity: float

    def warnings(self) -> list[str]:
        """Collapse symptoms, each a sentence naming the experts or tasks."""
        out: list[str] = []
        k = len(self.experts)
        if k < 2:  # Shared-Bottom: nothing to choose between
            return out
        for e, name in enumerate(self.experts):
            reachable = [g[e] for g in self.gates.values() if g[e] > 0] or [0.0]
            if max(reachable) < STARVED / k:
                out.append(
                    f"expert {name} gets almost no gate weight from any task "
                    f"(at most {max(reachable):.3g}; uniform would be {1 / k:.3g})"
                )
        for task, h in self.gate_entropy.items():
            if h > UNIFORM:
                out.append(
                    f"task {task}'s gate is near-uniform (entropy {h:.3f} of the maximum): it "
                    "does not choose between experts"
                )
        if self.expert_similarity > IDENTICAL:
            out.append(
                f"the experts' outputs are near-identical (mean cosine similarity "
                f"{self.expert_similarity:.3f}): they learned the same thing"
            )
        return out

    def record(self) -> dict[str, Any]:
        return {
            "gates": self.gates,
            "gate_entropy": self.gate_entropy,
            "expert_similarity": self.expert_similarity,
        }


@torch.no_grad()
def expert_health(model: RankingModel, data: Batch) -> ExpertHealth | None:
    """Each task's mean gate weight per expert and normalised gate entropy, and how alike the
    experts' outputs are, on the given rows; None for a network that is neither MMoE nor PLE."""
    net = model.net
    if not isinstance(net, MMoE | PLE):
        return None
    was_training = model.training
    model.eval()
    n_tasks, k = len(model.tasks), len(net.expert_names)
    gate_sum = torch.zeros(n_tasks, k, dtype=torch.float64)
    entropy_sum = torch.zeros(n_tasks, dtype=torch.float64)
    similarity_sum = 0.0
    pairs = torch.triu_indices(k, k, offset=1)
    for start in range(0, len(data), EVAL_ROWS):
        x, _ = model.dense_input(
            {k_: v[start : start + EVAL_ROWS] for k_, v in data.inputs.items()}
        )
        g = net.gate_weights(x).double()  # [tasks, B, K]; 0 where a task cannot choose
        gate_sum += g.sum(1)
        entropy_sum += -(g * torch.log(g.clamp(min=1e-30))).sum(-1).sum(-1)
        if k > 1:
            e = F.normalize(net.expert_outputs(x).double(), dim=-1)  # [K, B, H]
            cos = torch.einsum("kbh,jbh->kjb", e, e)[pairs[0], pairs[1]]  # [pairs, B]
            similarity_sum += float(cos.sum()) / pairs.shape[1]
    model.train(was_training)
    n = len(data)
    gates = gate_sum / n
    # A PLE task chooses among its own and the shared experts only.
    choices = (gates > 0).sum(1).clamp(min=2).double()
    entropy = entropy_sum / n / torch.log(choices)
    names = [t.name for t in model.tasks]
    return ExpertHealth(
        experts=list(net.expert_names),
        gates={t: gates[i].tolist() for i, t in enumerate(names)},
        gate_entropy={t: float(entropy[i]) for i, t in enumerate(names)},
        expert_similarity=similarity_sum / n if k > 1 else float("nan"),
    )


# ------------------------------------------------------------------- monitoring references
# What "normal" looked like at training time, for the service to compare live traffic with
# (docs/monitoring.md): each feature's values by outcome, counted as the exported graph counts
# them (export/graph.py), the mean score per task, and the mean gate weights (expert_health).

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
        names = output_names(task.name, task.kind, task.product)
        served = [(task.name, names.score)]
        if task.product and names.product:  # an ESMM product is served as a task of its own
            served.append((task.product, names.product))
        for name, output in served:
            scores = out[output].astype(np.float64)
            means[name] = scores.reshape(len(scores), -1).mean(axis=0).tolist()
    return means
