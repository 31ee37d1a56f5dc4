"""Parity between PyTorch (training's preprocessing, in Python) and onnxruntime (the graph).

The rows are raw values as a caller sends them (JSON values, None = null), keyed by feature:

- generated from the fitted schema: numeric values drawn from what training saw (each feature's
  range and quantiles, `NumericStats`), its extremes, quantiles and bucket boundaries exactly,
  and some up to a tenth of the range beyond it; known, out-of-vocabulary, empty and integer ids;
  missing values; empty and over-long tag lists, and tags as one separated string;
- real held-back validation rows, kept by training in RUN_DIR (`save_valid_sample`).

onnxruntime gets arrays built by the contract's rules (`contract/values.py`, what the service
does with a request); PyTorch gets the same values read as training reads a data file
(`FeatureSchema.encode`). So the check covers both the graph and the request rules. A file with
context inputs is also run as ranking requests: the context given once ([1]-shaped) for a block
of rows. The monitoring outputs are checked on the same rows (`check_monitoring`).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from mmoe.contract.metadata import OUTCOMES, GoldenRows, read_metadata
from mmoe.contract.values import graph_inputs, json_value
from mmoe.export.graph import FEATURE_VALUES, GATE_WEIGHTS, feature_info
from mmoe.export.network import has_gates
from mmoe.model.batches import Batch, encode_table
from mmoe.model.checkpoint import VALID_SAMPLE, Run
from mmoe.model.evaluation import feature_outcomes, predict
from mmoe.model.network import RankingModel
from mmoe.model.schema import (
    FeatureSchema,
    FittedFeature,
    categorical_strings,
    numeric_values,
)
from mmoe.model.schema import tag_tokens as training_tag_tokens

RawColumn = list[Any]

FLOAT32_EPS = float(np.finfo(np.float32).eps)  # 2**-23
# Relative size of the perturbation that measures each value's float32 sensitivity, and how
# many random draws of it (the largest response counts).
PERTURBATION = 2.0**-20
PERTURBATION_DRAWS = 3
# A correct float32 evaluation in another order (another runtime, fused or blocked kernels) may
# differ from PyTorch's by this many float32 roundings of the row's sensitivity. Measured
# (onnxruntime 1.32 on CPU, logits and regression outputs): at most 14 for the demo model, 3.4
# for the EasyRec-sized one, 1-8 for the paper-synthetic, real-scale and test models.
ROUNDING_ALLOWANCE = 64.0


class ParityError(AssertionError):
    """The ONNX graph and PyTorch disagree beyond the tolerance."""


# ---------------------------------------------------------------------------------- rows


def generate_rows(schema: FeatureSchema, n: int, seed: int = 0) -> dict[str, RawColumn]:
    """N rows of raw feature values exercising every rule, drawn from what training saw."""
    rng = np.random.default_rng(seed)
    return {f.name: [_raw_value(f, rng) for _ in range(n)] for f in schema.features}


def _is_decimal(v: str) -> bool:
    return v.lstrip("-").isdigit() and str(int(v)) == v


def _raw_id(f: FittedFeature, rng: np.random.Generator) -> str | int:
    r = rng.random()
    if f.vocab and r < 0.7:
        known = str(f.vocab[rng.integers(len(f.vocab))])
        # A caller may send an integer id; it is scored as its decimal string.
        return int(known) if _is_decimal(known) and rng.random() < 0.5 else known
    if r < 0.8:
        return ""
    if r < 0.85:
        return int(rng.integers(-5, 1_000_000))
    return f"oov_{rng.integers(1_000_000)}_é"


def _numeric_knots(f: FittedFeature) -> tuple[list[float], list[float]]:
    """(cumulative levels, values) of the distribution training saw, for inverse-CDF draws."""
    if f.stats is not None:
        quantiles = sorted((float(k[1:]) / 100, v) for k, v in f.stats.quantiles.items())
        levels = [0.0, *(q for q, _ in quantiles), 1.0]
        return levels, [f.stats.min, *(v for _, v in quantiles), f.stats.max]
    if f.boundaries:  # runs trained before the statistics were recorded
        return [0.0, 1.0], [f.boundaries[0] - 1, f.boundaries[-1] + 1]
    return [0.0, 1.0], [-5.0, 500.0]


def _raw_value(f: FittedFeature, rng: np.random.Generator) -> Any:
    if f.default is not None and rng.random() < 0.1:
        return None
    if f.kind == "numeric":
        levels, knots = _numeric_knots(f)
        anchors = [*knots, *(f.boundaries or [])]
        r = rng.random()
        if r < (0.3 if f.boundaries else 0.1):  # exactly an extreme, a quantile or a boundary
            return float(anchors[rng.integers(len(anchors))])
        span = (knots[-1] - knots[0]) or 1.0
        if rng.random() < 0.05:  # a little beyond what training saw
            beyond = float(rng.uniform(0, 0.1)) * span
            return knots[0] - beyond if rng.random() < 0.5 else knots[-1] + beyond
        return float(np.interp(rng.random(), levels, knots))
    if f.kind == "tags":
        assert f.max_len is not None
        tokens = [_raw_id(f, rng) for _ in range(int(rng.integers(0, f.max_len + 3)))]
        if rng.random() < 0.25:  # one string split on the separator ("" tokens: empty pieces)
            return (f.separator or "|").join(map(str, tokens))
        return tokens
    return _raw_id(f, rng)


def edge_rows(schema: FeatureSchema) -> dict[str, RawColumn]:
    """Five rows that between them take every rule's edge: (0, 1) every feature that has a
    default null (golden rows send the first as null and leave the second's out); (2) numbers
    at the smallest value training saw, ids as integers where the vocabulary has decimal ids,
    tags as one separated string with empty pieces, longer than max_len; (3) the largest
    values, out-of-vocabulary ids, empty tag lists; (4) median values, empty ids, tag lists
    longer than max_len holding "" and an integer."""
    cols: dict[str, RawColumn] = {}
    for f in schema.features:
        vocab = [str(v) for v in f.vocab or []] or ["x1", "x2", "x3"]
        ints = [int(v) for v in vocab if _is_decimal(v)]
        if f.kind == "numeric":
            _, k = _numeric_knots(f)
            mid = k[len(k) // 2]
            values: RawColumn = [mid, k[len(k) // 4], k[0], k[-1], mid]
        elif f.kind == "tags":
            assert f.max_len is not None
            long = [vocab[j % len(vocab)] for j in range(f.max_len + 2)]
            joined = (f.separator or "|").join(["", *long[:2], "", *long[2:]])
            values = [vocab[:1], vocab[-1:], joined, [], [long[0], "", 7, *long[1:]]]
        else:
            values = [vocab[0], vocab[-1], ints[0] if ints else vocab[-1], "never-seen-é", ""]
        if f.default is not None:
            values[0] = values[1] = None
        cols[f.name] = values
    return cols


def sample_rows(run_dir: Path, schema: FeatureSchema) -> dict[str, RawColumn] | None:
    """The run's kept validation rows as a caller would send them, or None if it kept none (or
    they lack a column the features read)."""
    path = Path(run_dir) / VALID_SAMPLE
    if not path.exists():
        return None
    table = pq.read_table(path)
    if not {f.column for f in schema.features} <= set(table.column_names):
        return None
    return {f.name: caller_values(f, table.column(f.column)) for f in schema.features}


def caller_values(f: FittedFeature, col: pa.Array | pa.ChunkedArray) -> RawColumn:
    """A data file's column as the JSON values a caller sends: numbers (null for missing),
    string or integer ids, tag lists or separated strings as stored."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    if pa.types.is_dictionary(col.type):
        col = col.dictionary_decode()
    if f.kind == "numeric":
        return [json_value(v) for v in numeric_values(col).tolist()]
    if f.kind == "tags" and (pa.types.is_list(col.type) or pa.types.is_large_list(col.type)):
        inner = col.type.value_type
        if not (_is_id_type(inner)):
            col = pc.cast(col, pa.list_(pa.string()))
        return col.to_pylist()
    if _is_id_type(col.type):
        return col.to_pylist()
    if pa.types.is_floating(col.type):  # integer ids stored as floats, NaN for missing
        return [None if v is None or v != v else int(v) for v in col.to_pylist()]
    return pc.cast(col, pa.string()).to_pylist()


