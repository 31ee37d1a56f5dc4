"""What a run puts in its file's metadata (mmoe.contract.metadata): features, tasks, metrics,
the monitoring outputs and their training-time reference, and (after parity) golden rows."""

from __future__ import annotations

import math
from collections.abc import Collection
from datetime import UTC, datetime

import onnx
import torch

from mmoe.contract.metadata import (
    FeatureRates,
    GoldenRows,
    ModelMetadata,
    MonitorInfo,
    MonitorReference,
    TaskInfo,
    read_metadata,
)
from mmoe.contract.outputs import output_names
from mmoe.export.graph import FEATURE_VALUES, GATE_WEIGHTS, feature_info
from mmoe.export.network import has_gates
from mmoe.model.checkpoint import Run, config_hash
from mmoe.model.network import PLE, MMoE


def monitor_info(run: Run) -> MonitorInfo:
    """The monitoring outputs of the graph assembled for `run`, and the reference training
    measured on its validation rows (none when it had none)."""
    features = run.schema.features
    gates = has_gates(run.model)
    net = run.model.net
    assert isinstance(net, MMoE | PLE)
    reference = None
    ref = run.metrics.get("reference")
    if ref:
        reference = MonitorReference(
            rows=int(run.metrics.get("valid_rows", 0)),
            features={k: FeatureRates.model_validate(v) for k, v in ref["features"].items()},
            scores=ref["scores"],
            gates=(run.metrics.get("gates") or {}) if gates else {},
        )
    return MonitorInfo(
        feature_values=FEATURE_VALUES,
        features=[f.name for f in features],
        vocabulary=[f.name for f in features if f.vocab is not None],
        gate_weights=GATE_WEIGHTS if gates else None,
        gate_tasks=[task.name for task in run.model.tasks] if gates else [],
        experts=net.expert_names if gates else [],
        reference=reference,
    )


def build_metadata(run: Run, context: Collection[str] = (), monitor: bool = True) -> ModelMetadata:
    features = [feature_info(f, context=f.name in context) for f in run.schema.features]
    tasks = []
    for t in run.model.tasks:
        names = output_names(t.name, t.kind, t.product)
        tasks.append(
            TaskInfo(
                name=t.name,
                kind=t.kind,
                output=names.score,
                logits=names.logits,
                num_class=t.num_class,
            )
        )
    # An ESMM task's product (pCTCVR) is served as a task of its own.
    tasks += [
        TaskInfo(name=t.product, kind="binary", output=product)
        for t in run.model.tasks
        if t.product and (product := output_names(t.name, t.kind, t.product).product)
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
        monitor=monitor_info(run) if monitor else None,
    )


def file_metadata(proto: onnx.ModelProto) -> ModelMetadata:
    """The metadata of an assembled file."""
    return read_metadata({p.key: p.value for p in proto.metadata_props})


def write_metadata(proto: onnx.ModelProto, meta: ModelMetadata) -> None:
    """Sets the file's metadata to `meta` (replacing any)."""
    onnx.helper.set_model_props(proto, meta.to_props())


def set_golden(proto: onnx.ModelProto, golden: GoldenRows) -> None:
    """Adds the golden rows to the file's metadata."""
    write_metadata(proto, file_metadata(proto).model_copy(update={"golden": golden}))
