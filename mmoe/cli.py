"""Train, export and serve a multi-task ranking model (MMoE, Multi-gate Mixture-of-Experts):
PyTorch in, one self-contained ONNX file out (raw feature values in, per-task scores out), served
over HTTP by FastAPI + onnxruntime.

The path, one command per step: data -> train -> export -> inspect/verify -> serve -> bench.
`mmoe COMMAND --help` says more about each."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

EXAMPLE = """example (the demo model, as `make serve` builds it):
  mmoe data synthetic-ranking --out data/demo.parquet
  mmoe train --config configs/demo.yaml --data data/demo.parquet --out runs/demo
  mmoe export runs/demo --out models/demo.onnx
  mmoe inspect models/demo.onnx
  mmoe verify models/demo.onnx
  mmoe serve --model models/demo.onnx"""

# The packages of the training distribution (mmoe-ranking-train); this one has mmoe.service.
TRAINING_PACKAGES = ("mmoe.model", "mmoe.export", "mmoe.bench")
TRAINING_INSTALL = "pip install mmoe-ranking-train (from a checkout: pip install . ./training)"


@dataclass(frozen=True)
class Command:
    """One `mmoe` command: `target` ("module:function") adds its arguments to the parser of
    `mmoe NAME` and sets `func`, what runs; its module is imported only when that command is
    parsed, so that `mmoe --help` imports none and `mmoe serve` no training code (nor torch)."""

    target: str
    help: str

    @property
    def package(self) -> str:
        """The stage package the command lives in (mmoe.model, mmoe.service, ...)."""
        return ".".join(self.target.split(":")[0].split(".")[:2])

    @property
    def installed(self) -> bool:
        return importlib.util.find_spec(self.package) is not None

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        module, function = self.target.split(":")
        getattr(importlib.import_module(module), function)(parser)


# Every command, in the order of the path.
COMMANDS: dict[str, Command] = {
    "data": Command(
        "mmoe.model.cli:data", "write a synthetic data set (or bring your own CSV/Parquet)"
    ),
    "train": Command("mmoe.model.cli:train", "fit the feature schema and train the model"),
    "convert-config": Command(
        "mmoe.model.cli:convert_config",
        "write an EasyRec pipeline.config as this project's YAML config",
    ),
    "report": Command("mmoe.model.cli:report", "plot a run's curves and gate utilisation"),
    "export": Command(
        "mmoe.export.cli:export", "RUN_DIR -> one self-contained model.onnx (parity-checked)"
    ),
    "inspect": Command(
        "mmoe.export.cli:inspect", "print a model.onnx's schema, tasks, inputs and outputs"
    ),
    "verify": Command(
        "mmoe.service.cli:verify",
        "run a model.onnx's golden rows as a server does at load; exit 1 if any answer "
        "changed (needs only the serving install)",
    ),
    "serve": Command(
        "mmoe.service.cli:serve", "serve model.onnx over HTTP (FastAPI + onnxruntime)"
    ),
    "items": Command(
        "mmoe.service.cli:items",
        "item features the server holds: build a table, push it to Redis",
    ),
    "bench": Command(
        "mmoe.bench.run:add_arguments",
        "benchmark the service against onnxruntime alone and a PyTorch baseline",
    ),
}
# Named so that a serving-only install can say where they are (tests/test_cli_help.py).
TRAINING_COMMANDS = tuple(n for n, c in COMMANDS.items() if c.package in TRAINING_PACKAGES)


def build_parser(commands: Collection[str] | None = None) -> argparse.ArgumentParser:
    """`mmoe`'s parser: every command listed, and the arguments of `commands` (default: every
    installed one) added, which imports their modules."""
    parser = argparse.ArgumentParser(
        prog="mmoe",
        description=__doc__,
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, command in COMMANDS.items():
        if not command.installed:
            sub.add_parser(name, help=f"(not installed: {TRAINING_INSTALL})", add_help=False)
            continue
        command_parser = sub.add_parser(name, help=command.help)
        if commands is None or name in commands:
            command.add_arguments(command_parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """`mmoe ARGS`, and `torchrun ... -m mmoe ARGS` (mmoe/__main__.py): the same function."""
    argv = list(sys.argv[1:] if argv is None else argv)
    name = argv[0] if argv and argv[0] in COMMANDS else None
    if name is not None and not COMMANDS[name].installed:
        where = f"`mmoe {name}` is in the training install: {TRAINING_INSTALL}"
        print(f"error: {where}", file=sys.stderr)
        return 2
    args = build_parser([name] if name else []).parse_args(argv)
    func: Any = args.func
    result: int = func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
