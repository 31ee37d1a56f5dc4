"""The fitted feature schema: what training learned about each raw feature.

Fitted once on the training data (vocabularies, normalisation statistics), saved with the run,
applied in Python during training, and turned into ONNX nodes by `export/`. The index layout is the
contract both sides implement:

- categorical / tags with a vocabulary: 0 = missing (null or ""), 1 = out of vocabulary,
  2 + i = the i-th vocabulary entry. The vocabulary is fitted on the data, or fixed by the config
  (`vocab_list`; `num_buckets: N` is "0", "1", ..., "N-1", so integer id v -> 2 + v).
- categorical / tags with hash buckets: 0 = missing, 1 + murmur3_32(utf8, seed) % buckets.
- numeric with boundaries: searchsorted(boundaries, value, side="right"), in [0, len(boundaries)].
- numeric: value (null/NaN -> default), then log1p(max(value, 0)) or (value - mean) / std.
- tags: tokens (a list, or a string split on `separator`), empty tokens dropped, the first
  `max_len` kept, padded with "" (index 0) and pooled over the non-padding positions.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

import mmh3
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict

from mmoe.model.config import (
    CategoricalFeature,
    NumericFeature,
    RunConfig,
    TagsFeature,
    VocabConfig,
)

MISSING_INDEX = 0
OOV_INDEX = 1
VOCAB_OFFSET = 2
HASH_SEED = 0
QUANTILES = (0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99)
STATS_SAMPLE = 10_000  # values kept (uniformly at random) to estimate the quantiles


class NumericStats(BaseModel):
    """What training saw of a numeric feature's raw values (before any transform): export draws
    its parity rows from this. Quantiles are keyed "p1", "p10", ..., "p99" and estimated from a
    uniform sample of up to STATS_SAMPLE values; min and max are exact."""

    model_config = ConfigDict(extra="forbid")

    count: int  # finite values
    missing: int  # null or NaN
    min: float
    max: float
    quantiles: dict[str, float]


class FittedFeature(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    kind: Literal["categorical", "numeric", "tags"]
    column: str
    default: float | str | list[str] | None = None
    # Request context (the config's `context`): one value for all candidates of a request.
    # Absent in schemas fitted before the flag existed.
    context: bool = False
    # categorical / tags
    table: str | None = None
    vocab: list[str] | None = None
    hash_buckets: int | None = None
    embedding_dim: int | None = None
    # numeric
    transform: Literal["none", "log1p", "standard"] = "none"
    mean: float | None = None
    std: float | None = None
    boundaries: list[float] | None = None
    stats: NumericStats | None = None  # absent in runs trained before it was recorded
    # tags
    separator: str | None = None
    pooling: Literal["mean", "sum"] | None = None
    max_len: int | None = None

    @property
    def embedded(self) -> bool:
        """True when the network looks this feature up in an embedding table."""
        return self.kind != "numeric" or self.boundaries is not None

    @property
    def num_embeddings(self) -> int:
        if self.kind == "numeric":
            assert self.boundaries is not None
            return len(self.boundaries) + 1
        if self.hash_buckets is not None:
            return self.hash_buckets + 1
        assert self.vocab is not None
        return len(self.vocab) + VOCAB_OFFSET

    @property
    def required(self) -> bool:
        return self.default is None


class FeatureSchema(BaseModel):
    """All fitted features, in config order."""

    model_config = ConfigDict(extra="forbid")

    features: list[FittedFeature]

    def __getitem__(self, name: str) -> FittedFeature:
        for f in self.features:
            if f.name == name:
                return f
        raise KeyError(name)

    @property
    def tables(self) -> dict[str, tuple[int, int]]:
        """Embedding tables: name -> (num_embeddings, dim)."""
        out: dict[str, tuple[int, int]] = {}
        for f in self.features:
            if f.embedded:
                table = f.table or f.name
                out[table] = (f.num_embeddings, f.embedding_dim or 1)
        return out

    @property
    def context_features(self) -> list[str]:
        """Names of the features declared request context."""
        return [f.name for f in self.features if f.context]

    @property
    def dense_features(self) -> list[FittedFeature]:
        return [f for f in self.features if not f.embedded]

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.model_dump_json(indent=1))

    @classmethod
    def load(cls, path: str | Path) -> FeatureSchema:
        return cls.model_validate(json.loads(Path(path).read_text()))

    # ---------------------------------------------------------------- applying it (training side)

    def encode(self, batch: pa.Table | pa.RecordBatch) -> dict[str, np.ndarray]:
        """Raw columns -> network inputs: int64 indices ([B] or [B, max_len]) or float32 [B]."""
        out: dict[str, np.ndarray] = {}
        for f in self.features:
            col = batch.column(f.column)
            if f.kind == "categorical":
                null_as = f.default if isinstance(f.default, str) else ""
                out[f.name] = _encode_ids(f, categorical_strings(col, null_as))
            elif f.kind == "tags":
                out[f.name] = _encode_tags(f, col)
            else:
                out[f.name] = _encode_numeric(f, col)
        return out


# -------------------------------------------------------------------------------- raw values


def categorical_strings(col: pa.Array | pa.ChunkedArray, null_as: str = "") -> pa.Array:
    """Any id column -> strings, as the service sees them: ints as decimal, null as `null_as`."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    t = col.type
    if pa.types.is_floating(t):
        # Integer ids stored as floats (a column with NaN for missing ids, as pandas writes
        # them): 3.0 -> "3", NaN/null -> missing.
        values = col.to_numpy(zero_copy_only=False).astype(np.float64)
        missing = np.isnan(values)
        present = values[~missing]
        if not (np.isfinite(present) & (present == np.round(present))).all():
            raise ValueError("categorical column has non-integer float values")
        col = pa.array(np.where(missing, 0, values).astype(np.int64), mask=missing)
    elif pa.types.is_dictionary(t):
        col = col.dictionary_decode()
    if not pa.types.is_string(col.type) and not pa.types.is_large_string(col.type):
        col = pc.cast(col, pa.string())
    return pc.fill_null(col, null_as)


