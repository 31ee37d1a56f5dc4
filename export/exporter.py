"""RUN_DIR -> one self-contained model.onnx: preprocessing nodes + network + metadata.

The network is exported with `torch.onnx.export` (the torch.export-based exporter); the fitted
schema becomes nodes in front of it (`export/graph.py`); both are merged into one graph whose
inputs are the raw features. The result is checked with `onnx.checker` and against PyTorch
before it is written (atomically: a failed export never leaves a half-written file).
"""

from __future__ import annotations

import io
import logging
import math
import os
import tempfile
import time
import warnings
from collections.abc import Collection
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import compose
from torch import nn

from mmoe.contract.metadata import FeatureInfo, ModelMetadata, TaskInfo
from mmoe.export.context import ContextSplit
from mmoe.export.graph import (
    CONTEXT_DIM,
    IR_VERSION,
    OPSET,
    OPSET_IMPORTS,
    encoded_name,
    encoding_text,
    preprocessing_graph,
)
from mmoe.export.parity import RawColumn, check_parity, generate_rows, to_onnx_inputs
from mmoe.model.checkpoint import Run, config_hash, load_run
from mmoe.model.network import RankingModel, TaskHead, output_names, task_outputs
from mmoe.model.schema import FeatureSchema


class ExportNet(nn.Module):
    """Positional encoded inputs -> the exported outputs, for the exporter. `logits` maps the
    encoded inputs by feature name to per-task logits: the RankingModel, or its ContextSplit."""

    def __init__(self, logits: nn.Module, tasks: list[TaskHead], names: list[str]) -> None:
        super().__init__()
        self.logits = logits
        self.tasks = tasks
        self.names = names

    def forward(self, *encoded: torch.Tensor) -> tuple[torch.Tensor, ...]:
        logits = self.logits(dict(zip(self.names, encoded, strict=True)))
        outs: list[torch.Tensor] = []
        for task in self.tasks:
            outs.extend(task_outputs(task, logits[task.name]).values())
        return tuple(outs)


def graph_output_names(model: RankingModel) -> list[str]:
    """The network's outputs in ExportNet's order."""
    names: list[str] = []
    for t in model.tasks:
        n = output_names(t)
        names.extend([n.score] if n.logits is None else [n.score, n.logits])
    return names


def example_inputs(
    schema: FeatureSchema, context: Collection[str] = (), batch: int = 3
) -> tuple[torch.Tensor, ...]:
    """Encoded inputs to trace with: `batch` rows, one for the features in `context`."""
    out = []
    for f in schema.features:
        rows = 1 if f.name in context else batch
        if f.kind == "tags":
            out.append(torch.ones(rows, f.max_len or 1, dtype=torch.long))
        elif f.embedded:
            out.append(torch.zeros(rows, dtype=torch.long))
        else:
            out.append(torch.zeros(rows))
    return tuple(out)


def export_network(
    model: RankingModel, schema: FeatureSchema, context: Collection[str] = ()
) -> onnx.ModelProto:
    """The network alone: `enc__<feature>` inputs -> per-task outputs, dynamic batch axis.

    The features in `context` enter through a ContextSplit of the model and get their own
    batch axis (CONTEXT_DIM: 1, or N like the rest)."""
    names = [f.name for f in schema.features]
    logits = ContextSplit(model.eval(), context) if context else model.eval()
    wrapper = ExportNet(logits, model.tasks, names).eval()
    batch = torch.export.Dim("batch", min=1)
    # Context inputs are traced at a fixed batch of 1: with one symbolic batch for all inputs
    # the exporter takes the candidates' row count from whichever input comes first, a context
    # one included, and a [1]-shaped context then breaks the graph. Traced at 1, nothing sizes
    # the candidates by the context; their batch axis is made symbolic below, and the runtime's
    # broadcasting (the [1, H] bias of a Gemm, Expand) takes 1 or N alike.
    dynamic = tuple(None if n in context else {0: batch} for n in names)
    with warnings.catch_warnings(), _quiet_exporter():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            wrapper,
            example_inputs(schema, context),
            input_names=[encoded_name(n) for n in names],
            output_names=graph_output_names(model),
            dynamic_shapes=(dynamic,),  # forward(*encoded): one varargs entry
            opset_version=OPSET,
            dynamo=True,
            external_data=False,
            verbose=False,
        )
    assert program is not None
    proto = program.model_proto
    # Node-level metadata (source locations) is IR 10 only and says nothing to a server.
    for node in proto.graph.node:
        del node.metadata_props[:]
    if context:
        ctx_inputs = {encoded_name(n) for n in context}
        for value in proto.graph.input:
            if value.name in ctx_inputs:
                value.type.tensor_type.shape.dim[0].dim_param = CONTEXT_DIM
        # Shapes inferred while tracing give the context's intermediates a batch of 1.
        del proto.graph.value_info[:]
    return proto


class _quiet_exporter:
    """The exporter prints progress lines to stdout; keep the CLI's output readable."""

    def __enter__(self) -> None:
        self._buf = io.StringIO()
        import contextlib

        self._ctx = contextlib.redirect_stdout(self._buf)
        self._ctx.__enter__()
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)

    def __exit__(self, *exc: object) -> None:
        self._ctx.__exit__(None, None, None)


