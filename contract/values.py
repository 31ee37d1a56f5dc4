"""Raw feature values -> the graph's input arrays: the one implementation of the rules.

Everything that feeds a model.onnx builds its arrays here: the service's request decoder, its
warm-up and load-time golden-row check, export's parity check and golden rows, the benchmarks.
The rules, for one feature described by its FeatureInfo (training applies the same ones to data
files: `model/schema.py`):

- null (None) means "use the feature's default"; a feature without a default is required.
- categorical: a string, or an integer (scored as its decimal string) -> string [N].
- numeric: a number -> float32 [N]; null -> NaN, which the graph replaces by the default. A
  value outside the float32 range is refused.
- tags: a list of ids (strings or integers) or one string split on the feature's separator;
  empty tokens are dropped, the first max_len kept, the row padded with "" -> string
  [N, max_len].

Values must already have these JSON types (the service's typed decoder guarantees it; other
callers build them so). A value that breaks a rule raises InvalidValue with its row, and each
caller names the field its own way (`candidates.price[3]`, `instances[3].price`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from itertools import chain
from typing import Any

import numpy as np

from mmoe.contract.metadata import FeatureInfo

_STR = {str}
_STR_OR_INT = {str, int}
_STR_OR_NONE = {str, type(None)}
_LIST = {list}
DEFAULT_SEPARATOR = "|"


class InvalidValue(ValueError):
    """A raw value that breaks a rule; `row` is its index in the values given (None for a
    single value)."""

    def __init__(self, reason: str, row: int | None = None) -> None:
        super().__init__(reason if row is None else f"row {row}: {reason}")
        self.reason = reason
        self.row = row


def _required_null(f: FeatureInfo, row: int | None) -> InvalidValue:
    return InvalidValue(f"null is not allowed: {f.name} has no default and is required", row)


def column_input(f: FeatureInfo, values: Sequence[Any]) -> np.ndarray:
    """One feature's values for N rows -> its graph input ([N] or [N, max_len])."""
    if f.kind == "numeric":
        return _numeric(f, values)
    if f.kind == "tags":
        return _tags(f, values)
    types = set(map(type, values))
    if types <= _STR:  # the common case, checked in C: no per-item Python
        return np.array(values, dtype=object)
    if types <= _STR_OR_INT:  # integer ids score as their decimal strings, converted in C
        return np.array(list(map(str, values)), dtype=object)
    default = f.default
    if types <= _STR_OR_NONE and default is not None:  # strings and nulls: the nulls in bulk
        out = np.array(values, dtype=object)
        out[out == None] = str(default)  # noqa: E711 (elementwise, not identity)
        return out
    return np.array(
        [v if v.__class__ is str else _id_string(v, default, f, j) for j, v in enumerate(values)],
        dtype=object,
    )


def broadcast_input(f: FeatureInfo, value: Any, n: int) -> np.ndarray:
    """One value (null: the default) for all N rows."""
    if f.kind == "numeric":
        return np.repeat(_numeric(f, [value], single=True), n)
    if f.kind == "tags":
        assert f.max_len is not None
        row = filled((1, f.max_len), "")
        tokens = tag_tokens(f, value)
        row[0, : len(tokens)] = tokens
        return np.repeat(row, n, axis=0)
    if value is None and f.default is None:
        raise _required_null(f, None)
    return filled(n, str(f.default if value is None else value))


def graph_inputs(
    features: Sequence[FeatureInfo], columns: Mapping[str, Sequence[Any]], n: int
) -> dict[str, np.ndarray]:
    """Every graph input for N rows of raw columns keyed by feature name; a feature not in
    `columns` takes its default in every row (InvalidValue if it has none)."""
    feeds: dict[str, np.ndarray] = {}
    for f in features:
        values = columns.get(f.name)
        if values is None:
            feeds[f.name] = broadcast_input(f, None, n)
        elif len(values) != n:
            raise ValueError(f"{f.name}: {len(values)} values for {n} rows")
        else:
            feeds[f.name] = column_input(f, values)
    return feeds


