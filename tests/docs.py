"""The project's documentation as tests read it: README.md and docs/*.md, and the sections marked
in them (`<!-- section:NAME -->` ... `<!-- /section:NAME -->`), in whichever file they live."""

from __future__ import annotations

import re
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
