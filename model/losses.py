"""Task losses and regularisation."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mmoe.model.config import TaskConfig


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
