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


def fail_past_rows(src: Path, dst: Path, rows: int) -> str:
    """A copy of `src` whose first output ([batch]-shaped, a task's scores) fails in
    onnxruntime for a call of more than `rows` rows (zeros taken from a `rows`-long table are
    added to it), and is unchanged otherwise: a runtime error the file's warm-up and golden
    rows do not meet. Returns that output's name."""
    from onnx import helper

    model = onnx.load(str(src))
    graph = model.graph
    output = graph.output[0].name
    inner = f"{output}__before_fault"
    for node in graph.node:
        node.output[:] = [inner if o == output else o for o in node.output]
    graph.initializer.extend(
        [
            numpy_helper.from_array(np.zeros(rows, np.float32), "fault_table"),
            numpy_helper.from_array(np.array(0, np.int64), "fault_zero"),
            numpy_helper.from_array(np.array(1, np.int64), "fault_one"),
        ]
    )
    graph.node.extend(
        [
            helper.make_node("Shape", [inner], ["fault_shape"], start=0, end=1),
            helper.make_node("Squeeze", ["fault_shape"], ["fault_n"]),
            helper.make_node("Range", ["fault_zero", "fault_n", "fault_one"], ["fault_rows"]),
            helper.make_node("Gather", ["fault_table", "fault_rows"], ["fault_zeros"]),
            helper.make_node("Add", [inner, "fault_zeros"], [output]),
        ]
    )
    onnx.save(model, str(dst))
    return output


def slow_copy(src: Path, dst: Path, size: int = 600, rounds: int = 4) -> None:
    """A copy of `src` that scores exactly as it does, each call taking longer: `rounds`
    products of [size, size] matrices whose result is added to the first output times zero."""
    from onnx import helper

    model = onnx.load(str(src))
    graph = model.graph
    output = graph.output[0].name
    inner = f"{output}__before_slow"
    for node in graph.node:
        node.output[:] = [inner if o == output else o for o in node.output]
    rng = np.random.default_rng(0)
    square = rng.normal(size=(size, size)).astype(np.float32) / size
    graph.initializer.extend(
        [
            numpy_helper.from_array(square, "slow_square"),
            numpy_helper.from_array(np.array(0, np.float32), "slow_zero"),
        ]
    )
    # Tied to the call's own scores, so that it is computed at each call, not once at load.
    nodes = [
        helper.make_node("ReduceSum", [inner], ["slow_scores"], keepdims=0),
        helper.make_node("Mul", ["slow_scores", "slow_zero"], ["slow_tie"]),
        helper.make_node("Add", ["slow_square", "slow_tie"], ["slow_start"]),
    ]
    previous = "slow_start"
    for i in range(rounds):
        nodes.append(helper.make_node("MatMul", [previous, "slow_square"], [f"slow_{i}"]))
        previous = f"slow_{i}"
    nodes += [
        helper.make_node("ReduceSum", [previous], ["slow_sum"], keepdims=0),
        helper.make_node("Mul", ["slow_sum", "slow_zero"], ["slow_nothing"]),
        helper.make_node("Add", [inner, "slow_nothing"], [output]),
    ]
    graph.node.extend(nodes)
    onnx.save(model, str(dst))
