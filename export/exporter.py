"""RUN_DIR -> one self-contained model.onnx: preprocessing nodes + network + metadata.

The pipeline, one step per module:

    load the run            model/checkpoint.py
    assemble one graph      export/assemble.py (export/graph.py's preprocessing in front of
                            export/network.py's network, export/metadata.py's metadata)
    check parity            export/parity.py: onnxruntime against PyTorch on generated,
                            edge and validation rows, and the monitoring outputs
    store golden rows       a few of those rows and PyTorch's outputs, in the metadata; a
                            server checks them at load
    write the file          atomically (export/files.py)
    variants, if asked      export/variants.py: optimized, int8, float16 files beside it
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mmoe.export import variants
from mmoe.export.assemble import assemble
from mmoe.export.files import write_atomic
from mmoe.export.metadata import set_golden
from mmoe.export.parity import (
    RawColumn,
    check_monitoring,
    check_parity,
    edge_rows,
    generate_rows,
    golden_rows,
    join_columns,
    sample_rows,
)
from mmoe.model.checkpoint import load_run


@dataclass
class ExportReport:
    path: Path
    seconds: float
    parity_max_abs_diff: float
    rows_checked: int
    size_bytes: int
    variants: dict[str, dict[str, float]] = field(default_factory=dict)
    sample_rows: int = 0  # of rows_checked, real validation rows kept by training
    golden_rows: int = 0
    # The largest |torch - onnxruntime| as a fraction of the difference the rule allows.
    parity_fraction_of_allowed: float = 0.0
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
    golden: int = 8,
    monitor: bool = True,
) -> ExportReport:
    """Export RUN_DIR to `out`; raises ParityError if onnxruntime and PyTorch disagree, or if
    the monitoring outputs disagree with training's rule and PyTorch (check_monitoring).

    Parity is checked on `parity_rows` generated rows, the run's validation sample and
    `extra_rows`; `golden` rows (rules' edge cases, then validation rows) are stored in the
    file with PyTorch's outputs, for servers to check at load.

    `context=False`: every feature per row, ignoring the config's `context: true` (the naive
    graph, for comparison). `monitor=False` leaves the monitoring outputs out."""
    t0 = time.perf_counter()
    run = load_run(run_dir)
    proto = assemble(run, context=context, monitor=monitor)

    sample = sample_rows(run.path, run.schema) or {}
    generated = generate_rows(run.schema, parity_rows)
    cols = join_columns(run.schema, [edge_rows(run.schema), sample, generated, extra_rows or {}])
    data = proto.SerializeToString()
    with one_torch_thread():
        parity = check_parity(run.model, run.schema, data, cols, tolerance)
        if monitor:
            check_monitoring(run, data, cols)

    # Golden rows: the edge rows, then real validation rows (else generated ones).
    picks = list(range(min(golden, parity.rows)))
    if picks:
        set_golden(proto, golden_rows(cols, parity, picks))

    data = proto.SerializeToString()
    out = Path(out)
    write_atomic(out, data)
    report = ExportReport(
        out,
        0.0,
        parity.max_abs_diff,
        parity.rows,
        len(data),
        sample_rows=len(next(iter(sample.values()))) if sample else 0,
        golden_rows=len(picks),
        parity_fraction_of_allowed=parity.fraction_of_allowed,
        context=run.schema.context_features if context else [],
    )

    if optimize:
        report.variants["opt"] = variants.optimized(out, run.schema, cols)
    if int8:
        report.variants["int8"] = variants.quantized(out, run.schema, cols)
    if fp16:
        report.variants["fp16"] = variants.float16(out, run.schema, cols)
    report.seconds = time.perf_counter() - t0
    return report


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """PyTorch's side of the checks runs on one thread (restored after): its outputs then do not
    depend on the machine's core count (a different split of a sum can move a float32 output by
    a unit in the last place), and on a busy machine, where a second thread waits for a core at
    every operation, it runs about 8x faster (the demo's reference outputs: 1.5-1.9 s on 2
    threads, 0.15-0.2 s on one, on a shared 2-core machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
