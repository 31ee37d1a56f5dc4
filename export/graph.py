"""The fitted feature schema as ONNX nodes: raw feature values in, the network's inputs out.

Implements the index layout documented in `model/schema.py` with standard operators:
`ai.onnx.ml.LabelEncoder` for vocabularies, `com.microsoft.MurmurHash3` (onnxruntime's contrib
op, the same 32-bit murmur3 training uses via `mmh3`) for hash buckets, arithmetic for
numeric transforms and comparisons for bucket boundaries.

Names: in the assembled file only the graph's inputs (named after the features) and outputs
(`probs_<task>`, ...) have plain names; everything inside the preprocessing gets PRE_PREFIX and
everything inside the network NET_PREFIX (`with_plain_io`), and the preprocessing's own names
contain "/" too. Feature and output names are identifiers, so a feature named `cat`, `relu`,
`input` or `encoded` cannot meet a tensor of the same name.
"""

from __future__ import annotations

from collections.abc import Collection

import numpy as np
import onnx
from onnx import TensorProto, compose, helper, numpy_helper

from mmoe.contract.metadata import FeatureInfo
from mmoe.model.schema import (
    HASH_SEED,
    MISSING_INDEX,
    OOV_INDEX,
    VOCAB_OFFSET,
    FeatureSchema,
    FittedFeature,
)

OPSET = 18  # the default domain; onnxruntime >= 1.14 implements it
ML_OPSET = 3  # ai.onnx.ml: LabelEncoder v2 (string keys, int64 values)
IR_VERSION = 9  # onnxruntime >= 1.15 loads IR 9
OPSET_IMPORTS = [
    helper.make_opsetid("", OPSET),
    helper.make_opsetid("ai.onnx.ml", ML_OPSET),
    helper.make_opsetid("com.microsoft", 1),
]


PRE_PREFIX = "pre/"
NET_PREFIX = "net/"
# The batch dimension of the graph's inputs: N candidates, and the request context (1, or N).
BATCH_DIM = "batch"
CONTEXT_DIM = "context"


def encoded_name(feature: str) -> str:
    """Name of the network input that carries a feature's encoded value (never a feature's
    name: those are identifiers)."""
    return f"encoded/{feature}"


class _GraphBuilder:
    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[TensorProto] = []
        self._n = 0

    def name(self, base: str) -> str:
        self._n += 1
        return f"{base}/{self._n}"  # "/": never a feature's name

    def const(self, base: str, value: np.ndarray) -> str:
        name = self.name(base)
        self.initializers.append(numpy_helper.from_array(value, name))
        return name

    def op(self, op_type: str, inputs: list[str], base: str, domain: str = "", **attrs) -> str:
        out = self.name(base)
        self.nodes.append(
            helper.make_node(op_type, inputs, [out], name=out, domain=domain, **attrs)
        )
        return out

    def output(self, op_type: str, inputs: list[str], out: str, domain: str = "", **attrs) -> None:
        self.nodes.append(
            helper.make_node(op_type, inputs, [out], name=out, domain=domain, **attrs)
        )

    def ids(self, f: FittedFeature, x: str, out: str) -> None:
        """String ids (any shape) -> int64 indices of the same shape."""
        if f.hash_buckets is None:
            assert f.vocab is not None
            keys = ["", *f.vocab]
            values = [MISSING_INDEX, *range(VOCAB_OFFSET, VOCAB_OFFSET + len(f.vocab))]
            self.output(
                "LabelEncoder",
                [x],
                out,
                domain="ai.onnx.ml",
                keys_strings=keys,
                values_int64s=values,
                default_int64=OOV_INDEX,
            )
            return
        # 1 + murmur3(x) % buckets, and 0 where x == "" (the present-mask is a one-key encoder).
        present = self.op(
            "LabelEncoder",
            [x],
            f"{f.name}_present",
            domain="ai.onnx.ml",
            keys_strings=[""],
            values_int64s=[0],
            default_int64=1,
        )
        h = self.op(
            "MurmurHash3", [x], f"{f.name}_hash", domain="com.microsoft", seed=HASH_SEED, positive=1
        )
        h = self.op("Cast", [h], f"{f.name}_hash64", to=TensorProto.INT64)
        buckets = self.const(f"{f.name}_buckets", np.array(f.hash_buckets, dtype=np.int64))
        h = self.op("Mod", [h, buckets], f"{f.name}_bucket")
        one = self.const(f"{f.name}_one", np.array(1, dtype=np.int64))
        h = self.op("Add", [h, one], f"{f.name}_bucket1")
        self.output("Mul", [h, present], out)

    def numeric(self, f: FittedFeature, x: str, out: str) -> None:
        if f.default is not None:
            nan = self.op("IsNaN", [x], f"{f.name}_isnan")
            default = self.const(f"{f.name}_default", np.array(f.default, dtype=np.float32))
            x = self.op("Where", [nan, default, x], f"{f.name}_filled")
        if f.boundaries is not None:
            b = self.const(f"{f.name}_boundaries", np.asarray([f.boundaries], dtype=np.float32))
            axes = self.const(f"{f.name}_axes", np.array([1], dtype=np.int64))
            col = self.op("Unsqueeze", [x, axes], f"{f.name}_col")
            ge = self.op("GreaterOrEqual", [col, b], f"{f.name}_ge")
            ge = self.op("Cast", [ge], f"{f.name}_ge64", to=TensorProto.INT64)
            self.output("ReduceSum", [ge, axes], out, keepdims=0)
            return
        if f.transform == "log1p":
            zero = self.const(f"{f.name}_zero", np.array(0, dtype=np.float32))
            one = self.const(f"{f.name}_one", np.array(1, dtype=np.float32))
            x = self.op("Max", [x, zero], f"{f.name}_pos")
            x = self.op("Add", [x, one], f"{f.name}_plus1")
            self.output("Log", [x], out)
        elif f.transform == "standard":
            assert f.mean is not None and f.std is not None
            mean = self.const(f"{f.name}_mean", np.array(f.mean, dtype=np.float32))
            std = self.const(f"{f.name}_std", np.array(f.std, dtype=np.float32))
            x = self.op("Sub", [x, mean], f"{f.name}_centered")
            self.output("Div", [x, std], out)
        else:
            self.output("Identity", [x], out)