def _is_id_type(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_integer(t)


def join_columns(
    schema: FeatureSchema, parts: Sequence[dict[str, RawColumn]]
) -> dict[str, RawColumn]:
    """Several sets of rows as one (empty sets skipped); a feature a set lacks is null (its
    default) there."""
    cols: dict[str, RawColumn] = {f.name: [] for f in schema.features}
    for part in filter(None, parts):
        n = len(next(iter(part.values())))
        for name, values in cols.items():
            values.extend(part.get(name, [None] * n))
    return cols


# ---------------------------------------------------------------------- the two sides


def to_onnx_inputs(schema: FeatureSchema, cols: dict[str, RawColumn]) -> dict[str, np.ndarray]:
    """Raw values -> the graph's inputs, by the contract's rules (as the service builds them)."""
    n = len(next(iter(cols.values())))
    return graph_inputs([feature_info(f) for f in schema.features], cols, n)


def by_feature_name(schema: FeatureSchema) -> FeatureSchema:
    """The schema reading each feature from a column named after it: served inputs are named by
    feature, and two features may come from one training column (e.g. an id and its count)."""
    return FeatureSchema(
        features=[f.model_copy(update={"column": f.name}) for f in schema.features]
    )


def to_arrow(schema: FeatureSchema, cols: dict[str, RawColumn]) -> pa.Table:
    """Raw values keyed by feature name -> a table for `by_feature_name(schema).encode`: what
    training would read from a file holding them (a feature not in `cols`: null). Integer ids
    and separated tag strings are converted by training's own functions, so they are not
    assumed to follow the contract."""
    n = len(next(iter(cols.values())))
    arrays = {}
    for f in schema.features:
        values = cols.get(f.name, [None] * n)
        if f.kind == "numeric":
            arrays[f.name] = pa.array(values, pa.float64())
        elif f.kind == "tags":
            arrays[f.name] = pa.array(_training_tags(f, values), pa.list_(pa.string()))
        else:
            arrays[f.name] = pa.array(_training_ids(values), pa.string())
    return pa.table(arrays)


def _training_ids(values: Sequence[Any]) -> list[str | None]:
    """String ids as they are, integer ids as training turns an integer column into strings."""
    out = list(values)
    ints = [j for j, v in enumerate(values) if isinstance(v, int)]
    if ints:
        text = categorical_strings(pa.array([values[j] for j in ints], pa.int64())).to_pylist()
        for j, t in zip(ints, text, strict=True):
            out[j] = t
    return out


def _training_tags(f: FittedFeature, values: Sequence[Any]) -> list[list[str | None] | None]:
    """Tag lists as they are (integer ids converted), separated strings split by training."""
    assert f.separator is not None and f.max_len is not None
    out: list[Any] = [None if v is None else _training_ids(v) for v in values]
    strings = [j for j, v in enumerate(values) if isinstance(v, str)]
    if strings:
        split = training_tag_tokens(
            pa.array([values[j] for j in strings], pa.string()), f.separator, f.max_len
        ).to_pylist()
        for j, tokens in zip(strings, split, strict=True):
            out[j] = tokens
    return out


def _encoded(schema: FeatureSchema, cols: dict[str, RawColumn]) -> Batch:
    return encode_table(to_arrow(schema, cols), by_feature_name(schema), [], with_labels=False)


def torch_outputs(
    model: RankingModel, schema: FeatureSchema, cols: dict[str, RawColumn]
) -> dict[str, np.ndarray]:
    with torch.no_grad():
        return predict(model, _encoded(schema, cols))


def float32_sensitivity(model: RankingModel, batch: Batch) -> dict[str, np.ndarray]:
    """Per output value: how far it moves, in units of its own relative change, when every
    weight, buffer and float input changes by a relative PERTURBATION of random sign (float64,
    the largest of PERTURBATION_DRAWS draws). Rounding in a float32 evaluation perturbs the
    computation the same way, by about FLOAT32_EPS per step; this says how much that moves
    each value, large where inputs are large or terms cancel."""
    exact = copy.deepcopy(model).double().eval()
    inputs = {k: v.double() if v.is_floating_point() else v for k, v in batch.inputs.items()}
    base = predict(exact, Batch(inputs, {}, {}))
    worst = {k: np.zeros_like(v) for k, v in base.items()}
    for draw in range(PERTURBATION_DRAWS):
        gen = torch.Generator().manual_seed(draw)

        def nudge(t: torch.Tensor, gen: torch.Generator = gen) -> torch.Tensor:
            sign = torch.randint(0, 2, t.shape, generator=gen, dtype=torch.float64) * 2 - 1
            return t * (1 + PERTURBATION * sign)

        moved = copy.deepcopy(exact)
        with torch.no_grad():
            for t in [*moved.parameters(), *moved.buffers()]:
                if t.is_floating_point():
                    t.copy_(nudge(t))
        moved_inputs = {k: nudge(v) if v.is_floating_point() else v for k, v in inputs.items()}
        out = predict(moved, Batch(moved_inputs, {}, {}))
        for k, v in out.items():
            worst[k] = np.maximum(worst[k], np.abs(v - base[k]) / PERTURBATION)
    return worst


# ---------------------------------------------------------------------------- the check


@dataclass
class Parity:
    """PyTorch's outputs for the rows, the difference allowed for each value, and how close
    onnxruntime came."""

    rows: int
    expected: dict[str, np.ndarray]
    allowed: dict[str, np.ndarray]
    max_abs_diff: float
    fraction_of_allowed: float  # the largest |difference| / allowed


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
) -> Parity:
    """Runs the rows through PyTorch and onnxruntime; ParityError if any value differs by more
    than allowed.

    The allowed difference of a value y (each row and output on its own):
        tolerance * max(1, |y|) + ROUNDING_ALLOWANCE * FLOAT32_EPS * s
    where s is y's float32 sensitivity (`float32_sensitivity`): how much y moves when the
    network's weights and inputs change by one relative rounding. The first term covers
    outputs computed alike (a probability from a small logit, to 1e-5); the second what float32
    cannot resolve for this row: large raw inputs (prices, counts in the millions) and sums that
    cancel make s large, so a regression output of 500 computed from inputs of 1e6 may differ
    by what float32 allows there, while a changed weight moves values by far more than rounding
    and is still refused.

    Every input is given one value per row; if the file declares context inputs, the rows are
    also scored as ranking requests (`as_requests`) with each context input given once, and
    held to the same rule."""
    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    expected, allowed = _reference(model, schema, cols, tolerance)
    got = dict(zip(names, session.run(names, to_onnx_inputs(schema, cols)), strict=True))
    worst, fraction = _check_within_allowed(expected, allowed, got, cols, "")
    meta = read_metadata(session.get_modelmeta().custom_metadata_map)
    context = [f.name for f in meta.features if f.context]
    if context:
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
                    f"onnxruntime fails on a request of {block.stop - block.start} rows with "
                    f"the context inputs given once: {err}"
                ) from None
            for name, value in zip(names, values, strict=True):
                parts[name].append(value)
        got = {k: np.concatenate(v) for k, v in parts.items()}
        want, limit = _reference(model, schema, requests, tolerance)
        where = " with the context inputs given once per request"
        w, f = _check_within_allowed(want, limit, got, requests, where)
        worst, fraction = max(worst, w), max(fraction, f)
    rows = len(next(iter(cols.values())))
    return Parity(rows, expected, allowed, worst, fraction)


