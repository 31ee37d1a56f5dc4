"""A trained RankingModel rewritten for one ranking request: request context computed once.

A request is one user (the features declared `context: true`) and N candidates. Exported as is,
the graph looks up, embeds and multiplies the context N times. `ContextSplit` computes the same
outputs from the same weights with the context at batch 1:

- each context feature is looked up (embedding, tag pooling) once;
- the layers that read the dense input (the first layer of the experts and of every gate; of
  PLE's first layer, its banks and gates) are split by rows of their weight,
  `x W + b = (x_ctx W_ctx + b) + x_cand W_cand`: the context's share is one [1, H] row, which
  the candidates' matmul takes as its bias (one Gemm, broadcast by the runtime, no [N, H] copy);
- where SENet mixes context and candidate fields per row before the first layer, the context
  fields are broadcast to the N rows right after their lookup, and the rest is the model's own.

Training is untouched: this is an export-time view of the trained weights (`export/network.py`
traces it with the context inputs at batch 1; the graph accepts 1 or N, and the export's parity
check runs both).
"""

from __future__ import annotations

from collections.abc import Collection

import torch
from torch import nn

from mmoe.model.network import PLE, MMoE, NetOutput, RankingModel


class ContextSplit(nn.Module):
    """`forward(inputs)`: RankingModel's, for context inputs of batch 1 (or N) and the other
    inputs of batch N. The weight split is taken when this is built: build it from the trained
    model, after training."""

    def __init__(self, model: RankingModel, context: Collection[str]) -> None:
        super().__init__()
        self.model = model
        features = model.embedding.features
        self.is_context = [f.name in context for f in features]
        if all(self.is_context) or not any(self.is_context):
            raise ValueError("ContextSplit needs some context features and some per candidate")
        net = model.net
        # SENet weighs each field by all fields of its row: no linear split before it.
        self.split = model.senet is None and isinstance(net, MMoE | PLE)
        self.ctx_weights = nn.ParameterList()
        self.cand_weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        if not self.split:
            return
        assert isinstance(net, MMoE | PLE)
        layout = model.embedding.layout
        ctx_rows = layout.columns(set(context))
        cand_rows = layout.columns({f.name for f in features} - set(context))
        for w, b in net.input_layers():
            frozen = {"requires_grad": False}
            self.ctx_weights.append(nn.Parameter(w.detach()[ctx_rows].clone(), **frozen))
            self.cand_weights.append(nn.Parameter(w.detach()[cand_rows].clone(), **frozen))
            self.biases.append(nn.Parameter(b.detach().clone(), **frozen))

    def forward(self, inputs: dict[str, torch.Tensor], gates: bool = False) -> NetOutput:
        """Per-task logits; with `gates`, also the gate weights (RankingModel's forward)."""
        fields, _ = self.model.embedding(inputs)  # each field at its own input's batch
        ctx = [f for f, c in zip(fields, self.is_context, strict=True) if c]
        cand = [f for f, c in zip(fields, self.is_context, strict=True) if not c]
        if not self.split:
            n = cand[0].shape[0]
            fields = [
                f.expand(n, -1) if c else f for f, c in zip(fields, self.is_context, strict=True)
            ]
            out: NetOutput = self.model.net(self.model.join_fields(fields), gates=gates)
            return out
        x_ctx, x_cand = torch.cat(ctx, dim=1), torch.cat(cand, dim=1)
        h = [
            torch.addmm(torch.addmm(b, x_ctx, w_ctx), x_cand, w_cand)  # [1 or N, H] as the bias
            for w_ctx, w_cand, b in zip(
                self.ctx_weights, self.cand_weights, self.biases, strict=True
            )
        ]
        net = self.model.net
        assert isinstance(net, MMoE | PLE)
        return net.from_input_layers(h, gates)
