"""The fitted feature schema as ONNX nodes: raw feature values in, the network's inputs out.

Implements the index layout documented in `model/schema.py` with standard operators:
`ai.onnx.ml.LabelEncoder` for vocabularies, `com.microsoft.MurmurHash3` (onnxruntime's contrib
op, the same 32-bit murmur3 training uses via `mmh3`) for hash buckets, arithmetic for
numeric transforms and comparisons for bucket boundaries.

Names: the inputs are named after the features and the outputs are `encoded/<feature>`; the
names inside contain "/", which a feature's name (an identifier) cannot. export/assemble.py puts
this graph in front of the network's.

Beside the encoded values, the graph counts what it is given (FEATURE_VALUES): per feature, its
values that are known, out of vocabulary or defaulted (the rule: model/evaluation.py's
feature_outcomes, which computes the same counts on the training side for the reference).
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

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

# The batch dimension of the graph's inputs: N candidates, and the request context (1, or N).
BATCH_DIM = "batch"
CONTEXT_DIM = "context"

# Monitoring outputs: never scores, listed in the metadata (ModelMetadata.monitor).
MONITOR_PREFIX = "monitor/"
FEATURE_VALUES = MONITOR_PREFIX + "feature_values"  # int64 [features, 3]: known, oov, default
GATE_WEIGHTS = MONITOR_PREFIX + "gate_weights"  # float32 [tasks, experts]: summed over rows


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

    def ids(self, f: FittedFeature, x: str, out: str) -> str | None:
        """String ids (any shape) -> int64 indices of the same shape. Returns, for hashed ids,
        the tensor that is 1 where an id is present and 0 where it is "" (else None)."""
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
            return None
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
        return present

    def ints(self, base: str, value: int | list[Any]) -> str:
        """An int64 constant (a scalar or nested lists)."""
        return self.const(base, np.array(value, dtype=np.int64))

    def numeric(self, f: FittedFeature, x: str, out: str) -> str | None:
        """Returns the tensor that is true where a value is missing, when the feature has a
        default (else None)."""
        nan = None
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
            return nan
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
        return nan


@dataclass(frozen=True)
class _States:
    """Values of one feature as small integer states, to be counted: `tensor` holds a state per
    value ([batch] or [batch, max_len]); `picks` is the state counted as known, oov and default
    (None: this tensor says nothing of that outcome); `capped`: vocabulary indices, states
    only after min(index, 2)."""

    tensor: str
    shape: tuple[str, int]  # (batch dimension, values per row): tensors of one shape go together
    picks: tuple[int | None, int | None, int | None]
    capped: bool = False


class _ValueCounter:
    """FEATURE_VALUES: each feature's values counted by outcome (the rule of model/evaluation.py
    feature_outcomes), from what the preprocessing computes anyway (the indices, the hashed
    ids' presence, the numbers' missing mask).

    A few nodes for all features, not a few per feature: the states of every tensor of one
    shape are stacked and counted at once (Equal against 0, 1, 2, summed over the values), and
    one GatherND picks each feature's three counts from the stacked counts."""

    def __init__(self, g: _GraphBuilder) -> None:
        self.g = g
        self.features: list[list[_States]] = []

    def add(
        self,
        f: FittedFeature,
        x: str,
        encoded: str,
        batch: str,
        present: str | None,
        missing: str | None,
    ) -> None:
        g, name = self.g, f.name
        if f.kind == "numeric":
            missing = missing or g.op("IsNaN", [x], f"{name}_missing")
            state = g.op("Cast", [missing], f"{name}_missing64", to=TensorProto.INT64)
            self.features.append([_States(state, (batch, 1), (0, None, 1))])
            return
        # The index layout (model/schema.py): 0 missing, 1 out of vocabulary, 2+ the
        # vocabulary; hashed: `present` is 0 missing, 1 an id.
        hashed = present is not None
        state = present if present is not None else encoded
        if f.kind == "tags":
            # Each id is known or out of vocabulary (padding is state 0, never picked); a row
            # without ids (padding from its first position on) is one defaulted value.
            first = g.op("Gather", [state, g.ints(f"{name}_first", 0)], f"{name}_first", axis=1)
            assert f.max_len is not None
            self.features.append(
                [
                    _States(
                        state,
                        (batch, f.max_len),
                        (1, None, None) if hashed else (2, 1, None),
                        not hashed,
                    ),
                    _States(first, (batch, 1), (None, None, 0)),
                ]
            )
            return
        if isinstance(f.default, str) and f.default:
            # A missing id reaches the graph as the default itself: that id counts as defaulted
            # (the same id sent explicitly too; the training-side count agrees).
            if f.vocab is not None and f.default in f.vocab:
                index = g.ints(f"{name}_default_index", VOCAB_OFFSET + f.vocab.index(f.default))
                is_default = g.op("Equal", [encoded, index], f"{name}_is_default")
            else:
                marked = g.op(
                    "LabelEncoder",
                    [x],
                    f"{name}_default_mark",
                    domain="ai.onnx.ml",
                    keys_strings=[f.default],
                    values_int64s=[1],
                    default_int64=0,
                )
                is_default = g.op("Cast", [marked], f"{name}_is_default", to=TensorProto.BOOL)
            zero = g.ints(f"{name}_default_state", MISSING_INDEX)
            state = g.op("Where", [is_default, zero, state], f"{name}_state")
        picks = (1, None, 0) if hashed else (2, 1, 0)
        self.features.append([_States(state, (batch, 1), picks, not hashed)])

    def build(self, out: str) -> None:
        g = self.g
        by_shape: dict[tuple[str, int], list[_States]] = {}
        for states in self.features:
            for s in states:
                by_shape.setdefault(s.shape, []).append(s)
        counts: list[str] = []
        column: dict[_States, int] = {}  # each tensor's column in the stacked counts
        for members in by_shape.values():
            tensors = [s.tensor for s in members]
            x = tensors[0]
            if len(tensors) > 1:
                x = g.op("Concat", tensors, "monitor_states", axis=0)
            if any(s.capped for s in members):
                x = g.op("Min", [x, g.ints("monitor_top", 2)], "monitor_capped")
            shape = g.ints("monitor_stack", [1, len(members), -1])
            x = g.op("Reshape", [x, shape], "monitor_stacked")
            # [3, 1, 1] against [1, tensors, values]: each level against a contiguous block
            # (onnxruntime's fast broadcast), summed in float32 (its int64 sums are far
            # slower; counts stay exact below 2**24).
            levels = g.ints("monitor_levels", [[[0]], [[1]], [[2]]])
            hits = g.op("Equal", [levels, x], "monitor_hits")
            hits = g.op("Cast", [hits], "monitor_hits_f", to=TensorProto.FLOAT)
            axis = g.ints("monitor_values_axis", [2])
            counts.append(g.op("ReduceSum", [hits, axis], "monitor_counts", keepdims=0))
            for s in members:
                column[s] = len(column)
        # A last column of zeros for the outcomes a feature never has (oov without vocabulary).
        zero = len(column)
        counts.append(g.const("monitor_zeros", np.zeros((3, 1), dtype=np.float32)))
        index = [[[0, zero]] * 3 for _ in self.features]
        for f, states in enumerate(self.features):
            for s in states:
                for outcome, state in enumerate(s.picks):
                    if state is not None:
                        index[f][outcome] = [state, column[s]]
        stacked = g.op("Concat", counts, "monitor_all_counts", axis=1)  # [3 levels, columns]
        picked = g.op("GatherND", [stacked, g.ints("monitor_index", index)], "monitor_picked")
        g.output("Cast", [picked], out, to=TensorProto.INT64)


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