def tag_tokens(
    col: pa.Array | pa.ChunkedArray,
    separator: str,
    max_len: int,
    null_as: list[str] | None = None,
) -> pa.ListArray:
    """Tags column (list of ids or separated string) -> list<string>, empties dropped, truncated."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
        col = pc.split_pattern(pc.fill_null(col, separator.join(null_as or [])), separator)
    elif not (pa.types.is_list(col.type) or pa.types.is_large_list(col.type)):
        raise ValueError(f"tags column must be a string or a list, got {col.type}")
    else:
        col = pc.fill_null(col, pa.scalar(null_as or [], col.type))
    flat = categorical_strings(pc.list_flatten(col))
    parents = pc.list_parent_indices(col).to_numpy()
    keep = pc.not_equal(flat, "").to_numpy(zero_copy_only=False)
    flat = flat.filter(pa.array(keep))
    parents = parents[keep]
    offsets = np.zeros(len(col) + 1, dtype=np.int64)
    np.add.at(offsets, parents + 1, 1)
    offsets = np.cumsum(offsets)
    lists = pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), flat)
    return pc.list_slice(lists, 0, max_len)


def _hash_strings(values: pa.Array, buckets: int) -> np.ndarray:
    encoded = values.dictionary_encode()
    uniq = encoded.dictionary.to_pylist()
    codes = np.array(
        [0 if u == "" else 1 + mmh3.hash(u, HASH_SEED, signed=False) % buckets for u in uniq],
        dtype=np.int64,
    )
    return (
        codes[encoded.indices.to_numpy(zero_copy_only=False)]
        if len(uniq)
        else np.zeros(len(values), dtype=np.int64)
    )


def _encode_ids(f: FittedFeature, values: pa.Array) -> np.ndarray:
    if f.hash_buckets is not None:
        return _hash_strings(values, f.hash_buckets)
    assert f.vocab is not None
    idx = pc.index_in(values, value_set=pa.array(f.vocab, pa.string()))
    out = pc.fill_null(pc.add(idx, VOCAB_OFFSET), OOV_INDEX).to_numpy(zero_copy_only=False)
    out = out.astype(np.int64)
    out[pc.equal(values, "").to_numpy(zero_copy_only=False)] = MISSING_INDEX
    return out


def _encode_tags(f: FittedFeature, col: pa.Array | pa.ChunkedArray) -> np.ndarray:
    assert f.separator is not None and f.max_len is not None
    null_as = f.default if isinstance(f.default, list) else None
    lists = tag_tokens(col, f.separator, f.max_len, null_as)
    flat_idx = _encode_ids(f, pc.list_flatten(lists))
    out = np.zeros((len(lists), f.max_len), dtype=np.int64)
    offsets = lists.offsets.to_numpy()
    lengths = np.diff(offsets)
    rows = np.repeat(np.arange(len(lists)), lengths)
    cols = np.arange(len(flat_idx)) - np.repeat(offsets[:-1] - offsets[0], lengths)
    out[rows, cols] = flat_idx
    return out


def numeric_values(col: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Numeric column -> float64 with NaN for missing."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    return pc.cast(col, pa.float64()).to_numpy(zero_copy_only=False).astype(np.float64)


def _encode_numeric(f: FittedFeature, col: pa.Array | pa.ChunkedArray) -> np.ndarray:
    x = numeric_values(col)
    missing = np.isnan(x)
    if missing.any():
        if f.default is None:
            raise ValueError(
                f"feature {f.name!r} has missing values; give it a `default` in the config"
            )
        x = np.where(missing, float(f.default), x)  # type: ignore[arg-type]
    x32 = x.astype(np.float32)
    if f.boundaries is not None:
        # Compare in float32, as the ONNX graph does.
        b = np.asarray(f.boundaries, dtype=np.float32)
        return np.searchsorted(b, x32, side="right").astype(np.int64)
    if f.transform == "log1p":
        return np.log1p(np.maximum(x32, np.float32(0))).astype(np.float32)
    if f.transform == "standard":
        assert f.mean is not None and f.std is not None
        return ((x32 - np.float32(f.mean)) / np.float32(f.std)).astype(np.float32)
    return x32


# ----------------------------------------------------------------------------------- fitting


class SchemaFitter:
    """Accumulates statistics over record batches, then builds a FeatureSchema."""

    def __init__(self, config: RunConfig) -> None:
        self.config = config
        self.features = config.input_features
        self._counts: dict[str, Counter[str]] = {}  # by embedding table
        self._sum: dict[str, float] = {}
        self._sumsq: dict[str, float] = {}
        self._n: dict[str, int] = {}
        self._summaries = {
            f.name: _NumericSummary(seed=i)
            for i, f in enumerate(self.features)
            if isinstance(f, NumericFeature)
        }

    def update(self, batch: pa.Table | pa.RecordBatch) -> None:
        for f in self.features:
            col = batch.column(f.column or f.name)
            if isinstance(f, NumericFeature):
                x = numeric_values(col)
                self._summaries[f.name].update(x)
                if f.transform == "standard":
                    if f.default is not None:
                        x = np.where(np.isnan(x), f.default, x)
                    x = x[~np.isnan(x)]
                    self._sum[f.name] = self._sum.get(f.name, 0.0) + float(x.sum())
                    self._sumsq[f.name] = self._sumsq.get(f.name, 0.0) + float((x * x).sum())
                    self._n[f.name] = self._n.get(f.name, 0) + len(x)
                continue
            if f.uses_hashing or f.fixed_vocab is not None:
                continue
            if isinstance(f, TagsFeature):
                tokens = tag_tokens(col, f.separator, f.max_len, f.default)
                values = pc.list_flatten(tokens)
            else:
                values = categorical_strings(col, f.default or "")
            vc = pc.value_counts(values)
            counter = self._counts.setdefault(f.embedding_name or f.name, Counter())
            for v, c in zip(
                vc.field("values").to_pylist(), vc.field("counts").to_pylist(), strict=True
            ):
                if v != "":
                    counter[v] += c

    def fit(self, batches: Iterable[pa.RecordBatch]) -> FeatureSchema:
        for b in batches:
            self.update(b)
        return self.build()

    def _vocab(self, table: str, cfg: VocabConfig) -> list[str]:
        """Ids seen at least `min_count` times (over every feature sharing the table), most
        frequent first, ties by id, at most `max_size`."""
        counter = self._counts.get(table, Counter())
        items = sorted(
            ((v, c) for v, c in counter.items() if c >= cfg.min_count),
            key=lambda vc: (-vc[1], vc[0]),
        )
        return [v for v, _ in items[: cfg.max_size]]

    def build(self) -> FeatureSchema:
        fitted = []
        for f in self.features:
            column = f.column or f.name
            if isinstance(f, NumericFeature):
                mean = std = None
                if f.transform == "standard":
                    n = self._n.get(f.name, 0)
                    if n == 0:
                        raise ValueError(f"feature {f.name!r}: no values to fit `standard` on")
                    mean = self._sum[f.name] / n
                    var = max(self._sumsq[f.name] / n - mean * mean, 0.0)
                    std = float(np.sqrt(var)) or 1.0
                fitted.append(
                    FittedFeature(
                        name=f.name,
                        kind="numeric",
                        column=column,
                        default=f.default,
                        context=f.context,
                        transform=f.transform,
                        mean=mean,
                        std=std,
                        boundaries=f.boundaries,
                        embedding_dim=f.embedding_dim if f.boundaries is not None else None,
                        stats=self._summaries[f.name].stats(),
                    )
                )
                continue
            table = f.embedding_name or f.name
            vocab = f.fixed_vocab
            if vocab is None and not f.uses_hashing:
                vocab = self._vocab(table, f.vocab_config)
            extra = {}
            if isinstance(f, TagsFeature):
                extra = {"separator": f.separator, "pooling": f.pooling, "max_len": f.max_len}
            assert isinstance(f, CategoricalFeature | TagsFeature)
            fitted.append(
                FittedFeature(
                    name=f.name,
                    kind=f.kind,
                    column=column,
                    default=f.default,
                    context=f.context,
                    table=table,
                    vocab=vocab,
                    hash_buckets=f.hash_buckets,
                    embedding_dim=f.embedding_dim,
                    **extra,
                )
            )
        return FeatureSchema(features=fitted)


class _NumericSummary:
    """Streaming NumericStats: exact count, missing, min and max, and a uniform sample of the
    values (each value gets a random key; the STATS_SAMPLE smallest keys are kept)."""

    def __init__(self, seed: int) -> None:
        self._rng = np.random.default_rng(seed)
        self.count = self.missing = 0
        self.min, self.max = math.inf, -math.inf
        self._values = np.zeros(0)
        self._keys = np.zeros(0)

    def update(self, x: np.ndarray) -> None:
        finite = np.isfinite(x)
        self.missing += int(np.isnan(x).sum())
        x = x[finite]
        if not len(x):
            return
        self.count += len(x)
        self.min, self.max = min(self.min, float(x.min())), max(self.max, float(x.max()))
        values = np.concatenate([self._values, x])
        keys = np.concatenate([self._keys, self._rng.random(len(x))])
        if len(values) > STATS_SAMPLE:
            keep = np.argpartition(keys, STATS_SAMPLE)[:STATS_SAMPLE]
            values, keys = values[keep], keys[keep]
        self._values, self._keys = values, keys

    def stats(self) -> NumericStats | None:
        if not self.count:
            return None
        q = np.quantile(self._values, QUANTILES)
        keys = [f"p{round(level * 100)}" for level in QUANTILES]
        return NumericStats(
            count=self.count,
            missing=self.missing,
            min=self.min,
            max=self.max,
            quantiles={k: float(v) for k, v in zip(keys, q, strict=True)},
        )