def _reference(
    model: RankingModel, schema: FeatureSchema, cols: dict[str, RawColumn], tolerance: float
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """PyTorch's outputs for the rows, and the difference allowed for each value."""
    batch = _encoded(schema, cols)
    with torch.no_grad():
        expected = predict(model, batch)
    sensitivity = float32_sensitivity(model, batch)
    allowed = {
        name: tolerance * np.maximum(1.0, np.abs(want.astype(np.float64)))
        + ROUNDING_ALLOWANCE * FLOAT32_EPS * sensitivity[name]
        for name, want in expected.items()
    }
    return expected, allowed


def _check_within_allowed(
    expected: dict[str, np.ndarray],
    allowed: dict[str, np.ndarray],
    got: dict[str, np.ndarray],
    cols: dict[str, RawColumn],
    where: str,
) -> tuple[float, float]:
    """(largest |difference|, largest |difference| / allowed); ParityError past allowed."""
    worst = fraction = 0.0
    for name, want in expected.items():
        if name not in got:
            raise ParityError(f"the ONNX graph has no output {name!r}")
        want64 = want.astype(np.float64)
        diff = np.abs(got[name].astype(np.float64) - want64)
        if not np.isfinite(diff).all():
            raise ParityError(f"{name}: non-finite values in one of the two outputs")
        limit = allowed[name]
        worst = max(worst, float(diff.max(initial=0.0)))
        excess = diff / limit
        fraction = max(fraction, float(excess.max(initial=0.0)))
        if excess.max(initial=0.0) > 1.0:
            at = np.unravel_index(excess.argmax(), excess.shape)
            row = int(at[0])
            raw = {k: v[row] for k, v in cols.items()}  # as the caller's JSON would have it
            raise ParityError(
                f"{name} differs by {diff[at]:.3g} (allowed {limit[at]:.3g}) between PyTorch "
                f"({want64[at]:.7g}) and onnxruntime{where} ({got[name][at]:.7g}) at row "
                f"{row}: {raw}"
            )
    return worst, fraction


def check_monitoring(run: Run, onnx_bytes: bytes, cols: dict[str, RawColumn]) -> None:
    """The monitoring outputs on the parity rows: the graph counts each feature's values by
    outcome exactly as training's rule does (the reference rates are computed that way), and
    its gate-weight sums are PyTorch's. ParityError naming the output otherwise."""
    schema = run.schema
    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    names = [FEATURE_VALUES, *([GATE_WEIGHTS] if has_gates(run.model) else [])]
    got = dict(zip(names, session.run(names, to_onnx_inputs(schema, cols)), strict=True))
    table = to_arrow(schema, cols)
    for f, counts in zip(
        by_feature_name(schema).features, got[FEATURE_VALUES].tolist(), strict=True
    ):
        want = feature_outcomes(f, table.column(f.name))
        if counts != [want[k] for k in OUTCOMES]:
            raise ParityError(
                f"{FEATURE_VALUES} of {f.name}: the graph counts "
                f"{dict(zip(OUTCOMES, counts, strict=True))}, training's rule {want}"
            )
    if GATE_WEIGHTS in got:
        batch = encode_table(table, by_feature_name(schema), [], with_labels=False)
        with torch.no_grad():
            gates = run.model.eval()(batch.inputs, gates=True).gates
        want_sums = gates.sum(dim=1).double().numpy()
        # Sums of float32 probabilities over the rows: within float32 rounding of their size.
        allowed = 1e-5 * max(1.0, float(np.abs(want_sums).max()))
        worst = float(np.abs(got[GATE_WEIGHTS] - want_sums).max())
        if worst > allowed:
            raise ParityError(
                f"{GATE_WEIGHTS} differs from PyTorch by {worst:.3g} (> {allowed:.3g})"
            )


def golden_rows(cols: dict[str, RawColumn], parity: Parity, picks: Sequence[int]) -> GoldenRows:
    """The rows at `picks` as a caller sends them (`instances` form: every other row leaves out
    its null features, the others send null), with PyTorch's outputs and allowed differences."""
    rows = []
    for i, j in enumerate(picks):
        row = {k: v[j] for k, v in cols.items()}
        rows.append({k: v for k, v in row.items() if v is not None} if i % 2 else row)
    index = np.asarray(picks, dtype=np.intp)
    return GoldenRows(
        rows=rows,
        outputs={k: v[index].astype(np.float64).tolist() for k, v in parity.expected.items()},
        allowed={k: v[index].tolist() for k, v in parity.allowed.items()},
    )
