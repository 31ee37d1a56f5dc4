"""Every relative link in README.md and docs/*.md points at a file of the checkout, and a link to a
heading (`file.md#heading`) at a heading that file has."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.docs import ROOT, documents

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _prose(text: str) -> str:
    """The text outside fenced code blocks (where brackets are code, not links)."""
    return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)


def _anchors(path: Path) -> set[str]:
    """The anchors GitHub gives a Markdown file's headings."""
    anchors = set()
    for line in _prose(path.read_text()).splitlines():
        heading = re.match(r"#+\s+(.*)", line)
        if heading:
            text = heading.group(1).strip().lower()
            anchors.add(re.sub(r"[^\w\- ]", "", text).replace(" ", "-"))
    return anchors


def _links(path: Path) -> list[str]:
    return [t for t in LINK.findall(_prose(path.read_text())) if not re.match(r"[a-z]+:", t)]


@pytest.mark.parametrize("doc", documents(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(doc: Path) -> None:
    broken = []
    for link in _links(doc):
        target, _, anchor = link.partition("#")
        path = (doc.parent / target).resolve() if target else doc
        if not path.exists():
            broken.append(f"{link}: no {path.relative_to(ROOT)}")
        elif anchor and path.suffix == ".md" and anchor not in _anchors(path):
            broken.append(f"{link}: no heading #{anchor} in {path.name}")
    assert not broken, f"{doc.relative_to(ROOT)}: {broken}"


def test_the_checker_sees_links_and_headings(tmp_path: Path) -> None:
    doc = tmp_path / "a.md"
    doc.write_text(
        "# Settings, measured: `x`\n[b](b.md#top) [web](https://x.org)\n```\n[no](c)\n```\n"
    )
    assert _links(doc) == ["b.md#top"]
    assert _anchors(doc) == {"settings-measured-x"}


# A document named in code: docs/<name>.md, or one at the root in capitals (README.md).
NAMED_DOC = re.compile(r"(?<![\w/.])(docs/[a-z_]+\.md|[A-Z]+\.md)\b")


def test_documents_named_in_code_exist() -> None:
    """A comment or message that sends the reader to docs/x.md (or DESIGN.md) names a file of
    the checkout."""
    missing = []
    for folder in ("mmoe", "contract", "service", "model", "export", "bench", "deploy"):
        for path in sorted((ROOT / folder).rglob("*")):
            if path.suffix not in (".py", ".yml", ".yaml", ".toml") or not path.is_file():
                continue
            for name in NAMED_DOC.findall(path.read_text()):
                if not (ROOT / name).exists():
                    missing.append(f"{path.relative_to(ROOT)}: {name}")
    assert not missing


def test_the_architecture_names_files_that_exist() -> None:
    text = (ROOT / "docs" / "architecture.md").read_text()
    named = re.findall(r"`((?:contract|service|model|export|bench|mmoe)/[\w/]+\.py)", text)
    assert len(named) > 20
    assert [n for n in named if not (ROOT / n).exists()] == []
