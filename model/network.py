"""The network: Multi-gate Mixture-of-Experts (Ma et al., KDD 2018), plain PyTorch.

    x ──> experts_k(x), k = 1..K          (one ExpertBank: batched matmuls, not K small MLPs)
      └─> gate_t(x) = softmax(W_t x)      (one gate per task; `gate="shared"` gives OMoE)
    task input f_t(x) = sum_k gate_t(x)_k * expert_k(x)  ->  tower_t  ->  logits_t

`MMoE` and `PLE` take a dense input vector and return per-task logits; they know nothing of
features. `RankingModel` puts the feature embeddings (and optional SENet) in front, and is what
training and export use. Each returns a `NetOutput`: the logits, the gate weights when asked
for, and the embedding penalty. `model_outputs` turns logits into the exported outputs (sigmoid /
softmax / identity), named by `mmoe.contract.outputs`.

The input layers: every module that reads the dense input (`ExpertBank`, `Gate`, `CGCLayer`,
`MMoE`, `PLE`) gives the linear layers that read it (`input_layers()`: weight [in, out], bias
[out] each) and computes its output from theirs (`from_input_layers(h)`), so that `m(x)` equals
`m.from_input_layers([x @ w + b for w, b in m.input_layers()])`. Export splits those layers by
input columns to compute a ranking request's context once (export/context.py).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from mmoe.contract.outputs import output_names

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "leaky_relu": nn.LeakyReLU,
}


@dataclass(frozen=True)
class TaskHead:
    """One task's output: `binary` (1 logit), `regression` (1 value), `multiclass` (num_class)."""

    name: str
    kind: str = "binary"
    tower: tuple[int, ...] = (64,)
    num_class: int | None = None
    # ESMM: this task's probability is multiplied by task `multiply`'s; the product is also an
    # output, named `product`.
    multiply: str | None = None
    product: str | None = None

    @property
    def out_dim(self) -> int:
        return self.num_class if self.kind == "multiclass" and self.num_class else 1


@dataclass(frozen=True)
class NetOutput:
    """What a network computes for a batch of B rows."""

    logits: dict[str, torch.Tensor]  # per task: [B, out_dim]
    # [tasks, B, experts]: the gate weights that mixed the experts, when asked for (`gates=True`)
    gates: torch.Tensor | None = None
    # The squared norm of the embeddings looked up for the batch, per row (the embedding L2
    # term); 0 in eval mode, and from a network without embeddings.
    penalty: torch.Tensor | float = 0.0


def mlp(
    in_dim: int,
    units: Sequence[int],
    activation: str = "relu",
    dropout: float = 0.0,
    batch_norm: bool = False,
) -> nn.Sequential:
    """Linear -> [BatchNorm] -> activation -> [Dropout], once per entry of `units`."""
    layers: list[nn.Module] = []
    for out_dim in units:
        layers.append(nn.Linear(in_dim, out_dim))
        if batch_norm:
            layers.append(nn.BatchNorm1d(out_dim))
        layers.append(ACTIVATIONS[activation]())
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        in_dim = out_dim
    return nn.Sequential(*layers)


