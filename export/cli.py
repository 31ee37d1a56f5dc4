"""The arguments of `mmoe export` and `mmoe inspect` (mmoe/cli.py's command table); torch and
onnx are imported only when they run. `mmoe verify` is the serving install's: service/cli.py."""

from __future__ import annotations

import argparse
import sys


def export(parser: argparse.ArgumentParser) -> None:
    ex = parser
    ex.add_argument("run_dir", help="a RUN_DIR written by mmoe train")
    ex.add_argument("--out", required=True, help="the model.onnx to write")
    ex.add_argument(
        "--tolerance",
        type=float,
        default=1e-5,
        help="allowed |torch - onnxruntime| per unit of max(1, |value|), on top of what float32 "
        "rounding allows at each row's scale (export/parity.py)",
    )
    ex.add_argument("--rows", type=int, default=1024, help="generated rows for the parity check")
    ex.add_argument(
        "--no-context",
        dest="context",
        action="store_false",
        help="treat every feature as per candidate, ignoring the config's `context: true` "
        "(the naive graph: the context recomputed for every row)",
    )
    ex.add_argument(
        "--optimize",
        action="store_true",
        help="also write an onnxruntime-optimized graph (.opt.onnx)",
    )
    ex.add_argument(
        "--int8", action="store_true", help="also write a dynamically quantized graph (.int8.onnx)"
    )
    ex.add_argument(
        "--fp16", action="store_true", help="also write a float16 graph for CUDA (.fp16.onnx)"
    )
    ex.add_argument(
        "--no-monitor",
        dest="monitor",
        action="store_false",
        help="leave out the monitoring outputs (feature-value counts, gate weights)",
    )
    ex.set_defaults(func=_export)


def inspect(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="a model.onnx written by mmoe export")
    parser.set_defaults(func=_inspect)


def _export(args: argparse.Namespace) -> int:
    from mmoe.export.exporter import export_run
    from mmoe.export.parity import ParityError

    try:
        report = export_run(
            args.run_dir,
            args.out,
            tolerance=args.tolerance,
            parity_rows=args.rows,
            context=args.context,
            optimize=args.optimize,
            int8=args.int8,
            fp16=args.fp16,
            monitor=args.monitor,
        )
    except ParityError as err:
        print(f"error: export refused, parity check failed: {err}", file=sys.stderr)
        return 1
    except (FileNotFoundError, ValueError) as err:  # not a run; features named like outputs
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(
        f"wrote {report.path} ({report.size_bytes / 1e6:.2f} MB) in {report.seconds:.1f}s; "
        f"parity on {report.rows_checked} rows ({report.sample_rows} of them validation rows): "
        f"max |torch - onnxruntime| = {report.parity_max_abs_diff:.2e}, "
        f"{report.parity_fraction_of_allowed:.0%} of the allowed difference; "
        f"{report.golden_rows} golden rows stored"
    )
    if report.context:
        print(f"  context (once per request): {', '.join(report.context)}")
    for name, v in report.variants.items():
        print(
            f"  {name}: max output drift {v['max_abs_diff']:.2e}, speed x{v['speedup']:.2f} "
            f"vs the plain file on CPU, {v['size_bytes'] / 1e6:.2f} MB"
        )
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from mmoe.export.inspect import describe

    try:
        print(describe(args.model))
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
