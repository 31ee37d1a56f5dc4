"""`mmoe --help` says what the tool does and lists the path in order; every argument of every
subcommand has a help text; the command table (mmoe/cli.py) is every command, and what the
serving commands import stays light."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from collections.abc import Iterator

import pytest

from mmoe.cli import COMMANDS, TRAINING_COMMANDS, TRAINING_PACKAGES, build_parser


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
    parsers = list(_walk(build_parser()))
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


def _runs(parser: argparse.ArgumentParser) -> bool:
    """Whether the parser sets what runs (`func`), itself or in every subcommand it has."""
    sub = _subcommands(parser)
    if sub is not None:
        return all(_runs(child) for child in sub.choices.values())
    return callable(parser.get_default("func"))


def test_the_command_table_is_every_command_and_each_sets_what_runs() -> None:
    listed = _subcommands(build_parser())
    assert listed is not None
    assert list(listed.choices) == list(COMMANDS)
    for name, parser in listed.choices.items():
        assert _runs(parser), f"mmoe {name} runs nothing"
    # Arguments are added only for the command being parsed: its module alone is imported.
    lone = _subcommands(build_parser(["inspect"]))
    assert lone is not None
    assert [n for n, p in lone.choices.items() if _runs(p)] == ["inspect"]


def test_training_commands_are_those_in_the_training_packages() -> None:
    # A serving-only install lists these as not installed (tests/e2e/test_install.py).
    packages = {name: COMMANDS[name].package for name in COMMANDS}
    assert set(TRAINING_COMMANDS) == {n for n, p in packages.items() if p in TRAINING_PACKAGES}
    assert {packages[n] for n in set(COMMANDS) - set(TRAINING_COMMANDS)} == {"mmoe.service"}


@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        ["serve", "--help"],
        ["verify", "--help"],
        ["export", "--help"],
        ["items", "build", "--help"],
        ["items", "push", "--help"],
    ],
)
def test_parsing_a_command_imports_no_torch(argv: list[str]) -> None:
    code = (
        "import sys\n"
        "from mmoe.cli import main\n"
        "try:\n"
        f"    main({argv!r})\n"
        "except SystemExit:\n"
        "    pass\n"
        "heavy = [m for m in ('torch', 'onnx', 'sklearn', 'mmoe.model') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
