"""The project's documentation as tests read it: README.md and docs/*.md, and the sections marked
in them (`<!-- section:NAME -->` ... `<!-- /section:NAME -->`), in whichever file they live."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def documents() -> list[Path]:
    """README.md, then docs/*.md by name."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def sections(name: str) -> list[tuple[Path, str]]:
    """Every section NAME, with the file it is in."""
    pattern = re.compile(rf"<!-- section:{name} -->\n(.*?)<!-- /section:{name} -->", re.S)
    found = [(path, m.group(1)) for path in documents() for m in pattern.finditer(path.read_text())]
    assert found, f"no section {name!r} in README.md or docs/*.md"
    return found


def section(name: str) -> tuple[Path, str]:
    """The one section NAME, with the file it is in."""
    (found, *more) = sections(name)
    assert not more, f"section {name!r} is in more than one place: {[str(p) for p, _ in more]}"
    return found


def bash_commands(text: str) -> list[list[str]]:
    """The command lines of `text`'s bash blocks, as argv lists: continued lines joined, a quoted
    argument followed over the lines it spans, comments and blank lines left out."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.DOTALL):
        pending = ""
        for line in re.sub(r"\\\n", " ", block).splitlines():
            pending += line + "\n"
            try:
                argv = shlex.split(pending, comments=True)
            except ValueError:  # a quoted argument goes on over the next line
                continue
            pending = ""
            if argv:
                commands.append(argv)
        assert not pending, f"unclosed quote in a bash block: {pending}"
    return commands
