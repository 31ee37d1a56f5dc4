"""The KServe V2 inference protocol apart from its transport: which model a call names, its
metadata, and input tensors -> the graph's feeds. HTTP (routes/kserve.py: JSON and binary
tensors) and gRPC (grpc_v2.py: typed contents and raw_input_contents) both go through it, so
they accept and refuse the same tensors, with the same field and reason.

Inputs are named after the raw features (BYTES for ids and tags, FP32 for numbers; tags are
[N, max_len], empty strings being padding). An input the model declares request context (model
metadata: `parameters.context`) may be sent once, [1] ([1, max_len] for tags), or with N rows,
each context input on its own.
Errors are ApiErrors; each transport renders them.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from mmoe.contract.metadata import FeatureInfo
from mmoe.contract.values import one_context_batch
from mmoe.service.errors import PayloadError
from mmoe.service.payload import (
    MAX_ID_CHARS,
    Decoded,
    ItemFields,
    column_array,
    default_array,
)
from mmoe.service.registry import LoadedModel

SERVER_NAME = "mmoe-ranking"
SERVER_VERSION = "1"
PLATFORM = "onnxruntime_onnx"
NUMERIC_TYPES = {
    "FP16": "<f2",
    "FP32": "<f4",
    "FP64": "<f8",
    "INT8": "i1",
    "INT16": "<i2",
    "INT32": "<i4",
    "INT64": "<i8",
    "UINT8": "u1",
    "UINT16": "<u2",
    "UINT32": "<u4",
    "UINT64": "<u8",
}
_LENGTH = struct.Struct("<I")  # the length before each element of a BYTES tensor's raw data
_TEXT_RULE = f"BYTES values must be UTF-8 strings of at most {MAX_ID_CHARS} chars"


def first_value(arr: np.ndarray) -> str | None:
    """A tensor's first value as text (a routing key), or None if it has none."""
    flat = arr.reshape(-1)
    if not len(flat):
        return None
    value = flat[0]
    return str(int(value)) if isinstance(value, np.integer) else str(value)


def shadow_feeds(
    primary: LoadedModel, ours: dict[str, np.ndarray], given: dict[str, np.ndarray], max_rows: int
) -> Callable[[LoadedModel], dict[str, np.ndarray]]:
    """The shadow's feeds (shadow.FeedsFor): the call's own (`ours`), where the shadow takes
    the same features; else the call's tensors (`given`) made into its feeds."""

    def feeds_for(shadow: LoadedModel) -> dict[str, np.ndarray]:
        if shadow.decoder.features == primary.decoder.features:
            return ours
        theirs = {f.name: f for f in shadow.predictor.meta.features}
        return feeds(theirs, {k: v for k, v in given.items() if k in theirs}, max_rows).feeds

    return feeds_for


def _input_meta(f: FeatureInfo) -> dict[str, Any]:
    shape = [-1, f.max_len] if f.kind == "tags" else [-1]
    out: dict[str, Any] = {
        "name": f.name,
        "datatype": "FP32" if f.kind == "numeric" else "BYTES",
        "shape": shape,
    }
    if f.context:  # batch 1 (once per request) or N
        out["parameters"] = {"context": True}
    return out


def model_metadata(model: LoadedModel, versions: list[str]) -> dict[str, Any]:
    """The V2 model metadata: name, the versions loaded, platform, and this version's inputs
    and outputs with shapes."""
    outputs = [
        {"name": o.name, "datatype": "FP32", "shape": [-1, *o.shape[1:]]}
        for o in model.predictor.session.get_outputs()
        if o.name in model.predictor.outputs  # not the monitoring ones: they are no scores
    ]
    return {
        "name": model.name,
        "versions": versions,
        "platform": PLATFORM,
        "inputs": [_input_meta(f) for f in model.predictor.meta.features],
        "outputs": outputs,
    }


def output_names(model: LoadedModel, names: Sequence[str]) -> list[str]:
    """The outputs a call asks for, checked against the model's; all of them when none."""
    available = model.predictor.outputs
    for name in names:
        if name not in available:
            raise PayloadError(f"outputs[{name}]", f"unknown output; the model has {available}")
    return list(names) if names else list(available)


def input_field(features: dict[str, FeatureInfo], name: str, given: dict[str, Any]) -> str:
    """The field that errors about input `name` name, once the model is known to take it and
    the call has not given it already."""
    field = f"inputs[{name}]"
    if name not in features:
        raise PayloadError(field, f"unknown input; the model takes {sorted(features)}")
    if name in given:
        raise PayloadError(field, "given twice")
    return field


