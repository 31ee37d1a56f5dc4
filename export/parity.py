"""Parity between PyTorch (Python-side preprocessing) and onnxruntime (raw inputs in the graph).

Raw rows are generated from the fitted schema so that every path is exercised: known values,
out-of-vocabulary values, missing values (null), empty and over-long tag lists, negative and
huge numbers. Rows from a real data file can be added. A file with context inputs is also run
as ranking requests: the context given once ([1]-shaped) for a block of rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise

import numpy as np
import onnxruntime as ort
import pyarrow as pa
import torch

from mmoe.contract.metadata import read_metadata
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


# Rows per ranking request in the context check (after a first request of one row).
REQUEST_ROWS = 64


def as_requests(
    cols: dict[str, RawColumn], context: Sequence[str], rows: int = REQUEST_ROWS
) -> tuple[dict[str, RawColumn], list[slice]]:
    """The rows cut into ranking requests (one row, then `rows` at a time), each context
    feature holding its request's first value on every row of the request."""
    n = len(next(iter(cols.values())))
    bounds = sorted({0, min(1, n), *range(1, n, rows), n})
    blocks = [slice(a, b) for a, b in pairwise(bounds)]
    out = dict(cols)
    for name in context:
        values = cols[name]
        out[name] = [values[b.start] for b in blocks for _ in range(b.stop - b.start)]
    return out, blocks


def check_parity(
    model: RankingModel,
    schema: FeatureSchema,
    onnx_bytes: bytes,
    cols: dict[str, RawColumn],
    tolerance: float = 1e-5,
) -> float:
    """Max |torch - onnxruntime| over every output; raises ParityError above `tolerance`.

    Every input is given one value per row; if the file declares context inputs, the rows are
    also scored as ranking requests (`as_requests`) with each context input given once.
    Probabilities are compared absolutely; unbounded outputs (regression values, logits) with
    |value| > 1 relative to their magnitude, since float32 resolves no finer than that."""
    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    got = dict(zip(names, session.run(names, to_onnx_inputs(schema, cols)), strict=True))
    worst = _compare(torch_outputs(model, schema, cols), got, cols, tolerance, "")
    meta = read_metadata(session.get_modelmeta().custom_metadata_map)
    context = [f.name for f in meta.features if f.context]
    if not context:
        return worst
    requests, blocks = as_requests(cols, context)
    parts: dict[str, list[np.ndarray]] = {name: [] for name in names}
    for block in blocks:
        feeds = to_onnx_inputs(schema, {k: v[block] for k, v in requests.items()})
        for name in context:
            feeds[name] = feeds[name][:1]
        try:
            values = session.run(names, feeds)
        except Exception as err:  # onnxruntime raises several unrelated types
            raise ParityError(
                f"onnxruntime fails on a request of {block.stop - block.start} rows with the "
                f"context inputs given once: {err}"
            ) from None
        for name, value in zip(names, values, strict=True):
            parts[name].append(value)
    got = {k: np.concatenate(v) for k, v in parts.items()}
    expected = torch_outputs(model, schema, requests)
    where = " with the context inputs given once per request"
    return max(worst, _compare(expected, got, requests, tolerance, where))


def _compare(
    expected: dict[str, np.ndarray],
    got: dict[str, np.ndarray],
    cols: dict[str, RawColumn],
    tolerance: float,
    where: str,
) -> float:
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
                f"onnxruntime{where} at row {row}: {raw}"
            )
    return worst
