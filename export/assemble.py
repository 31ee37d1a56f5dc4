"""One ModelProto from a run: the preprocessing graph (export/graph.py) in front of the network's
(export/network.py), merged, with the metadata (export/metadata.py) and checked by
`onnx.checker`.

Names: in the assembled file only the graph's inputs (named after the features) and outputs
(`probs_<task>`, ...) have plain names; everything inside the preprocessing gets PRE_PREFIX and
everything inside the network NET_PREFIX (`with_plain_io`). Feature and output names are
identifiers, so a feature named `cat`, `relu`, `input` or `encoded` cannot meet a tensor of the
same name.
"""

from __future__ import annotations

import onnx
from onnx import compose

from mmoe.export.graph import (
    IR_VERSION,
    MONITOR_PREFIX,
    OPSET_IMPORTS,
    encoded_name,
    preprocessing_graph,
)
from mmoe.export.metadata import build_metadata, write_metadata
from mmoe.export.network import export_network, graph_output_names, has_gates
from mmoe.model.checkpoint import Run

PRE_PREFIX = "pre/"
NET_PREFIX = "net/"


def assemble(run: Run, *, context: bool = True, monitor: bool = True) -> onnx.ModelProto:
    """One ModelProto: raw features -> preprocessing -> network -> outputs, with metadata
    (golden rows are added by export_run, once parity has given PyTorch's outputs).

    With `context`, the features the schema declares request context are taken once per
    request and their share of the network computed once (export/context.py); without, every
    feature is per row, as any other exporter would give. With `monitor`, also the monitoring
    outputs (MONITOR_PREFIX, after the scores)."""
    features = [f.name for f in run.schema.features]
    clash = sorted(set(features) & set(graph_output_names(run.model)))
    if clash:
        raise ValueError(f"features {clash} have the names of outputs; rename the features")
    ctx = run.schema.context_features if context else []
    pre = preprocessing_graph(run.schema, ctx, monitor)
    net = export_network(run.model, run.schema, ctx, monitor and has_gates(run.model))
    net.ir_version = pre.ir_version
    # The exporter may import extra domains; keep ours and theirs, at our versions.
    ours = {o.domain: o.version for o in OPSET_IMPORTS}
    for o in net.opset_import:
        if o.domain not in ours:
            ours[o.domain] = o.version
    for m in (pre, net):
        del m.opset_import[:]
        m.opset_import.extend(onnx.helper.make_opsetid(d, v) for d, v in ours.items())
    merged = with_plain_io(pre, net, features)
    outputs = sorted(merged.graph.output, key=lambda o: o.name.startswith(MONITOR_PREFIX))
    del merged.graph.output[:]
    merged.graph.output.extend(outputs)
    del merged.opset_import[:]  # merge_models lists each domain once per input model
    merged.opset_import.extend(onnx.helper.make_opsetid(d, v) for d, v in ours.items())
    merged.ir_version = IR_VERSION
    merged.producer_name = "mmoe-ranking"
    merged.graph.name = run.config.name
    meta = build_metadata(run, ctx, monitor)
    write_metadata(merged, meta)
    merged.doc_string = (
        f"MMoE ranking model {meta.name} v{meta.version}: raw features in, per-task scores out."
    )
    onnx.checker.check_model(merged, full_check=True)
    return merged


def with_plain_io(
    pre: onnx.ModelProto, net: onnx.ModelProto, features: list[str]
) -> onnx.ModelProto:
    """The preprocessing and the network merged into one model: every name prefixed
    (PRE_PREFIX, NET_PREFIX), the preprocessing's `encoded/<feature>` outputs feeding the
    network's inputs, then the raw inputs and the outputs given back their plain names."""
    pre = compose.add_prefix(pre, PRE_PREFIX)
    net = compose.add_prefix(net, NET_PREFIX)
    io_map = [(PRE_PREFIX + encoded_name(n), NET_PREFIX + encoded_name(n)) for n in features]
    merged = compose.merge_models(pre, net, io_map=io_map)
    plain = {PRE_PREFIX + n: n for n in features}
    # The outputs: the network's, and the preprocessing's own (its monitoring output).
    plain |= {
        o.name: o.name.removeprefix(NET_PREFIX).removeprefix(PRE_PREFIX)
        for o in merged.graph.output
    }
    rename_edges(merged.graph, plain)
    return merged


def rename_edges(graph: onnx.GraphProto, names: dict[str, str]) -> None:
    """Renames tensors everywhere they appear: nodes (and their subgraphs), the graph's inputs,
    outputs, initializers and value infos."""
    for node in graph.node:
        node.input[:] = [names.get(n, n) for n in node.input]
        node.output[:] = [names.get(n, n) for n in node.output]
        for attr in node.attribute:
            for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
                rename_edges(sub, names)
    for entries in (graph.input, graph.output, graph.value_info, graph.initializer):
        for entry in entries:
            entry.name = names.get(entry.name, entry.name)
