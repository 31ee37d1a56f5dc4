"""Task losses, regularisation, and how the task losses are balanced (`train.loss_weighting`)."""

from __future__ import annotations

from typing import cast

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from mmoe.model.config import RunConfig, TaskConfig


def task_loss(
    task: TaskConfig,
    logits: torch.Tensor,
    y: torch.Tensor,
    w: torch.Tensor,
    multiplier: torch.Tensor | None = None,
) -> torch.Tensor:
    """The task's loss: its pointwise loss, or the weighted sum of its `losses` terms."""
    if not task.losses:
        return pointwise_loss(task, logits, y, w, multiplier)
    total = torch.zeros(())
    for term in task.losses:
        if term.kind == "pointwise":
            part = pointwise_loss(task, logits, y, w, multiplier)
        else:
            part = pairwise_loss(logits[:, 0], y, w > 0, term.margin)
        total = total + term.weight * part
    return total


# Rows per block of the pairwise loss: pairs are formed within blocks, as within training
# batches, so that a whole validation set needs no [n, n] matrix.
PAIRWISE_BLOCK = 4096


def pairwise_loss(
    z: torch.Tensor, y: torch.Tensor, rows: torch.Tensor, margin: float = 0.0
) -> torch.Tensor:
    """mean softplus(margin - (z_i - z_j)) over the pairs of `rows` (blocks of PAIRWISE_BLOCK)
    with y_i > y_j: a logistic loss on each pair being ranked the way its labels are; 0 without
    such a pair."""
    total, pairs = torch.zeros(()), 0
    for start in range(0, len(z), PAIRWISE_BLOCK):
        keep = rows[start : start + PAIRWISE_BLOCK]
        zb, yb = z[start : start + PAIRWISE_BLOCK][keep], y[start : start + PAIRWISE_BLOCK][keep]
        higher = yb.unsqueeze(1) > yb.unsqueeze(0)  # [i, j]: y_i > y_j
        if higher.any():
            gaps = (zb.unsqueeze(1) - zb.unsqueeze(0))[higher]
            total = total + F.softplus(margin - gaps).sum()
            pairs += int(higher.sum())
    return total / max(pairs, 1)


def pointwise_loss(
    task: TaskConfig,
    logits: torch.Tensor,
    y: torch.Tensor,
    w: torch.Tensor,
    multiplier: torch.Tensor | None = None,
) -> torch.Tensor:
    """sum(w * loss) / count(w > 0): the mean over the rows that count for this task, each
    scaled by its sample weight (TensorFlow's SUM_BY_NONZERO_WEIGHTS, as in EasyRec).

    `multiplier`: the logits of the task this one multiplies (ESMM): the log loss is then on
    the product p = sigmoid(logits) * sigmoid(multiplier), computed in log space."""
    y = torch.nan_to_num(y, nan=0.0)
    if multiplier is not None:
        log_p = F.logsigmoid(logits[:, 0]) + F.logsigmoid(multiplier[:, 0])
        # log(1 - p) = log(-expm1(log p)); p = 1 exactly would be log(0)
        log_not_p = torch.log(-torch.expm1(log_p.clamp(max=-1e-7)))
        per_row = -(y * log_p + (1 - y) * log_not_p)
    elif task.kind == "binary":
        per_row = F.binary_cross_entropy_with_logits(logits[:, 0], y, reduction="none")
    elif task.kind == "regression":
        per_row = F.mse_loss(logits[:, 0], y, reduction="none")
    else:
        per_row = F.cross_entropy(logits, y.long(), reduction="none")
    return (per_row * w).sum() / (w > 0).sum().clamp(min=1)