def tensor_array(
    field: str,
    datatype: str,
    shape: Sequence[int],
    *,
    raw: bytes | memoryview | None = None,
    values: Any = None,
) -> np.ndarray:
    """One input tensor -> numpy in `shape` (an object array of str for BYTES), from its raw
    bytes (HTTP binary data, gRPC raw_input_contents: little-endian numbers, or each BYTES
    element after its 4-byte length) or from its values (JSON data, gRPC typed contents)."""
    shape = list(shape)
    if any(d < 0 for d in shape):
        raise PayloadError(field, f"shape {shape} has a negative dimension")
    if len(shape) > 2:
        raise PayloadError(field, f"shape {shape}: inputs are [batch] or [batch, k]")
    if datatype not in NUMERIC_TYPES and datatype != "BYTES":
        raise PayloadError(field, f"unsupported datatype {datatype}")
    count = math.prod(shape)  # exact: np.prod would wrap around on huge dimensions
    if raw is not None:
        arr = _from_raw(field, datatype, memoryview(raw), count)
    else:
        try:
            arr = np.array(values, dtype=object if datatype == "BYTES" else None)
        except ValueError:  # ragged nested lists
            raise PayloadError(field, "data is not a flat list of values") from None
    if arr.size != count:
        raise PayloadError(field, f"{arr.size} values do not fill shape {shape}")
    try:
        arr = arr.reshape(shape)
    except (ValueError, OverflowError):  # an empty array "shaped" [0, 2**62]
        raise PayloadError(field, f"shape {shape} is not a usable shape") from None
    if datatype == "BYTES":
        return _texts(field, arr)
    if arr.dtype.kind not in "iuf":
        raise PayloadError(field, f"values are not {datatype} numbers")
    return arr


def _from_raw(field: str, datatype: str, raw: memoryview, count: int) -> np.ndarray:
    if datatype != "BYTES":
        dt = np.dtype(NUMERIC_TYPES[datatype])
        if len(raw) != count * dt.itemsize:
            raise PayloadError(field, f"{len(raw)} bytes do not hold {count} {datatype} values")
        return np.frombuffer(raw, dtype=dt)
    data = bytes(raw)  # slicing bytes is faster than slicing a memoryview
    values: list[str] = []
    append = values.append
    unpack = _LENGTH.unpack_from
    pos, end = 0, len(data)
    try:
        while pos < end:
            (length,) = unpack(data, pos)
            if length > MAX_ID_CHARS:
                raise PayloadError(field, f"{_TEXT_RULE}: a value {length} long")
            pos += 4
            append(data[pos : pos + length].decode("utf-8"))
            pos += length
    except struct.error:  # fewer than 4 bytes left for a length
        raise PayloadError(field, "truncated BYTES element") from None
    except UnicodeDecodeError as err:
        raise PayloadError(field, f"{_TEXT_RULE}: {err}") from None
    if pos > end:  # the last element's length runs past the data
        raise PayloadError(field, "truncated BYTES element")
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


def _texts(field: str, arr: np.ndarray) -> np.ndarray:
    """A BYTES tensor's elements as str: UTF-8 bytes decoded, integers as their decimal
    string (as /predict scores integer ids), anything else refused."""
    flat = arr.reshape(-1)
    if set(map(type, flat)) <= {str}:  # raw data is decoded already; JSON strings too
        longest = max(map(len, flat), default=0)
        if longest > MAX_ID_CHARS:
            raise PayloadError(field, f"{_TEXT_RULE}: a value {longest} long")
        return arr
    try:
        return np.vectorize(_as_text, otypes=[object])(arr) if arr.size else arr.astype(object)
    except (ValueError, TypeError) as err:  # UnicodeDecodeError is a ValueError
        raise PayloadError(field, f"{_TEXT_RULE}: {err}") from None


def _as_text(v: Any) -> str:
    if isinstance(v, bytes | str) and len(v) > MAX_ID_CHARS:
        raise ValueError(f"a value {len(v)} long")
    if isinstance(v, bytes):
        return v.decode("utf-8")
    if isinstance(v, str):
        return v
    if isinstance(v, int) and not isinstance(v, bool):
        return str(v)
    raise TypeError(f"{v!r} is not a string")


