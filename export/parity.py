"""Parity between PyTorch (Python-side preprocessing) and onnxruntime (raw inputs in the graph).

Raw rows are generated from the fitted schema so that every path is exercised: known values,
out-of-vocabulary values, missing values (null), empty and over-long tag lists, negative and
huge numbers. Rows from a real data file can be added.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pyarrow as pa
import torch

from mmoe.model.batches import encode_table
from mmoe.model.evaluation import predict
from mmoe.model.network import RankingModel
from mmoe.model.schema import FeatureSchema, FittedFeature

RawColumn = list[object]


class ParityError(AssertionError):
    """The ONNX graph and PyTorch disagree beyond the tolerance."""


def generate_rows(schema: FeatureSchema, n: int, seed: int = 0) -> dict[str, RawColumn]:
    """Raw feature values as a caller would send them (None = missing)."""
    rng = np.random.default_rng(seed)
    cols: dict[str, RawColumn] = {}
    for f in schema.features:
        cols[f.name] = [_raw_value(f, rng) for _ in range(n)]
    return cols


def _raw_id(f: FittedFeature, rng: np.random.Generator) -> str:
    r = rng.random()
    if f.vocab and r < 0.7:
        return str(f.vocab[rng.integers(len(f.vocab))])
    if r < 0.8:
        return ""
    return f"oov_{rng.integers(1_000_000)}_é"


def _raw_value(f: FittedFeature, rng: np.random.Generator) -> object:
    missing_ok = f.default is not None
    if missing_ok and rng.random() < 0.1:
        return None
    if f.kind == "numeric":
        lo, hi = (f.boundaries[0] - 1, f.boundaries[-1] + 1) if f.boundaries else (-5.0, 500.0)
        value = float(rng.uniform(lo, hi))
        if f.boundaries and rng.random() < 0.3:  # exactly on a boundary
            value = float(f.boundaries[rng.integers(len(f.boundaries))])
        return value
    if f.kind == "tags":
        assert f.max_len is not None
        length = int(rng.integers(0, f.max_len + 3))
        return [_raw_id(f, rng) for _ in range(length)]
    return _raw_id(f, rng)


def by_feature_name(schema: FeatureSchema) -> FeatureSchema:
    """The schema reading each feature from a column named after it: served inputs are named by
    feature, and two features may come from one training column (e.g. an id and its count)."""
    return FeatureSchema(
        features=[f.model_copy(update={"column": f.name}) for f in schema.features]
    )


def to_arrow(schema: FeatureSchema, cols: dict[str, RawColumn]) -> pa.Table:
    """Raw values keyed by feature name -> a table for `by_feature_name(schema).encode`."""
    arrays = {}
    for f in schema.features:
        if f.kind == "numeric":
            arrays[f.name] = pa.array(cols[f.name], pa.float64())
        elif f.kind == "tags":
            arrays[f.name] = pa.array(cols[f.name], pa.list_(pa.string()))
        else:
            arrays[f.name] = pa.array(cols[f.name], pa.string())
    return pa.table(arrays)


def to_onnx_inputs(schema: FeatureSchema, cols: dict[str, RawColumn]) -> dict[str, np.ndarray]:
    """Raw values -> the graph's inputs, filling omitted values as the service does."""
    feeds: dict[str, np.ndarray] = {}
    for f in schema.features:
        values = cols[f.name]
        if f.kind == "numeric":
            feeds[f.name] = np.array([np.nan if v is None else v for v in values], dtype=np.float32)
        elif f.kind == "tags":
            assert f.max_len is not None
            arr = np.full((len(values), f.max_len), "", dtype=object)
            for i, v in enumerate(values):
                raw = f.default if v is None else v
                tokens = [t for t in (raw if isinstance(raw, list) else []) if t != ""][: f.max_len]
                arr[i, : len(tokens)] = tokens
            feeds[f.name] = arr
        else:
            feeds[f.name] = np.array(
                [f.default if v is None else str(v) for v in values], dtype=object
            )
    return feeds


def torch_outputs(
    model: RankingModel, schema: FeatureSchema, cols: dict[str, RawColumn]
) -> dict[str, np.ndarray]:
    batch = encode_table(to_arrow(schema, cols), by_feature_name(schema), [], with_labels=False)
    with torch.no_grad():
        return predict(model, batch)


def check_parity(
    model: RankingModel,
    schema: FeatureSchema,
    onnx_bytes: bytes,
    cols: dict[str, RawColumn],
    tolerance: float = 1e-5,
) -> float:
    """Max |torch - onnxruntime| over every output; raises ParityError above `tolerance`.

    Probabilities are compared absolutely; unbounded outputs (regression values, logits) with
    |value| > 1 relative to their magnitude, since float32 resolves no finer than that."""
    expected = torch_outputs(model, schema, cols)
    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    got = dict(zip(names, session.run(names, to_onnx_inputs(schema, cols)), strict=True))
    worst = 0.0
    for name, want in expected.items():
        if name not in got:
            raise ParityError(f"the ONNX graph has no output {name!r}")
        diff = np.abs(got[name].astype(np.float64) - want.astype(np.float64))
        if not np.isfinite(diff).all():
            raise ParityError(f"{name}: non-finite values in one of the two outputs")
        worst = max(worst, float(diff.max(initial=0.0)))
        excess = diff / np.maximum(1.0, np.abs(want.astype(np.float64)))
        if excess.max(initial=0.0) > tolerance:
            row = int(np.unravel_index(excess.argmax(), excess.shape)[0])
            raw = {k: v[row] for k, v in cols.items()}
            raise ParityError(
                f"{name} differs by {excess.max():.3g} (> {tolerance:g}) between PyTorch and "
                f"onnxruntime at row {row}: {raw}"
            )
    return worst
