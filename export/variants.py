"""Variants of an exported file beside it (`mmoe export --optimize/--int8/--fp16`): an
onnxruntime-optimized graph (.opt.onnx), a dynamically quantized one (.int8.onnx) and a float16
one for CUDA (.fp16.onnx).

Each is measured against the plain file on the parity rows (`measure_variant`: its largest
score drift and its speed), and its golden rows allow that drift: a server loads the variant, and
still refuses one edited beyond it.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from mmoe.contract.outputs import is_score
from mmoe.export.files import write_atomic
from mmoe.export.metadata import file_metadata, write_metadata
from mmoe.export.parity import RawColumn, to_onnx_inputs
from mmoe.model.schema import FeatureSchema


def variant_path(path: Path, tag: str) -> Path:
    return path.with_name(f"{path.stem}.{tag}{path.suffix}")


def optimized(path: Path, schema: FeatureSchema, cols: dict[str, RawColumn]) -> dict[str, float]:
    """onnxruntime's extended graph optimisations, saved (.opt.onnx)."""
    target = variant_path(path, "opt")
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    so.optimized_model_filepath = str(target)
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return measure_variant(path, target, schema, cols)


def quantized(path: Path, schema: FeatureSchema, cols: dict[str, RawColumn]) -> dict[str, float]:
    """Dynamic int8 quantisation of the MatMul and Gemm weights (.int8.onnx)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    target = variant_path(path, "int8")
    root = logging.getLogger()
    root.addFilter(_skip_pre_process_advice)
    try:
        quantize_dynamic(
            path, target, weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"]
        )
    finally:
        root.removeFilter(_skip_pre_process_advice)
    return measure_variant(path, target, schema, cols)


PRE_PROCESS_ADVICE = "Please consider to run pre-processing before quantization"


def _skip_pre_process_advice(record: logging.LogRecord) -> bool:
    """Drops onnxruntime's advice to run `quant_pre_process` before quantizing (logged on the
    root logger), which does not fit these graphs: its symbolic shape inference stops at the
    LabelEncoder and MurmurHash3 nodes, and without that step its graph optimisation lets the
    quantizer take the experts' batched weights too, for about 8x the score drift (9e-3 against
    1e-3 on the demo) and no speed gain. quantize_dynamic runs ONNX shape inference itself."""
    return PRE_PROCESS_ADVICE not in record.getMessage()


def float16(path: Path, schema: FeatureSchema, cols: dict[str, RawColumn]) -> dict[str, float]:
    """The network in float16, the preprocessing and the graph's inputs and outputs as they
    were (.fp16.onnx)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    target = variant_path(path, "fp16")
    model = onnx.load(path)
    keep = [
        "LabelEncoder",
        "MurmurHash3",
        "IsNaN",
        "Where",
        "GreaterOrEqual",
        "ReduceSum",
        "Log",
        "Max",
        "Mod",
    ]
    half = convert_float_to_float16(model, keep_io_types=True, op_block_list=keep)
    write_atomic(target, half.SerializeToString())
    return measure_variant(path, target, schema, cols)


def measure_variant(
    base: Path, variant: Path, schema: FeatureSchema, cols: dict[str, RawColumn]
) -> dict[str, float]:
    """The variant's largest score drift from the base file on the rows `cols`, the speed ratio
    (base time / variant time) and its size; its golden rows are widened by that drift
    (`allow_drift`)."""
    feeds = to_onnx_inputs(schema, cols)
    results = {}
    for p in (base, variant):
        s = ort.InferenceSession(str(p), providers=["CPUExecutionProvider"])
        names = [o.name for o in s.get_outputs()]
        s.run(names, feeds)
        t = time.perf_counter()
        for _ in range(10):
            outs = s.run(names, feeds)
        results[p] = ((time.perf_counter() - t) / 10, dict(zip(names, outs, strict=True)))
    (t_base, o_base), (t_var, o_var) = results[base], results[variant]
    drifts = {k: float(np.abs(v.astype(np.float64) - o_var[k]).max()) for k, v in o_base.items()}
    allow_drift(base, variant, drifts)
    # Drift of the scores callers see (probabilities and regression values), not of logits.
    drift = max(v for k, v in drifts.items() if is_score(k))
    return {"max_abs_diff": drift, "speedup": t_base / t_var, "size_bytes": variant.stat().st_size}


def allow_drift(base: Path, variant: Path, drifts: dict[str, float]) -> None:
    """Rewrites the variant's metadata as the base file's, each golden output's allowed
    difference grown by twice its largest drift over the parity rows."""
    meta = file_metadata(onnx.load(str(base)))
    if meta.golden is not None:
        allowed = {
            k: (np.asarray(v) + 2 * drifts[k]).tolist() for k, v in meta.golden.allowed.items()
        }
        meta = meta.model_copy(
            update={"golden": meta.golden.model_copy(update={"allowed": allowed})}
        )
    model = onnx.load(str(variant))
    write_metadata(model, meta)
    write_atomic(variant, model.SerializeToString())
