"""`mmoe`: one command for the whole path. Each stage's package registers its own subcommands;
torch is imported only by the subcommands that train or export, so `mmoe serve` runs in a
serving-only install."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def build_parser() -> argparse.ArgumentParser:
    from mmoe.export import cli as export_cli
    from mmoe.model import cli as model_cli
    from mmoe.service import cli as service_cli

    parser = argparse.ArgumentParser(prog="mmoe", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    model_cli.register(sub)
    export_cli.register(sub)
    service_cli.register(sub)
    bench = sub.add_parser(
        "bench", help="benchmark the service against a floor and a baseline", add_help=False
    )
    bench.set_defaults(func=_bench)
    return parser


def _bench(args: argparse.Namespace, rest: list[str]) -> int:
    from mmoe.bench.run import main as bench_main

    return bench_main(rest)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if argv[:1] == ["bench"]:
        return _bench(argparse.Namespace(), argv[1:])
    args = parser.parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
