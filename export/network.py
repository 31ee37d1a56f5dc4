"""The trained network as an ONNX graph: `encoded/<feature>` inputs -> the exported outputs.

`torch.onnx.export` traces `ExportNet`, a wrapper that takes the encoded inputs positionally and
returns the outputs in `graph_output_names` order, with the TorchScript-based exporter
(`dynamo=False`): on these feed-forward networks it gives the same computation as the
torch.export-based one in 0.1-0.2 s instead of 6-8 s (most of it importing and registering that
exporter's machinery), and the parity check compares the file with PyTorch either way. It is
deprecated upstream; torch is pinned (training/pyproject.toml) where it still ships.
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
import warnings
from collections.abc import Collection, Iterator
from pathlib import Path

import onnx
import torch
from torch import nn

from mmoe.contract.outputs import output_names
from mmoe.export.context import ContextSplit
from mmoe.export.graph import CONTEXT_DIM, GATE_WEIGHTS, OPSET, encoded_name
from mmoe.model.network import PLE, MMoE, RankingModel, TaskHead, model_outputs
from mmoe.model.schema import FeatureSchema


class ExportNet(nn.Module):
    """Positional encoded inputs -> the exported outputs, for the exporter. `net` maps the
    encoded inputs by feature name to a NetOutput: the RankingModel, or its ContextSplit. With
    `gates`, the last output is GATE_WEIGHTS: each task's gate weights summed over the rows,
    [tasks, experts]."""

    def __init__(
        self, net: nn.Module, tasks: list[TaskHead], names: list[str], gates: bool = False
    ) -> None:
        super().__init__()
        # The attribute's name begins the weights' names in the graph (`logits.model.net...`):
        # another name would rename them in every file exported from now on.
        self.logits = net
        self.tasks = tasks
        self.names = names
        self.gates = gates

    def forward(self, *encoded: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.logits(dict(zip(self.names, encoded, strict=True)), gates=self.gates)
        scores = tuple(model_outputs(self.tasks, out.logits).values())
        return (*scores, out.gates.sum(dim=1)) if self.gates else scores


def has_gates(model: RankingModel) -> bool:
    """Whether the network mixes experts with gates (not a Shared-Bottom's single expert)."""
    net = model.net
    return isinstance(net, PLE) or (isinstance(net, MMoE) and len(net.gates) > 0)


def graph_output_names(model: RankingModel, gates: bool = False) -> list[str]:
    """The network's outputs in ExportNet's (model_outputs') order."""
    names: list[str] = []
    for t in model.tasks:
        n = output_names(t.name, t.kind, t.product)
        names.extend(name for name in (n.score, n.logits, n.product) if name is not None)
    return [*names, GATE_WEIGHTS] if gates else names


def example_inputs(
    schema: FeatureSchema, context: Collection[str] = (), batch: int = 3
) -> tuple[torch.Tensor, ...]:
    """Encoded inputs to trace with: `batch` rows, one for the features in `context`."""
    out = []
    for f in schema.features:
        rows = 1 if f.name in context else batch
        if f.kind == "tags":
            out.append(torch.ones(rows, f.max_len or 1, dtype=torch.long))
        elif f.embedded:
            out.append(torch.zeros(rows, dtype=torch.long))
        else:
            out.append(torch.zeros(rows))
    return tuple(out)


def export_network(
    model: RankingModel,
    schema: FeatureSchema,
    context: Collection[str] = (),
    gates: bool = False,
) -> onnx.ModelProto:
    """The network alone: `encoded/<feature>` inputs -> per-task outputs, dynamic batch axis,
    and with `gates` the GATE_WEIGHTS output.

    The features in `context` enter through a ContextSplit of the model and get their own
    batch axis (CONTEXT_DIM: 1, or N like the rest)."""
    names = [f.name for f in schema.features]
    net = ContextSplit(model.eval(), context) if context else model.eval()
    wrapper = ExportNet(net, model.tasks, names, gates).eval()
    outputs = graph_output_names(model, gates)
    # Context inputs are traced at a batch of 1 and the others at 3, so that nothing in the
    # graph sizes the candidates by the context; both batch axes are named, and the runtime's
    # broadcasting (the [1, H] bias of a Gemm, Expand) takes 1 or N alike.
    axes = {encoded_name(n): {0: CONTEXT_DIM if n in context else "batch"} for n in names}
    axes.update({name: {0: "batch"} for name in outputs if name != GATE_WEIGHTS})
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings(), quiet_exporter():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            wrapper,
            example_inputs(schema, context),
            Path(tmp) / "network.onnx",
            input_names=[encoded_name(n) for n in names],
            output_names=outputs,
            dynamic_axes=axes,
            opset_version=OPSET,
            dynamo=False,
        )
        proto = onnx.load(Path(tmp) / "network.onnx")
    if context:
        # Shapes inferred while tracing give the context's intermediates a batch of 1.
        del proto.graph.value_info[:]
    return proto


@contextlib.contextmanager
def quiet_exporter() -> Iterator[None]:
    """The exporter prints progress lines to stdout and logs on `torch.onnx`: keep the CLI's
    output readable while it runs (the logger's level is restored after)."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        logger.setLevel(level)