def _shape(f: FittedFeature, batch: str) -> list[str | int]:
    assert f.kind != "tags" or f.max_len is not None
    return [batch, f.max_len] if f.kind == "tags" else [batch]  # type: ignore[list-item]


def input_info(f: FittedFeature, batch: str = BATCH_DIM) -> onnx.ValueInfoProto:
    dtype = TensorProto.FLOAT if f.kind == "numeric" else TensorProto.STRING
    return helper.make_tensor_value_info(f.name, dtype, _shape(f, batch))


def encoding_text(f: FittedFeature) -> str:
    if f.kind == "numeric":
        if f.boundaries is not None:
            return f"bucketised by {len(f.boundaries)} boundaries"
        return {"none": "as is", "log1p": "log1p(max(x, 0))", "standard": "standardised"}[
            f.transform
        ]
    if f.hash_buckets is not None:
        return f"murmur3 hash into {f.hash_buckets} buckets"
    assert f.vocab is not None
    return f"vocabulary of {len(f.vocab)} (+ OOV)"


def feature_info(f: FittedFeature, context: bool = False) -> FeatureInfo:
    """What a server needs to know of one fitted feature (its entry in the file's metadata);
    `context`: the graph takes it once per request."""
    return FeatureInfo(
        name=f.name,
        kind=f.kind,
        dtype="float32" if f.kind == "numeric" else "string",
        default=f.default,
        separator=f.separator,
        max_len=f.max_len,
        encoding=encoding_text(f),
        context=context,
    )


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
    plain |= {o.name: o.name.removeprefix(NET_PREFIX) for o in merged.graph.output}
    rename_edges(merged.graph, plain)
    return merged


def preprocessing_graph(schema: FeatureSchema, context: Collection[str] = ()) -> onnx.ModelProto:
    """Raw inputs named after the features -> `encoded/<feature>` outputs the network reads.
    Features in `context` have the batch dimension CONTEXT_DIM, the others BATCH_DIM."""
    g = _GraphBuilder()
    inputs, outputs = [], []
    for f in schema.features:
        batch = CONTEXT_DIM if f.name in context else BATCH_DIM
        inputs.append(input_info(f, batch))
        out = encoded_name(f.name)
        if f.kind == "numeric":
            g.numeric(f, f.name, out)
            dtype = TensorProto.INT64 if f.boundaries is not None else TensorProto.FLOAT
        else:
            g.ids(f, f.name, out)
            dtype = TensorProto.INT64
        outputs.append(helper.make_tensor_value_info(out, dtype, _shape(f, batch)))
    graph = helper.make_graph(g.nodes, "preprocess", inputs, outputs, g.initializers)
    model = helper.make_model(graph, opset_imports=OPSET_IMPORTS)
    model.ir_version = IR_VERSION
    return model