def fit_label_scales(
    model: nn.Module, tasks: list[TaskConfig], labels: dict[str, torch.Tensor]
) -> None:
    """Sets each regression tower's LabelScale to its labels' mean and standard deviation in
    `labels` (the first training batch; the mean over DDP processes, so that every process
    has the same model)."""
    from mmoe.model.network import LabelScale

    towers = cast(nn.ModuleList, cast(nn.Module, model.net).towers)
    for task, tower in zip(tasks, towers, strict=True):
        scale = cast(nn.Sequential, tower)[-1]
        if not isinstance(scale, LabelScale):
            continue
        y = labels[task.name]
        y = y[~torch.isnan(y)].double()
        if len(y) == 0:
            continue
        moments = _mean_over_processes(torch.stack([y.mean(), (y * y).mean()]))
        std = float((moments[1] - moments[0] ** 2).clamp(min=0).sqrt())
        with torch.no_grad():
            scale.shift.fill_(float(moments[0]))
            scale.scale.fill_(std if std > 0 else 1.0)


def dense_l2(model: nn.Module) -> torch.Tensor:
    """Sum of squared dense weights (matrices, not biases, norms or embedding tables)."""
    total = torch.zeros(())
    for name, p in model.named_parameters():
        if p.ndim >= 2 and ".tables." not in f".{name}":
            total = total + (p * p).sum()
    return total


# The learned weights' Adam learning rate by default. Both methods learn in log space (s_i,
# softmax logits), where a step of 0.025 moves a weight by about 2.5%: at the network's usual
# 1e-3, following a loss that falls from 1e5 to 1e3 (log ratio 4.6) would take 4600 steps.
LEARNED_WEIGHTS_LR = 0.025


class TaskBalancer(nn.Module):
    """Combines the per-task losses of a step into the loss to minimise (`fixed`: the sum of
    tasks[i].weight * loss_i). Subclasses learn the weights; `weights()` reports them."""

    def __init__(self, tasks: list[TaskConfig]) -> None:
        super().__init__()
        self.const = torch.tensor([t.weight for t in tasks])  # tasks[i].weight

    def forward(self, losses: torch.Tensor) -> torch.Tensor:
        """losses: [tasks] -> the scalar loss."""
        return (self.const * losses).sum()

    def step(self, losses: torch.Tensor, shared: torch.Tensor | None) -> None:
        """Called once per training step before the backward pass, with the step's task losses
        and the last shared layer's weights (None when the balancer needs none)."""

    def weights(self) -> list[float]:
        """The factor each task's loss has in the total now."""
        return self.const.tolist()

    def network_parameters(self) -> list[nn.Parameter]:
        """Parameters that train with the network's optimiser, at `self.lr` (their
        gradients are averaged over DDP processes by the trainer)."""
        return []


class UncertaintyWeighting(TaskBalancer):
    """Kendall, Gal & Cipolla (CVPR 2018): a learned s_i = log sigma_i^2 per task;
    classification: exp(-s) L + s/2 (= L / sigma^2 + log sigma); regression: exp(-s) L / 2 + s/2
    (= L / (2 sigma^2) + log sigma). s trains with the network's optimiser, at its own
    learning rate (`train.loss_weighting.lr`).

    s starts at the first step's optimum, s = log(2 f L) (f: 1 or 1/2): from 0, a loss in the
    thousands would need thousands of Adam steps before its weight came down to scale.
    """

    def __init__(self, tasks: list[TaskConfig], lr: float = LEARNED_WEIGHTS_LR) -> None:
        super().__init__(tasks)
        self.lr = lr
        self.log_var = nn.Parameter(torch.zeros(len(tasks)))
        self.started = False
        # 1 for classification, 1/2 for regression
        self.form = torch.tensor([0.5 if t.kind == "regression" else 1.0 for t in tasks])

    def step(self, losses: torch.Tensor, shared: torch.Tensor | None) -> None:
        if self.started:
            return
        current = _mean_over_processes(losses.detach())
        with torch.no_grad():
            self.log_var.copy_(torch.log((2 * self.form * current).clamp(min=1e-8)))
        self.started = True

    def forward(self, losses: torch.Tensor) -> torch.Tensor:
        s = self.log_var
        return (self.const * (self.form * torch.exp(-s) * losses + 0.5 * s)).sum()

    def weights(self) -> list[float]:
        with torch.no_grad():
            return (self.const * self.form * torch.exp(-self.log_var)).tolist()

    def network_parameters(self) -> list[nn.Parameter]:
        return [self.log_var]


