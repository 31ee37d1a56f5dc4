"""Model files changed after export, for tests of what notices."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper


def edit_weights(src: Path, dst: Path, factor: float = 1.1) -> str:
    """A copy of `src` whose largest float initializer (a weight matrix or an embedding table of
    the network) is scaled by `factor`, its metadata untouched; returns the initializer's name."""
    model = onnx.load(str(src))
    floats = [i for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT]
    target = max(floats, key=lambda i: int(np.prod(i.dims)))
    edited = numpy_helper.to_array(target) * np.float32(factor)
    target.CopyFrom(numpy_helper.from_array(edited.astype(np.float32), target.name))
    onnx.save(model, str(dst))
    return target.name
