"""Who may import whom: the contract is neutral (pydantic + numpy), the service knows only the
contract and the file (never export/, model/, torch or onnx)."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def imported(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    return names


def test_service_imports_nothing_from_export_model_or_torch() -> None:
    for path in sorted((ROOT / "service").rglob("*.py")):
        for name in imported(path):
            top = name.split(".")
            assert top[0] not in ("torch", "onnx"), f"{path}: {name}"
            assert top[:2] not in (["mmoe", "export"], ["mmoe", "model"]), f"{path}: {name}"


def test_contract_needs_only_pydantic_and_numpy() -> None:
    allowed = {"pydantic", "numpy", "mmoe", "__future__", *sys.stdlib_module_names}
    for path in sorted((ROOT / "contract").rglob("*.py")):
        for name in imported(path):
            assert name.split(".")[0] in allowed, f"{path}: {name}"
            if name.startswith("mmoe."):
                assert name.startswith("mmoe.contract"), f"{path}: {name}"
