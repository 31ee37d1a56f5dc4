"""Train, export and serve a multi-task ranking model (MMoE, Multi-gate Mixture-of-Experts):
PyTorch in, one self-contained ONNX file out (raw feature values in, per-task scores out), served
over HTTP by FastAPI + onnxruntime.

The path, one command per step: data -> train -> export -> inspect/verify -> serve -> bench.
`mmoe COMMAND --help` says more about each."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from collections.abc import Sequence

EXAMPLE = """example (the demo model, as `make serve` builds it):
  mmoe data synthetic-ranking --out data/demo.parquet
  mmoe train --config configs/demo.yaml --data data/demo.parquet --out runs/demo
  mmoe export runs/demo --out models/demo.onnx
  mmoe inspect models/demo.onnx
  mmoe verify models/demo.onnx
  mmoe serve --model models/demo.onnx"""

# The commands of the training distribution (mmoe-ranking-train: mmoe.model, mmoe.export,
# mmoe.bench), named here so that a serving-only install can say where they are.
# tests/test_cli_help.py checks the list against what those packages register.
TRAINING_COMMANDS = (
    "data",
    "train",
    "convert-config",
    "report",
    "export",
    "inspect",
    "bench",
)
TRAINING_INSTALL = "pip install mmoe-ranking-train (from a checkout: pip install . ./training)"


def training_installed() -> bool:
    """Whether the training distribution is installed beside this one."""
    return importlib.util.find_spec("mmoe.model") is not None


def build_parser() -> argparse.ArgumentParser:
    from mmoe.service import cli as service_cli

    parser = argparse.ArgumentParser(
        prog="mmoe",
        description=__doc__,
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    if training_installed():
        from mmoe.export import cli as export_cli
        from mmoe.model import cli as model_cli

        model_cli.register(sub)
        export_cli.register(sub)
    else:
        for name in TRAINING_COMMANDS[:-1]:
            sub.add_parser(name, help=f"(not installed: {TRAINING_INSTALL})", add_help=False)
    service_cli.register(sub)
    _register_items(sub)
    bench = sub.add_parser(
        "bench",
        help="benchmark the service against onnxruntime alone and a PyTorch baseline",
        add_help=False,
    )
    bench.set_defaults(func=_bench)
    return parser


def _register_items(sub: argparse._SubParsersAction) -> None:
    """`mmoe items build|push` (service/item_build.py, service/item_push.py)."""
    from mmoe.service import item_build, item_push

    items = sub.add_parser(
        "items", help="item features the server holds: build a table, push it to Redis"
    )
    commands = items.add_subparsers(dest="items_command", required=True, metavar="COMMAND")
    item_build.register(commands)
    item_push.register(commands)


def _bench(args: argparse.Namespace, rest: list[str]) -> int:
    from mmoe.bench.run import main as bench_main

    return bench_main(rest)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] and argv[0] in TRAINING_COMMANDS and not training_installed():
        print(
            f"error: `mmoe {argv[0]}` is in the training install: {TRAINING_INSTALL}",
            file=sys.stderr,
        )
        return 2
    parser = build_parser()
    if argv[:1] == ["bench"]:
        return _bench(argparse.Namespace(), argv[1:])
    args = parser.parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
