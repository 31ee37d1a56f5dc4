"""`mmoe inspect model.onnx`: what a model file takes, returns and carries, in plain text."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import onnx

from mmoe.contract.metadata import read_metadata

_TYPES = {
    onnx.TensorProto.STRING: "string",
    onnx.TensorProto.FLOAT: "float32",
    onnx.TensorProto.INT64: "int64",
}


def _shape(v: onnx.ValueInfoProto) -> str:
    dims = [d.dim_param or str(d.dim_value) for d in v.type.tensor_type.shape.dim]
    return f"[{', '.join(dims)}]"


def _clipped(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def _value(v: float | list[float], digits: int = 5) -> str:
    if isinstance(v, list):
        return "[" + ", ".join(f"{x:.{digits}g}" for x in v) + "]"
    return f"{v:.{digits}g}"


def describe(path: str | Path) -> str:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    model = onnx.load(str(path))
    meta = read_metadata({p.key: p.value for p in model.metadata_props})
    lines = [
        f"{path}  ({path.stat().st_size / 1e6:.2f} MB)",
        f"model      {meta.name} v{meta.version}  "
        f"(config {meta.config_hash}, exported {meta.exported_at}, metadata format "
        f"{meta.format_version})",
        f"format     IR {model.ir_version}, opsets "
        + ", ".join(f"{o.domain or 'ai.onnx'} {o.version}" for o in model.opset_import),
        "",
        "inputs (raw feature values)",
    ]
    graph_inputs = {i.name: i for i in model.graph.input}
    for f in meta.features:
        v = graph_inputs[f.name]
        default = "required" if f.default is None else f"default {f.default!r}"
        lines.append(
            f"  {f.name:<22} {f.kind:<12} {_TYPES.get(v.type.tensor_type.elem_type, '?'):<8}"
            f"{_shape(v):<18} {default:<18} {f.encoding}"
        )
    lines += ["", "tasks"]
    for t in meta.tasks:
        extra = f", {t.num_class} classes" if t.num_class else ""
        lines.append(
            f"  {t.name:<22} {t.kind:<12} -> {t.output}{extra}"
            + (f" (+ {t.logits})" if t.logits else "")
        )
    lines += ["", "outputs"]
    for o in model.graph.output:
        lines.append(
            f"  {o.name:<22} {_TYPES.get(o.type.tensor_type.elem_type, '?'):<8}{_shape(o)}"
        )
    if meta.metrics:
        lines += ["", "training metrics (best epoch)"]
        lines += [f"  {k:<22} {v:.4f}" for k, v in meta.metrics.items()]
    if meta.golden is not None:
        lines += [
            "",
            f"golden rows ({len(meta.golden.rows)}: checked by a server at load and by "
            "`mmoe verify`; outputs as PyTorch gave them, +- the allowed difference)",
        ]
        for i, row in enumerate(meta.golden.rows):
            lines.append(f"  {i:<3}{_clipped(json.dumps(row, ensure_ascii=False), 96)}")
            answers = [
                f"{name} {_value(values[i])} +-{_value(meta.golden.allowed[name][i], 2)}"
                for name, values in meta.golden.outputs.items()
            ]
            lines.append("     -> " + ", ".join(answers))
    ops = Counter(f"{n.domain + '.' if n.domain else ''}{n.op_type}" for n in model.graph.node)
    lines += [
        "",
        f"graph      {len(model.graph.node)} nodes: "
        + ", ".join(f"{k} x{v}" for k, v in ops.most_common()),
    ]
    return "\n".join(lines)
