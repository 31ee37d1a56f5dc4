"""The documented config stays true (the config section, docs/training.md): its Python examples
run. (Its reference of every option is generated: tests/model/test_config_reference.py.)"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.docs import section

DOC, CONFIG_SECTION = section("config")


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", CONFIG_SECTION, re.S)


def test_python_examples_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    examples = blocks("python")
    assert len(examples) == 2
    for code in examples:
        exec(compile(code, str(DOC), "exec"), {})
    assert (tmp_path / "runs" / "small" / "weights.pt").exists()