def build_metadata(run: Run, context: Collection[str] = ()) -> ModelMetadata:
    features = [
        FeatureInfo(
            name=f.name,
            kind=f.kind,
            dtype="float32" if f.kind == "numeric" else "string",
            default=f.default,
            separator=f.separator,
            max_len=f.max_len,
            encoding=encoding_text(f),
            context=f.name in context,
        )
        for f in run.schema.features
    ]
    tasks = [
        TaskInfo(
            name=t.name,
            kind=t.kind,
            output=output_names(t).score,
            logits=output_names(t).logits,
            num_class=t.num_class,
        )
        for t in run.model.tasks
    ]
    best = run.metrics.get("best", {})
    return ModelMetadata(
        name=run.config.name,
        version=run.config.version,
        config_hash=config_hash(run.config),
        exported_at=datetime.now(UTC).isoformat(timespec="seconds"),
        features=features,
        tasks=tasks,
        metrics={k: float(v) for k, v in best.items() if isinstance(v, float) and math.isfinite(v)},
        producer={"torch": torch.__version__, "onnx": onnx.__version__},
    )


def assemble(run: Run, *, context: bool = True) -> onnx.ModelProto:
    """One ModelProto: raw features -> preprocessing -> network -> outputs, with metadata.

    With `context`, the features the schema declares request context are taken once per
    request and their share of the network computed once (export/context.py); without, every
    feature is per row, as any other exporter would give."""
    ctx = run.schema.context_features if context else []
    pre = preprocessing_graph(run.schema, ctx)
    net = export_network(run.model, run.schema, ctx)
    net.ir_version = pre.ir_version
    # The exporter may import extra domains; keep ours and theirs, at our versions.
    ours = {o.domain: o.version for o in OPSET_IMPORTS}
    for o in net.opset_import:
        if o.domain not in ours:
            ours[o.domain] = o.version
    for m in (pre, net):
        del m.opset_import[:]
        m.opset_import.extend(onnx.helper.make_opsetid(d, v) for d, v in ours.items())
    io_map = [(o.name, o.name) for o in pre.graph.output]
    merged = compose.merge_models(pre, net, io_map=io_map)
    del merged.opset_import[:]  # merge_models lists each domain once per input model
    merged.opset_import.extend(onnx.helper.make_opsetid(d, v) for d, v in ours.items())
    merged.ir_version = IR_VERSION
    merged.producer_name = "mmoe-ranking"
    merged.graph.name = run.config.name
    meta = build_metadata(run, ctx)
    onnx.helper.set_model_props(merged, meta.to_props())
    merged.doc_string = (
        f"MMoE ranking model {meta.name} v{meta.version}: raw features in, per-task scores out."
    )
    onnx.checker.check_model(merged, full_check=True)
    return merged


@dataclass
class ExportReport:
    path: Path
    seconds: float
    parity_max_abs_diff: float
    rows_checked: int
    size_bytes: int
    variants: dict[str, dict[str, float]] = field(default_factory=dict)
    context: list[str] = field(default_factory=list)  # inputs taken once per request


def export_run(
    run_dir: str | Path,
    out: str | Path,
    *,
    tolerance: float = 1e-5,
    parity_rows: int = 1024,
    extra_rows: dict[str, RawColumn] | None = None,
    context: bool = True,
    optimize: bool = False,
    int8: bool = False,
    fp16: bool = False,
) -> ExportReport:
    """Export RUN_DIR to `out`; raises ParityError if onnxruntime and PyTorch disagree.

    `context=False`: every feature per row, ignoring the config's `context: true` (the naive
    graph, for comparison)."""
    t0 = time.perf_counter()
    run = load_run(run_dir)
    proto = assemble(run, context=context)
    data = proto.SerializeToString()
    cols = generate_rows(run.schema, parity_rows)
    if extra_rows:
        cols = {
            k: v + list(extra_rows.get(k, [None] * len(next(iter(extra_rows.values())))))
            for k, v in cols.items()
        }
    worst = check_parity(run.model, run.schema, data, cols, tolerance)
    out = Path(out)
    _write_atomic(out, data)
    report = ExportReport(out, 0.0, worst, len(next(iter(cols.values()))), len(data))
    report.context = run.schema.context_features if context else []
    if optimize:
        report.variants["opt"] = _optimized(out, run.schema, cols)
    if int8:
        report.variants["int8"] = _quantized(out, run.schema, cols)
    if fp16:
        report.variants["fp16"] = _float16(out, run.schema, cols)
    report.seconds = time.perf_counter() - t0
    return report


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    # mkstemp makes the file 0600; the model is read by other users too (a container's
    # non-root server reading a mounted file).
    os.fchmod(fd, 0o644)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)


def _variant_path(path: Path, tag: str) -> Path:
    return path.with_name(f"{path.stem}.{tag}{path.suffix}")


def _compare(
    base: Path, variant: Path, schema: FeatureSchema, cols: dict[str, RawColumn]
) -> dict[str, float]:
    """Max output drift against the base file and the speed ratio (base time / variant time)."""
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
    # Drift of the scores callers see (probabilities and regression values), not of logits.
    scores = [k for k in o_base if k.startswith(("probs_", "y_"))]
    drift = max(float(np.abs(o_base[k].astype(np.float64) - o_var[k]).max()) for k in scores)
    return {"max_abs_diff": drift, "speedup": t_base / t_var, "size_bytes": variant.stat().st_size}


def _optimized(path: Path, schema: FeatureSchema, cols: dict[str, RawColumn]) -> dict[str, float]:
    target = _variant_path(path, "opt")
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    so.optimized_model_filepath = str(target)
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return _compare(path, target, schema, cols)


def _quantized(path: Path, schema: FeatureSchema, cols: dict[str, RawColumn]) -> dict[str, float]:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    target = _variant_path(path, "int8")
    quantize_dynamic(
        path, target, weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"]
    )
    return _compare(path, target, schema, cols)


def _float16(path: Path, schema: FeatureSchema, cols: dict[str, RawColumn]) -> dict[str, float]:
    from onnxruntime.transformers.float16 import convert_float_to_float16

    target = _variant_path(path, "fp16")
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
    _write_atomic(target, half.SerializeToString())
    return _compare(path, target, schema, cols)
