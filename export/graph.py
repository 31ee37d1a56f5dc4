"""The fitted feature schema as ONNX nodes: raw feature values in, the network's inputs out.

Implements the index layout documented in `model/schema.py` with standard operators:
`ai.onnx.ml.LabelEncoder` for vocabularies, `com.microsoft.MurmurHash3` (onnxruntime's contrib
op, the same 32-bit murmur3 training uses via `mmh3`) for hash buckets, arithmetic for
numeric transforms and comparisons for bucket boundaries.

Beside the encoded values, the graph counts what it is given (FEATURE_VALUES): per feature, its
values that are known, out of vocabulary or defaulted (the rule: model/evaluation.py's
feature_outcomes, which computes the same counts on the training side for the reference).
"""

from __future__ import annotations

from collections.abc import Collection

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

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
    """Name of the network input that carries a feature's encoded value."""
    return f"enc__{feature}"


class _GraphBuilder:
    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[TensorProto] = []
        self._n = 0

    def name(self, base: str) -> str:
        self._n += 1
        return f"{base}__{self._n}"

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

    def ints(self, base: str, value: int | list[int]) -> str:
        return self.const(base, np.array(value, dtype=np.int64))

    def outcome_codes(
        self, f: FittedFeature, x: str, encoded: str, slot: int, drop: int
    ) -> list[str]:
        """One int64 code per value of feature `f` (raw input `x`, its encoded indices
        `encoded`): 3 * slot + 0 (known), 1 (out of vocabulary) or 2 (default), or `drop` for a
        tag position that holds no id. Returns 1-D tensors; count_codes counts them."""
        known, oov, default = 3 * slot, 3 * slot + 1, 3 * slot + 2
        name = f.name
        if f.kind == "numeric":
            nan = self.op("IsNaN", [x], f"{name}_missing")
            pick = [
                nan,
                self.ints(f"{name}_default_code", default),
                self.ints(f"{name}_known_code", known),
            ]
            return [self.op("Where", pick, f"{name}_code")]
        # The index layout (model/schema.py): 0 missing, 1 out of vocabulary, 2+ the
        # vocabulary; or 0 missing, 1+ a hash bucket. min(index, top) is a row of a small table.
        hashed = f.hash_buckets is not None
        top = 1 if hashed else 2
        capped = self.op("Min", [encoded, self.ints(f"{name}_top", top)], f"{name}_capped")
        if f.kind == "tags":
            # Each id is known or out of vocabulary, padding is dropped, and a row without ids
            # (padding from its first position on) is one defaulted value.
            per_id = [drop, known] if hashed else [drop, oov, known]
            ids = self.op(
                "Gather", [self.ints(f"{name}_id_codes", per_id), capped], f"{name}_id_code"
            )
            ids = self.op("Reshape", [ids, self.ints(f"{name}_flat", [-1])], f"{name}_id_codes")
            first = self.ints(f"{name}_first", 0)
            first = self.op("Gather", [capped, first], f"{name}_first_id", axis=1)
            per_row = [default, drop] if hashed else [default, drop, drop]
            rows = self.op(
                "Gather", [self.ints(f"{name}_row_codes", per_row), first], f"{name}_row_code"
            )
            return [ids, rows]
        table = [default, known] if hashed else [default, oov, known]
        code = self.op("Gather", [self.ints(f"{name}_codes", table), capped], f"{name}_code")
        if isinstance(f.default, str) and f.default:
            # A missing id reaches the graph as the default itself: that id counts as defaulted
            # (so does the same id sent explicitly; the training-side count agrees).
            if f.vocab is not None and f.default in f.vocab:
                index = self.ints(f"{name}_default_index", VOCAB_OFFSET + f.vocab.index(f.default))
                is_default = self.op("Equal", [encoded, index], f"{name}_is_default")
            else:
                marked = self.op(
                    "LabelEncoder",
                    [x],
                    f"{name}_default_mark",
                    domain="ai.onnx.ml",
                    keys_strings=[f.default],
                    values_int64s=[1],
                    default_int64=0,
                )
                is_default = self.op("Cast", [marked], f"{name}_is_default", to=TensorProto.BOOL)
            pick = [is_default, self.ints(f"{name}_default_code", default), code]
            code = self.op("Where", pick, f"{name}_code")
        return [code]

    def count_codes(self, codes: list[str], n_features: int, out: str) -> None:
        """Counts of outcome_codes' codes -> `out`, int64 [n_features, 3]."""
        flat = codes[0] if len(codes) == 1 else self.op("Concat", codes, "monitor_codes", axis=0)
        ones = self.op(
            "ConstantOfShape",
            [self.op("Shape", [flat], "monitor_codes_shape")],
            "monitor_ones",
            value=numpy_helper.from_array(np.array([1], dtype=np.int64)),
        )
        zeros = self.ints("monitor_zeros", [0] * (3 * n_features + 1))
        counts = self.op(
            "ScatterElements", [zeros, flat, ones], "monitor_counts", axis=0, reduction="add"
        )
        # The last slot collects the dropped codes (tag padding).
        kept = self.op(
            "Slice",
            [counts, self.ints("monitor_start", [0]), self.ints("monitor_end", [3 * n_features])],
            "monitor_kept",
        )
        self.output("Reshape", [kept, self.ints("monitor_shape", [n_features, 3])], out)

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


def preprocessing_graph(
    schema: FeatureSchema, context: Collection[str] = (), monitor: bool = True
) -> onnx.ModelProto:
    """Raw inputs named after the features -> `enc__<feature>` outputs the network reads, and
    with `monitor` the FEATURE_VALUES counts (int64 [features, 3], in schema order: a context
    input counts the values it is given, one for a request). Features in `context` have the
    batch dimension CONTEXT_DIM, the others BATCH_DIM."""
    g = _GraphBuilder()
    inputs, outputs = [], []
    codes: list[str] = []
    drop = 3 * len(schema.features)
    for slot, f in enumerate(schema.features):
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
        if monitor:
            codes += g.outcome_codes(f, f.name, out, slot, drop)
    if monitor:
        g.count_codes(codes, len(schema.features), FEATURE_VALUES)
        shape = [len(schema.features), 3]
        outputs.append(helper.make_tensor_value_info(FEATURE_VALUES, TensorProto.INT64, shape))
    graph = helper.make_graph(g.nodes, "preprocess", inputs, outputs, g.initializers)
    model = helper.make_model(graph, opset_imports=OPSET_IMPORTS)
    model.ir_version = IR_VERSION
    return model
