"""The large constant tensors of a model.onnx (embedding tables, layer weights), read once so that
several onnxruntime sessions of the file can use one copy (`SessionOptions.add_initializer`).

The service does not depend on the `onnx` package (tests/contract/test_layering.py), so the file
is parsed by protobuf with the few fields of onnx.proto read here, declared under their numbers
in that schema; protobuf skips every other field. A tensor is taken only when it is stored as it
is almost always written, `raw_data` in little-endian order of a plain numeric type: any other
stays with onnxruntime, which reads it from the file as it reads everything else.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

# onnx.proto: TensorProto.DataType values -> numpy dtypes (the plain numeric ones).
_DTYPES = {
    1: np.float32,
    2: np.uint8,
    3: np.int8,
    4: np.uint16,
    5: np.int16,
    6: np.int32,
    7: np.int64,
    9: np.bool_,
    10: np.float16,
    11: np.float64,
    12: np.uint32,
    13: np.uint64,
}
_EXTERNAL = 1  # TensorProto.DataLocation.EXTERNAL

_F = descriptor_pb2.FieldDescriptorProto
# (message, field, number in onnx.proto, type, repeated, message type)
_SCHEMA = [
    ("ModelProto", "graph", 7, _F.TYPE_MESSAGE, False, "GraphProto"),
    ("GraphProto", "initializer", 5, _F.TYPE_MESSAGE, True, "TensorProto"),
    ("TensorProto", "dims", 1, _F.TYPE_INT64, True, None),
    ("TensorProto", "data_type", 2, _F.TYPE_INT32, False, None),
    ("TensorProto", "segment", 3, _F.TYPE_BYTES, False, None),  # a message; only its presence
    ("TensorProto", "name", 8, _F.TYPE_BYTES, False, None),
    ("TensorProto", "raw_data", 9, _F.TYPE_BYTES, False, None),
    ("TensorProto", "data_location", 14, _F.TYPE_INT32, False, None),
]
_PACKAGE = "mmoe.onnx_initializers"


def _model_type() -> Any:
    file = descriptor_pb2.FileDescriptorProto(
        name="mmoe_onnx_initializers.proto", package=_PACKAGE, syntax="proto2"
    )
    messages: dict[str, Any] = {}
    for message, field, number, kind, repeated, type_name in _SCHEMA:
        if message not in messages:
            messages[message] = file.message_type.add(name=message)
        entry = messages[message].field.add(name=field, number=number, type=kind)
        entry.label = _F.LABEL_REPEATED if repeated else _F.LABEL_OPTIONAL
        if type_name is not None:
            entry.type_name = f".{_PACKAGE}.{type_name}"
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{_PACKAGE}.ModelProto"))


_Model = _model_type()


def large_initializers(path: Path, min_bytes: int) -> dict[str, np.ndarray]:
    """The file's constant tensors of at least `min_bytes` that are stored as raw numeric data,
    by name. Empty if the file is not a readable ONNX model: onnxruntime says why when it
    loads it."""
    model = _Model()
    try:
        model.ParseFromString(path.read_bytes())
    except Exception:  # protobuf's DecodeError, OSError: for onnxruntime to report
        return {}
    found: dict[str, np.ndarray] = {}
    for tensor in model.graph.initializer:
        dtype = _DTYPES.get(tensor.data_type)
        if (
            dtype is None
            or tensor.data_location == _EXTERNAL
            or tensor.HasField("segment")
            or not tensor.HasField("raw_data")
        ):
            continue
        shape = tuple(tensor.dims)
        size = math.prod(shape) * np.dtype(dtype).itemsize
        raw = tensor.raw_data  # a copy, which the array keeps
        if size < min_bytes or len(raw) != size:
            continue
        array = np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder("<")).reshape(shape)
        if sys.byteorder != "little":
            array = array.astype(array.dtype.newbyteorder("="))
        found[tensor.name.decode("utf-8", "replace")] = array
    return found
