"""`mmoe --help` says what the tool does and lists the path in order, and every argument of every
subcommand (and of `mmoe bench`, which parses its own) has a help text."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from collections.abc import Iterator

from mmoe.bench.run import build_parser as bench_parser
from mmoe.cli import TRAINING_COMMANDS, build_parser
from mmoe.service import cli as service_cli


def _subcommands(parser: argparse.ArgumentParser) -> argparse._SubParsersAction | None:
    found = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return found[0] if found else None


def _walk(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    yield parser
    sub = _subcommands(parser)
    if sub is not None:
        for child in sub.choices.values():
            yield from _walk(child)


def _undocumented(parser: argparse.ArgumentParser) -> list[str]:
    missing = []
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        if isinstance(action, argparse._SubParsersAction):
            helped = {a.dest for a in action._choices_actions if a.help}
            missing += [f"{parser.prog} {name}" for name in action.choices if name not in helped]
        elif not action.help or action.help == argparse.SUPPRESS:
            missing.append(f"{parser.prog} {'/'.join(action.option_strings) or action.dest}")
    return missing


def test_every_argument_of_every_subcommand_has_help() -> None:
    parsers = [*_walk(build_parser()), bench_parser()]
    assert len(parsers) > 8, [p.prog for p in parsers]  # the walk reached the subcommands
    missing = [name for p in parsers for name in _undocumented(p)]
    assert not missing, f"arguments without a help text: {missing}"


def test_the_walk_finds_an_argument_without_help() -> None:
    parser = argparse.ArgumentParser(prog="x")
    sub = parser.add_subparsers()
    sub.add_parser("run", help="runs").add_argument("--out")
    sub.add_parser("quiet")
    found = [name for p in _walk(parser) for name in _undocumented(p)]
    assert found == ["x quiet", "x run --out"]


def test_help_says_what_the_tool_does_and_lists_the_path_in_order() -> None:
    cmd = [sys.executable, "-m", "mmoe", "--help"]
    text = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True).stdout
    assert "ranking model" in text and "ONNX" in text
    path_line = next(line for line in text.splitlines() if "data -> train" in line)
    path = re.findall(r"[a-z]+(?:/[a-z]+)?", path_line.split(":", 1)[1])
    steps = [name for step in path for name in step.split("/")]
    listed = list(_subcommands(build_parser()).choices)  # type: ignore[union-attr]
    assert set(steps) <= set(listed), (steps, listed)
    in_listing = [name for name in listed if name in steps]
    assert in_listing == steps, f"commands listed as {listed}, the path is {steps}"


def test_training_commands_are_those_the_training_packages_register() -> None:
    # A serving-only install names these without importing them (mmoe/cli.py).
    listed = set(_subcommands(build_parser()).choices)  # type: ignore[union-attr]
    serving = argparse.ArgumentParser().add_subparsers()
    service_cli.register(serving)
    assert set(TRAINING_COMMANDS) == listed - set(serving.choices) - {"items"}