def _packed_tags(f: FeatureInfo, arr: np.ndarray) -> np.ndarray | None:
    """A [batch, k] tags tensor that is the graph's input already, up to width: str tokens with
    "" only after each row's last token (as V2 clients pad), so that the rule (drop empty
    tokens, keep the first max_len) changes nothing but the width. None otherwise."""
    assert f.max_len is not None
    if arr.dtype != object or not set(map(type, arr.reshape(-1))) <= {str}:
        return None
    tokens = arr != ""
    if (tokens[:, 1:] & ~tokens[:, :-1]).any():  # a token after an empty one
        return None
    out = np.empty((arr.shape[0], f.max_len), dtype=object)
    width = min(arr.shape[1], f.max_len)
    out[:, :width] = arr[:, :width]
    out[:, width:] = ""
    return out


def feeds(
    features: dict[str, FeatureInfo],
    given: dict[str, np.ndarray],
    max_rows: int,
    items: ItemFields | None = None,
) -> Decoded:
    """The graph's feeds from the input tensors a call gave (by name): one batch size for all,
    within `max_rows` (413), each tensor the shape and kind its feature takes; features left
    out take their default, or, with `items` and the key given, the item source's values
    (Decoded.fill)."""
    if not given:
        raise PayloadError("inputs", "no inputs given")
    n = _batch_size(given, {name for name, f in features.items() if f.context})
    if n == 0:
        raise PayloadError("inputs", "empty batch")
    if n > max_rows:
        raise PayloadError(
            "inputs", f"{n} rows is more than the limit of {max_rows}", 413, "too_many_rows"
        )
    out: dict[str, np.ndarray] = {}
    held = items.features if items is not None and items.key in given else frozenset()
    fill: dict[str, np.ndarray | None] = {}
    for name, f in features.items():
        field = f"inputs[{name}]"
        if name not in given:
            if name in held:
                fill[name] = None
            else:
                out[name] = default_array(f, 1 if f.context else n, field)
            continue
        arr = given[name]
        if f.kind != "numeric" and arr.dtype.kind == "f":  # 1.0 would be scored as id "1.0"
            raise PayloadError(field, "ids are BYTES or integers, not floating point")
        if f.kind == "tags":
            if arr.ndim != 2:
                raise PayloadError(
                    field,
                    f"tags are [batch, tokens] (max {f.max_len}); got shape {list(arr.shape)}",
                )
            packed = _packed_tags(f, arr)
            out[name] = (
                column_array(f, [list(row) for row in arr], field) if packed is None else packed
            )
            continue
        if arr.ndim == 2 and arr.shape[1] == 1:
            arr = arr[:, 0]
        if arr.ndim != 1:
            raise PayloadError(
                field, f"expected shape [batch] or [batch, 1]; got {list(arr.shape)}"
            )
        if f.kind == "numeric" and arr.dtype == object:
            raise PayloadError(field, "numeric feature needs a numeric datatype (FP32)")
        # A NaN number is a missing value, as null is in /predict: the default, or an error.
        values = arr.astype(np.float64) if f.kind == "numeric" else arr
        out[name] = column_array(f, values.tolist(), field)
    context = [name for name, f in features.items() if f.context]
    ids = out[items.key] if fill and items is not None else None
    return Decoded(n, one_context_batch(context, out, n), [], ids, fill)


def _batch_size(given: dict[str, np.ndarray], context: set[str]) -> int:
    """The call's row count: that of its per-row inputs, which must agree; a context input has
    1 row or that many (only context inputs given: their row count)."""
    sizes = {k: v.shape[0] if v.ndim else 1 for k, v in given.items()}
    per_row = {k: size for k, size in sizes.items() if k not in context}
    if per_row:
        first, n = next(iter(per_row.items()))
    else:  # only context inputs
        first, n = "", max(sizes.values())
    for k, size in per_row.items():
        if size != n:
            hint = ""
            if size == 1:
                hint = f"; only context inputs ({sorted(context) or 'none here'}) may have one row"
            raise PayloadError(
                f"inputs[{k}]", f"batch size {size} differs from inputs[{first}]'s {n}{hint}"
            )
    for k in sorted(context & sizes.keys()):
        if sizes[k] not in (1, n):
            raise PayloadError(
                f"inputs[{k}]",
                f"a context input has batch size 1 (once per request) or {n} (the other "
                f"inputs'); got {sizes[k]}",
            )
    return n