class ExpertBank(nn.Module):
    """K expert MLPs of the same shape evaluated together. Output: [K, B, units[-1]].

    All experts read the same input, so layer 0 is one [B, in] x [in, K*h] matmul; later layers
    are one batched matmul over [K, B, h]. Against K separate MLPs (`bench/experts.py`, batch
    256, one thread): up to 1.9x faster in PyTorch inference and up to 1.6x per training step
    (on par for wide experts); 3-10% slower in onnxruntime, whose separate Gemms are cheap. Each
    expert's weights are initialised independently, exactly as K separate `nn.Linear`s would be.
    """

    def __init__(
        self,
        in_dim: int,
        num_experts: int,
        units: Sequence[int],
        activation: str = "relu",
        dropout: float = 0.0,
        batch_norm: bool = False,
    ) -> None:
        super().__init__()
        if not units:
            raise ValueError("experts need at least one hidden layer")
        if num_experts < 1:
            raise ValueError("num_experts must be at least 1")
        self.num_experts = num_experts
        self.units = list(units)
        self.weights = nn.ParameterList()  # [K, fan_in, fan_out] per layer
        self.biases = nn.ParameterList()  # [K, fan_out] per layer
        self.norms = nn.ModuleList()
        dims = [in_dim, *units]
        for fan_in, fan_out in itertools.pairwise(dims):
            w = torch.empty(num_experts, fan_in, fan_out)
            b = torch.empty(num_experts, fan_out)
            for k in range(num_experts):  # nn.Linear's default init, per expert
                wk = torch.empty(fan_out, fan_in)
                nn.init.kaiming_uniform_(wk, a=math.sqrt(5))
                w[k] = wk.T
                nn.init.uniform_(b[k], -1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))
            self.weights.append(nn.Parameter(w))
            self.biases.append(nn.Parameter(b))
            if batch_norm:  # one BatchNorm over K*fan_out features = one per expert
                self.norms.append(nn.BatchNorm1d(num_experts * fan_out))
        self.act = ACTIVATIONS[activation]()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def input_layers(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Layer 0 of all experts as one matrix: weight [in, K*out] and bias [K*out]."""
        w, b = self.weights[0], self.biases[0]
        return [(w.permute(1, 0, 2).reshape(w.shape[1], -1), b.reshape(-1))]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ((w, b),) = self.input_layers()
        # [B, in] @ [in, K*out] + [K*out]: one Gemm (fused with its bias in onnxruntime).
        return self.from_input_layers([torch.addmm(b, x, w)])

    def from_input_layers(self, h: Sequence[torch.Tensor]) -> torch.Tensor:
        """The experts' outputs [K, B, units[-1]] from layer 0's output before its norm and
        activation ([B, K*out])."""
        (x,) = h
        k = self.num_experts
        out = self.weights[0].shape[2]
        if self.norms:
            x = self.norms[0](x)
        x = self.dropout(self.act(x)).view(-1, k, out).transpose(0, 1)  # [K, B, out]
        for i in range(1, len(self.weights)):
            w, b = self.weights[i], self.biases[i]
            x = torch.baddbmm(b.unsqueeze(1), x, w)
            if self.norms:
                _, batch, out = x.shape
                x = self.norms[i](x.transpose(0, 1).reshape(batch, k * out))
                x = x.view(batch, k, out).transpose(0, 1)
            x = self.dropout(self.act(x))
        return x

    def as_modules(self) -> list[nn.Sequential]:
        """The same experts as K separate MLPs (for equivalence tests and benchmarks)."""
        experts = []
        for k in range(self.num_experts):
            layers: list[nn.Module] = []
            for i, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
                lin = nn.Linear(w.shape[1], w.shape[2])
                with torch.no_grad():
                    lin.weight.copy_(w[k].T)
                    lin.bias.copy_(b[k])
                layers.append(lin)
                if self.norms:
                    bn = self.norms[i]
                    assert isinstance(bn, nn.BatchNorm1d)
                    assert bn.running_mean is not None and bn.running_var is not None
                    out = w.shape[2]
                    sub = nn.BatchNorm1d(out)
                    sl = slice(k * out, (k + 1) * out)
                    with torch.no_grad():
                        sub.weight.copy_(bn.weight[sl])
                        sub.bias.copy_(bn.bias[sl])
                        sub.get_buffer("running_mean").copy_(bn.running_mean[sl])
                        sub.get_buffer("running_var").copy_(bn.running_var[sl])
                    layers.append(sub)
                layers.append(type(self.act)())
            experts.append(nn.Sequential(*layers).eval())
        return experts


class Gate(nn.Module):
    """softmax(W x) over experts, with an optional MLP before it (`gate_units`)."""

    def __init__(self, in_dim: int, num_experts: int, units: Sequence[int], activation: str):
        super().__init__()
        self.hidden = mlp(in_dim, units, activation)
        self.out = nn.Linear(units[-1] if units else in_dim, num_experts)

    def _input_linear(self) -> nn.Linear:
        first = self.hidden[0] if len(self.hidden) else self.out
        assert isinstance(first, nn.Linear)
        return first

    def input_layers(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The layer that reads the input (the MLP's first, else the output layer): weight
        [in, out] and bias [out]."""
        first = self._input_linear()
        return [(first.weight.T, first.bias)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.from_input_layers([self._input_linear()(x)])

    def from_input_layers(self, h: Sequence[torch.Tensor]) -> torch.Tensor:
        """The gate weights [B, experts] from its input layer's output."""
        (x,) = h
        if len(self.hidden):
            x = self.out(self.hidden[1:](x))
        return F.softmax(x, dim=-1)


def _mix(gate: torch.Tensor, experts: Sequence[torch.Tensor]) -> torch.Tensor:
    """gate [B, K], experts K x [B, H] -> [B, H]: the sum of gate[:, k] * experts[k].

    A chain of K multiply-adds, not one [K, B, H] product summed over K: in onnxruntime that
    product and its ReduceSum over the leading axis took about 8% of the EasyRec-sized run, and
    the chain makes the whole run 5-8% faster (256 rows, 1 and 2 threads, paired rounds)."""
    out = gate[:, :1] * experts[0]
    for k in range(1, len(experts)):
        out = out + gate[:, k : k + 1] * experts[k]
    return out


class LabelScale(nn.Module):
    """y = shift + scale * z: a regression tower's output in its label's units, from a z of
    order 1. Fixed buffers (saved with the weights), set once from the training labels' mean
    and standard deviation (`losses.fit_label_scales`): a label in the thousands then needs no
    weights in the thousands, which Adam's steps of about `lr` would take tens of thousands of
    steps to grow, and the task trains at any scale whatever weight the balancer gives it."""

    scale: torch.Tensor
    shift: torch.Tensor

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("scale", torch.ones(1))
        self.register_buffer("shift", torch.zeros(1))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z * self.scale + self.shift


def tower(
    in_dim: int, task: TaskHead, activation: str, dropout: float, batch_norm: bool
) -> nn.Sequential:
    """A task's tower MLP and its output layer (task.out_dim logits; for a regression task, in
    the label's units through a LabelScale)."""
    layers: list[nn.Module] = [
        mlp(in_dim, task.tower, activation, dropout, batch_norm),
        nn.Linear(task.tower[-1] if task.tower else in_dim, task.out_dim),
    ]
    if task.kind == "regression":
        layers.append(LabelScale())
    return nn.Sequential(*layers)


class MMoE(nn.Module):
    """Multi-gate Mixture-of-Experts over a dense input; returns per-task logits.

    `gate="shared"` gives one gate for all tasks (OMoE); `num_experts=1` is the Shared-Bottom
    baseline (no gates: every task reads the one expert).

    >>> net = MMoE(input_dim=32, num_experts=4, expert_units=[64, 32],
    ...            tasks=[TaskHead("ctr"), TaskHead("cvr")])
    >>> {name: tuple(v.shape) for name, v in net(torch.randn(8, 32)).logits.items()}
    {'ctr': (8, 1), 'cvr': (8, 1)}
    """

    def __init__(
        self,
        input_dim: int,
        num_experts: int,
        expert_units: Sequence[int],
        tasks: Sequence[TaskHead],
        gate_units: Sequence[int] = (),
        gate: str = "per_task",
        activation: str = "relu",
        dropout: float = 0.0,
        batch_norm: bool = False,
    ) -> None:
        super().__init__()
        if gate not in ("per_task", "shared"):
            raise ValueError(f"gate must be 'per_task' or 'shared', got {gate!r}")
        if not tasks:
            raise ValueError("MMoE needs at least one task")
        self.tasks = list(tasks)
        self.experts = ExpertBank(
            input_dim, num_experts, expert_units, activation, dropout, batch_norm
        )
        n_gates = 0 if num_experts == 1 else 1 if gate == "shared" else len(self.tasks)
        self.gates = nn.ModuleList(
            Gate(input_dim, num_experts, gate_units, activation) for _ in range(n_gates)
        )
        self.towers = nn.ModuleList(
            tower(expert_units[-1], t, activation, dropout, batch_norm) for t in self.tasks
        )

    @property
    def expert_names(self) -> list[str]:
        return [f"e{k}" for k in range(self.experts.num_experts)]

    def last_shared_layer(self) -> nn.Parameter:
        """The weights of the experts' last layer, which every task's loss reaches (GradNorm
        balances the tasks' gradient norms on it)."""
        return self.experts.weights[-1]

    def gate_weights(self, x: torch.Tensor) -> torch.Tensor:
        """[tasks, B, K] gate distributions (for analysis)."""
        return self._task_gates([gate(x) for gate in self.gates], x.shape[0])

    def _task_gates(self, gates: list[torch.Tensor], rows: int) -> torch.Tensor:
        """The gates' outputs ([B, K] each) as [tasks, B, K]."""
        if not gates:
            return torch.ones(len(self.tasks), rows, 1)
        g = torch.stack(gates)
        return g.expand(len(self.tasks), -1, -1) if len(gates) == 1 else g

    def expert_outputs(self, x: torch.Tensor) -> torch.Tensor:
        """[experts, B, H]: what the gates mix (for analysis)."""
        return self.experts(x)

    def input_layers(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The layers that read the input: the experts' first layer, then each gate's."""
        gates = cast(list[Gate], list(self.gates))
        return [*self.experts.input_layers(), *(g.input_layers()[0] for g in gates)]

    def from_input_layers(self, h: Sequence[torch.Tensor], gates: bool = False) -> NetOutput:
        """`forward` from the outputs of `input_layers()` (same order)."""
        experts = self.experts.from_input_layers(h[:1])
        mods = cast(list[Gate], list(self.gates))
        weights = [gate.from_input_layers([g]) for gate, g in zip(mods, h[1:], strict=True)]
        return self._heads(experts, weights, gates)

    def forward(self, x: torch.Tensor, gates: bool = False) -> NetOutput:
        """Per-task logits; with `gates`, also the gate weights that mixed them, [tasks, B, K]
        as gate_weights gives."""
        return self._heads(self.experts(x), [gate(x) for gate in self.gates], gates)

    def _heads(self, experts: torch.Tensor, weights: list[torch.Tensor], gates: bool) -> NetOutput:
        out = {}
        for i, (task, head) in enumerate(zip(self.tasks, self.towers, strict=True)):
            if not weights:
                h = experts[0]
            else:
                h = _mix(weights[0] if len(weights) == 1 else weights[i], experts.unbind(0))
            out[task.name] = head(h)
        if not gates:
            return NetOutput(out)
        return NetOutput(out, self._task_gates(weights, experts.shape[1]))


class CGCLayer(nn.Module):
    """One PLE extraction layer (Customized Gate Control): shared and per-task experts."""

    def __init__(
        self,
        in_dim: int,
        num_tasks: int,
        num_shared: int,
        num_specific: int,
        expert_units: Sequence[int],
        gate_units: Sequence[int],
        last: bool,
        activation: str,
        dropout: float,
        batch_norm: bool,
    ) -> None:
        super().__init__()
        opts = (activation, dropout, batch_norm)
        self.shared = ExpertBank(in_dim, num_shared, expert_units, *opts)
        self.specific = nn.ModuleList(
            ExpertBank(in_dim, num_specific, expert_units, *opts) for _ in range(num_tasks)
        )
        self.task_gates = nn.ModuleList(
            Gate(in_dim, num_specific + num_shared, gate_units, activation)
            for _ in range(num_tasks)
        )
        # Below the last layer a shared gate mixes every expert for the next layer's shared input.
        self.shared_gate = (
            None
            if last
            else Gate(in_dim, num_tasks * num_specific + num_shared, gate_units, activation)
        )

    def _input_modules(self) -> list[ExpertBank | Gate]:
        """What reads the input: the shared experts, each task's experts, each task's gate, then
        the shared gate if any."""
        shared_gate = [] if self.shared_gate is None else [self.shared_gate]
        return cast(
            list[ExpertBank | Gate], [self.shared, *self.specific, *self.task_gates, *shared_gate]
        )

    def input_layers(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The layers that read the input, when every task's input is the same x (the first
        layer), in `_input_modules()` order."""
        return [m.input_layers()[0] for m in self._input_modules()]

    def forward(
        self, task_in: list[torch.Tensor], shared_in: torch.Tensor
    ) -> tuple[list[torch.Tensor], torch.Tensor | None, list[torch.Tensor]]:
        """Each task's output, the next layer's shared input (None below no layer), and each
        task's gate weights ([B, own + shared experts])."""
        shared = self.shared(shared_in)
        specific = [bank(h) for bank, h in zip(self.specific, task_in, strict=True)]
        gates = [gate(h) for gate, h in zip(self.task_gates, task_in, strict=True)]
        if self.shared_gate is not None:
            gates.append(self.shared_gate(shared_in))
        return self._mix_experts(shared, specific, gates)

    def from_input_layers(
        self, h: Sequence[torch.Tensor]
    ) -> tuple[list[torch.Tensor], torch.Tensor | None, list[torch.Tensor]]:
        """`forward` of one input x from the outputs of `input_layers()` (same order)."""
        outs = [m.from_input_layers([x]) for m, x in zip(self._input_modules(), h, strict=True)]
        n = len(self.specific)
        return self._mix_experts(outs[0], outs[1 : 1 + n], outs[1 + n :])

    def _mix_experts(
        self, shared: torch.Tensor, specific: list[torch.Tensor], gates: list[torch.Tensor]
    ) -> tuple[list[torch.Tensor], torch.Tensor | None, list[torch.Tensor]]:
        task_gates = gates[: len(specific)]
        task_out = [
            _mix(gate, [*own.unbind(0), *shared.unbind(0)])
            for gate, own in zip(task_gates, specific, strict=True)
        ]
        if self.shared_gate is None:
            return task_out, None, task_gates
        every = [e for group in (*specific, shared) for e in group.unbind(0)]
        return task_out, _mix(gates[-1], every), task_gates


class PLE(nn.Module):
    """Progressive Layered Extraction (Tang et al., RecSys 2020); one layer is CGC.

    Each layer has shared experts and per-task experts; task t's gate mixes its own experts and
    the shared ones, and (below the last layer) a shared gate mixes all of them for the next layer.
    """

    def __init__(
        self,
        input_dim: int,
        num_shared_experts: int,
        num_task_experts: int,
        expert_units: Sequence[int],
        tasks: Sequence[TaskHead],
        num_layers: int = 1,
        gate_units: Sequence[int] = (),
        activation: str = "relu",
        dropout: float = 0.0,
        batch_norm: bool = False,
        layer_units: Sequence[Sequence[int]] | None = None,
    ) -> None:
        """`layer_units`: each layer's expert units, when they differ (default: expert_units
        in every layer)."""
        super().__init__()
        self.tasks = list(tasks)
        units = [list(u) for u in layer_units] if layer_units else [list(expert_units)] * num_layers
        if len(units) != num_layers:
            raise ValueError(f"layer_units has {len(units)} layers, num_layers is {num_layers}")
        self.layers = nn.ModuleList(
            CGCLayer(
                input_dim if i == 0 else units[i - 1][-1],
                len(self.tasks),
                num_shared_experts,
                num_task_experts,
                units[i],
                gate_units,
                i == num_layers - 1,
                activation,
                dropout,
                batch_norm,
            )
            for i in range(num_layers)
        )
        self.towers = nn.ModuleList(
            tower(units[-1][-1], t, activation, dropout, batch_norm) for t in self.tasks
        )
        self.num_shared = num_shared_experts
        self.num_specific = num_task_experts

    def last_shared_layer(self) -> nn.Parameter:
        """The weights of the last layer's shared experts, which every task's gate reads."""
        last = self.layers[-1]
        assert isinstance(last, CGCLayer)
        return last.shared.weights[-1]

    @property
    def expert_names(self) -> list[str]:
        """The last layer's experts: each task's own, then the shared ones."""
        own = [f"{t.name}.{k}" for t in self.tasks for k in range(self.num_specific)]
        return own + [f"shared.{k}" for k in range(self.num_shared)]

    def gate_weights(self, x: torch.Tensor) -> torch.Tensor:
        """[tasks, B, experts] gate distributions of the last layer over `expert_names`
        (0 for another task's experts, which a task's gate cannot choose)."""
        gates = self.forward(x, gates=True).gates
        assert gates is not None
        return gates

    def _task_gates(self, gates: list[torch.Tensor]) -> torch.Tensor:
        """The last layer's task gates ([B, own + shared] each) over `expert_names`."""
        n_tasks, s = len(self.tasks), self.num_specific
        out = []
        for t, g in enumerate(gates):
            zeros = g.new_zeros(g.shape[0], n_tasks * s)
            own = torch.cat([zeros[:, : t * s], g[:, :s], zeros[:, (t + 1) * s :]], dim=1)
            out.append(torch.cat([own, g[:, s:]], dim=1))
        return torch.stack(out)

    def expert_outputs(self, x: torch.Tensor) -> torch.Tensor:
        """[experts, B, H] of the last layer, in `expert_names` order (for analysis)."""
        task_in = [x] * len(self.tasks)
        shared_in = x
        for layer in self.layers[:-1]:
            task_in, shared_in, _ = layer(task_in, shared_in)
        last = self.layers[-1]
        assert isinstance(last, CGCLayer)
        own = [bank(h) for bank, h in zip(last.specific, task_in, strict=True)]
        return torch.cat([*own, last.shared(shared_in)])

    def input_layers(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The layers that read the input: the first CGC layer's banks and gates."""
        first = self.layers[0]
        assert isinstance(first, CGCLayer)
        return first.input_layers()

    def from_input_layers(self, h: Sequence[torch.Tensor], gates: bool = False) -> NetOutput:
        """`forward` from the outputs of `input_layers()` (same order)."""
        first = self.layers[0]
        assert isinstance(first, CGCLayer)
        return self._upper_layers(*first.from_input_layers(h), gates)

    def forward(self, x: torch.Tensor, gates: bool = False) -> NetOutput:
        """Per-task logits; with `gates`, also the last layer's gate weights that mixed them,
        [tasks, B, experts] as gate_weights gives."""
        first = self.layers[0]
        assert isinstance(first, CGCLayer)
        task_in, shared_in, weights = first([x] * len(self.tasks), x)
        return self._upper_layers(task_in, shared_in, weights, gates)

    def _upper_layers(
        self,
        task_in: list[torch.Tensor],
        shared_in: torch.Tensor | None,
        weights: list[torch.Tensor],
        gates: bool,
    ) -> NetOutput:
        """The layers above the first, and the towers."""
        for layer in self.layers[1:]:
            assert shared_in is not None  # every layer but the last has a shared output
            task_in, shared_in, weights = layer(task_in, shared_in)
        out = {t.name: head(h) for t, head, h in zip(self.tasks, self.towers, task_in, strict=True)}
        return NetOutput(out, self._task_gates(weights) if gates else None)


class SENet(nn.Module):
    """Squeeze-and-excitation over feature fields (FiBiNET): reweights each field's vector."""

    def __init__(self, num_fields: int, reduction_ratio: int = 4) -> None:
        super().__init__()
        hidden = max(1, num_fields // reduction_ratio)
        self.excite = nn.Sequential(
            nn.Linear(num_fields, hidden), nn.ReLU(), nn.Linear(hidden, num_fields), nn.Sigmoid()
        )

    def forward(self, fields: list[torch.Tensor]) -> list[torch.Tensor]:
        z = torch.stack([f.mean(dim=1) for f in fields], dim=1)  # [B, F]
        w = self.excite(z)
        return [f * w[:, i : i + 1] for i, f in enumerate(fields)]


@dataclass(frozen=True)
class FeatureSpec:
    """How one encoded input enters the network (built from the fitted schema)."""

    name: str
    kind: str  # categorical | tags | numeric
    table: str | None = None  # embedding table, for embedded features
    pooling: str = "mean"  # tags


@dataclass(frozen=True)
class InputLayout:
    """Where each feature lies in the network's dense input: the features in order, each as wide
    as its embedding (a dense numeric value: 1 column)."""

    names: tuple[str, ...]
    widths: tuple[int, ...]

    @classmethod
    def of(
        cls, features: Sequence[FeatureSpec], tables: Mapping[str, tuple[int, int]]
    ) -> InputLayout:
        """`tables`: each embedding table's (rows, dim)."""
        widths = (tables[f.table][1] if f.table is not None else 1 for f in features)
        return cls(tuple(f.name for f in features), tuple(widths))

    @property
    def width(self) -> int:
        return sum(self.widths)

    def columns(self, features: Collection[str]) -> list[int]:
        """The dense input's columns that hold these features, in input order."""
        out: list[int] = []
        start = 0
        for name, width in zip(self.names, self.widths, strict=True):
            if name in features:
                out.extend(range(start, start + width))
            start += width
        return out


class FeatureEmbedding(nn.Module):
    """Encoded inputs -> one vector per field: embeddings (tags pooled, padding ignored), and
    each dense numeric value as a 1-d field. Features naming the same table share it."""

    def __init__(self, features: Sequence[FeatureSpec], tables: dict[str, tuple[int, int]]):
        super().__init__()
        self.features = list(features)
        self.layout = InputLayout.of(self.features, tables)
        # Keys are prefixed: a table called `items` or `type` must not clash with the
        # ModuleDict's own attributes.
        self.tables = nn.ModuleDict(
            {f"emb_{name}": nn.Embedding(n, d) for name, (n, d) in tables.items()}
        )
        for emb in self.tables.values():
            assert isinstance(emb, nn.Embedding)
            nn.init.normal_(emb.weight, std=0.05)

    def table(self, name: str) -> nn.Embedding:
        emb = self.tables[f"emb_{name}"]
        assert isinstance(emb, nn.Embedding)
        return emb

    def forward(self, inputs: dict[str, torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Returns the field vectors and the looked-up embeddings' squared norm (for L2)."""
        fields: list[torch.Tensor] = []
        sq = torch.zeros(())
        for f in self.features:
            x = inputs[f.name]
            if f.table is None:
                fields.append(x.unsqueeze(1))
                continue
            e = self.table(f.table)(x)
            if self.training:
                sq = sq + (e * e).sum() / x.shape[0]
            if f.kind == "tags":
                mask = (x != 0).unsqueeze(-1).to(e.dtype)
                e = (e * mask).sum(1)
                if f.pooling == "mean":
                    e = e / mask.sum(1).clamp(min=1.0)
            fields.append(e)
        return fields, sq


class RankingModel(nn.Module):
    """Encoded features -> [SENet] -> MMoE or PLE -> per-task logits."""

    def __init__(
        self,
        features: Sequence[FeatureSpec],
        tables: dict[str, tuple[int, int]],
        net: nn.Module,
        senet_reduction: int | None = None,
    ) -> None:
        super().__init__()
        self.embedding = FeatureEmbedding(features, tables)
        self.senet = (
            SENet(len(self.embedding.features), senet_reduction) if senet_reduction else None
        )
        self.net = net
        self.tasks: list[TaskHead] = list(net.tasks)  # type: ignore[arg-type]

    def dense_input(self, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        fields, sq = self.embedding(inputs)
        return self.join_fields(fields), sq

    def join_fields(self, fields: list[torch.Tensor]) -> torch.Tensor:
        """The field vectors (in feature order) -> the network's dense input, through SENet."""
        if self.senet is not None:
            fields = self.senet(fields)
        return torch.cat(fields, dim=1)

    def forward(self, inputs: dict[str, torch.Tensor], gates: bool = False) -> NetOutput:
        """Per-task logits and the embedding penalty (training mode); with `gates` (MMoE,
        PLE), also the gate weights that mixed the experts, [tasks, B, experts]."""
        x, penalty = self.dense_input(inputs)
        return replace(self.net(x, gates=gates), penalty=penalty)


def task_outputs(task: TaskHead, logits: torch.Tensor) -> dict[str, torch.Tensor]:
    """The exported outputs of one task (named by mmoe.contract.outputs), the product of an
    ESMM task aside (see `model_outputs`)."""
    names = output_names(task.name, task.kind, task.product)
    if task.kind == "regression":
        return {names.score: logits[:, 0]}
    assert names.logits is not None
    if task.kind == "binary":
        z = logits[:, 0]
        return {names.score: torch.sigmoid(z), names.logits: z}
    return {names.score: F.softmax(logits, dim=-1), names.logits: logits}


def model_outputs(
    tasks: Sequence[TaskHead], logits: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Every exported output, task by task (score, logits, then an ESMM task's product
    `probs_<product>` = p(task) * p(multiply)): what export serves and evaluation scores."""
    out: dict[str, torch.Tensor] = {}
    for task in tasks:
        own = task_outputs(task, logits[task.name])
        out.update(own)
        names = output_names(task.name, task.kind, task.product)
        if names.product is not None:
            assert task.multiply is not None
            out[names.product] = own[names.score] * torch.sigmoid(logits[task.multiply][:, 0])
    return out