def one_context_batch(
    context: Sequence[str], feeds: dict[str, np.ndarray], n: int
) -> dict[str, np.ndarray]:
    """`feeds` for N rows as the graph takes them: the inputs named in `context` (the features
    declared request context) all at batch 1, computed once for the request, or all at batch N.
    A request may give some context features once and others per candidate (a per-item value of
    a feature declared context); then the ones given once are repeated to the N rows, which
    scores as the flat request does. `feeds` itself is not changed."""
    once = [name for name in context if len(feeds[name]) == 1]
    if n == 1 or len(once) in (0, len(context)):
        return feeds
    return {**feeds, **{name: np.repeat(feeds[name], n, axis=0) for name in once}}


def _id_string(v: Any, default: Any, f: FeatureInfo, j: int) -> str:
    if v is None:
        if default is None:
            raise _required_null(f, j)
        return str(default)
    return str(v)  # an int (the decoder admits nothing else); bool is refused by its type


def _numeric(f: FeatureInfo, values: Sequence[Any], single: bool = False) -> np.ndarray:
    arr = np.array(values, dtype=np.float64)  # None -> NaN; the graph maps NaN to the default
    if f.default is None:
        nan = np.isnan(arr)
        if nan.any():
            raise _required_null(f, None if single else int(nan.argmax()))
    with np.errstate(over="ignore"):  # overflow is reported below, as the error it is
        out = arr.astype(np.float32)
    inf = np.isinf(out)
    if inf.any():
        j = int(inf.argmax())
        raise InvalidValue(f"{values[j]!r} is outside the float32 range", None if single else j)
    return out


def tag_tokens(f: FeatureInfo, value: Any, row: int | None = None) -> list[str]:
    """Tags of one row: a list of ids or one string split on the separator; empty tokens
    dropped, the first max_len kept."""
    if value is None:
        if f.default is None:
            raise _required_null(f, row)
        value = f.default
    if value.__class__ is str:
        value = value.split(f.separator or DEFAULT_SEPARATOR)
    return [t if t.__class__ is str else str(t) for t in value if t != ""][: f.max_len]


def _tags(f: FeatureInfo, values: Sequence[Any]) -> np.ndarray:
    """The rule of tag_tokens for N rows, in bulk: rows that are lists are flattened into one
    array, empty tokens dropped and the first max_len of each row placed with one assignment."""
    assert f.max_len is not None
    n = len(values)
    rows = values
    if not set(map(type, values)) <= _LIST:  # nulls or separated strings: those rows by the rule
        rows = [v if v.__class__ is list else tag_tokens(f, v, j) for j, v in enumerate(values)]
    lengths = np.fromiter(map(len, rows), dtype=np.intp, count=n)
    flat = np.fromiter(chain.from_iterable(rows), dtype=object, count=int(lengths.sum()))
    if not set(map(type, flat)) <= _STR:  # ids given as integers
        flat = np.array([t if t.__class__ is str else str(t) for t in flat], dtype=object)
    keep = flat != ""
    row = np.repeat(np.arange(n), lengths)[keep]
    tokens = flat[keep]
    starts = np.zeros(n, dtype=np.intp)
    np.cumsum(np.bincount(row, minlength=n)[:-1], out=starts[1:])
    pos = np.arange(len(tokens)) - starts[row]
    first = pos < f.max_len
    out = filled((n, f.max_len), "")
    out[row[first], pos[first]] = tokens[first]
    return out


def filled(shape: int | tuple[int, ...], value: str) -> np.ndarray:
    """An object array holding `value` everywhere: the same str object in every cell, where
    np.full would build a new one per cell (20x slower for 256 rows)."""
    out = np.empty(shape, dtype=object)
    out.fill(value)
    return out


def json_value(value: Any) -> Any:
    """A value read from a data file as a caller sends it in JSON: a missing number (NaN, which
    JSON cannot hold) becomes null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
