"""The checkout's layout: the stage folders at the root, each imported under one name only
(mmoe.<folder>, mapped by the packaging), with no symlinks and no import hook of the project's."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("contract", "service", "model", "export", "bench")


def test_no_symlinks_in_the_repository() -> None:
    listing = subprocess.run(
        ["git", "-C", str(ROOT), "ls-files", "-s"], check=True, capture_output=True, text=True
    ).stdout
    links = [line.split("\t")[1] for line in listing.splitlines() if line.startswith("120000")]
    assert links == []


@pytest.mark.parametrize("stage", STAGES)
def test_each_stage_has_one_import_name(stage: str, monkeypatch: pytest.MonkeyPatch) -> None:
    package = importlib.import_module(f"mmoe.{stage}")
    assert Path(package.__file__ or "").parent == ROOT / stage
    monkeypatch.syspath_prepend(str(ROOT))  # as from the checkout's root: the folder is found,
    with pytest.raises(ImportError, match=rf"import mmoe\.{stage}"):
        importlib.import_module(stage)  # and refused under its folder name
    assert stage not in sys.modules


def test_no_import_hook_of_the_project() -> None:
    for stage in STAGES:
        importlib.import_module(f"mmoe.{stage}")
    ours = [
        finder for finder in sys.meta_path if type(finder).__module__.startswith(("mmoe", *STAGES))
    ]
    assert ours == []