class GradNorm(TaskBalancer):
    """Chen et al. (ICML 2018): task weights w_i (summing to the number of tasks T) trained so
    that each weighted task's gradient norm on the last shared layer, G_i = ||d(w_i L_i)/dW||,
    moves to mean(G) * r_i^alpha, where r_i is task i's loss relative to its first-step loss,
    over the mean of those ratios: a task that trains slower gets more weight. The network
    trains on sum(const_i * w_i * L_i) with the step's weights.

    The weights are w = T * softmax(v), with their own Adam on v: the paper's renormalisation
    to sum T, and steps that are relative, so weights whose right values differ by orders of
    magnitude (losses of very different scale) get there in as many steps as close ones. They
    start at the first step's optimum (every r_i is 1 then: equal weighted norms), as
    `UncertaintyWeighting` does, instead of at 1, which for tasks whose gradients differ
    1000-fold would take hundreds of steps to leave.
    """

    def __init__(self, tasks: list[TaskConfig], alpha: float, lr: float) -> None:
        super().__init__(tasks)
        self.alpha = alpha
        self.logits = nn.Parameter(torch.zeros(len(tasks)))
        self.optimizer = torch.optim.Adam([self.logits], lr=lr)
        self.initial: torch.Tensor | None = None

    def _w(self) -> torch.Tensor:
        return len(self.logits) * torch.softmax(self.logits, dim=0)

    def forward(self, losses: torch.Tensor) -> torch.Tensor:
        return (self.const * self._w().detach() * losses).sum()

    def step(self, losses: torch.Tensor, shared: torch.Tensor | None) -> None:
        assert shared is not None, "GradNorm needs the last shared layer"
        # ||d(w_i L_i)/dW|| = w_i ||dL_i/dW||: the norms need no graph of their own, and the
        # gradient of the GradNorm loss with respect to w is then exact and cheap.
        norms = torch.stack(
            [
                torch.autograd.grad(self.const[i] * losses[i], shared, retain_graph=True)[0].norm()
                for i in range(len(losses))
            ]
        )
        stats = _mean_over_processes(torch.cat([losses.detach(), norms]))
        current, norms = stats[: len(losses)], stats[len(losses) :]
        if self.initial is None:
            self.initial = current.clamp(min=1e-12)
            with torch.no_grad():  # equal weighted norms: the optimum while every r_i is 1
                self.logits.copy_(-torch.log(norms.clamp(min=1e-12)))
                self.logits.sub_(self.logits.mean())
        ratio = current / self.initial
        g = self._w() * norms
        target = (g.mean() * (ratio / ratio.mean()) ** self.alpha).detach()
        self.optimizer.zero_grad(set_to_none=True)
        (g - target).abs().sum().backward(inputs=[self.logits])
        self.optimizer.step()

    def weights(self) -> list[float]:
        with torch.no_grad():
            return (self.const * self._w()).tolist()


def _mean_over_processes(x: torch.Tensor) -> torch.Tensor:
    """The mean of x over DDP processes (x itself in one process): learned weights must be the
    same in every process."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        x = x.clone()
        dist.all_reduce(x)
        x /= dist.get_world_size()
    return x


def task_balancer(config: RunConfig) -> TaskBalancer:
    """The balancer `train.loss_weighting` names."""
    lw = config.train.loss_weighting
    if lw.kind == "uncertainty":
        return UncertaintyWeighting(config.tasks, lw.lr or LEARNED_WEIGHTS_LR)
    if lw.kind == "gradnorm":
        alpha = 1.5 if lw.alpha is None else lw.alpha
        return GradNorm(config.tasks, alpha, lw.lr or LEARNED_WEIGHTS_LR)
    return TaskBalancer(config.tasks)