def preprocessing_graph(
    schema: FeatureSchema, context: Collection[str] = (), monitor: bool = True
) -> onnx.ModelProto:
    """Raw inputs named after the features -> `encoded/<feature>` outputs the network reads, and
    with `monitor` the FEATURE_VALUES counts (int64 [features, 3], in schema order: a context
    input counts the values it is given, one for a request). Features in `context` have the
    batch dimension CONTEXT_DIM, the others BATCH_DIM."""
    g = _GraphBuilder()
    counter = _ValueCounter(g)
    inputs, outputs = [], []
    for f in schema.features:
        batch = CONTEXT_DIM if f.name in context else BATCH_DIM
        inputs.append(input_info(f, batch))
        out = encoded_name(f.name)
        present = missing = None
        if f.kind == "numeric":
            missing = g.numeric(f, f.name, out)
            dtype = TensorProto.INT64 if f.boundaries is not None else TensorProto.FLOAT
        else:
            present = g.ids(f, f.name, out)
            dtype = TensorProto.INT64
        outputs.append(helper.make_tensor_value_info(out, dtype, _shape(f, batch)))
        if monitor:
            counter.add(f, f.name, out, batch, present, missing)
    if monitor:
        counter.build(FEATURE_VALUES)
        shape = [len(schema.features), 3]
        outputs.append(helper.make_tensor_value_info(FEATURE_VALUES, TensorProto.INT64, shape))
    graph = helper.make_graph(g.nodes, "preprocess", inputs, outputs, g.initializers)
    model = helper.make_model(graph, opset_imports=OPSET_IMPORTS)
    model.ir_version = IR_VERSION
    return model
