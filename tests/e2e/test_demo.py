"""The demo model the README's serve command builds: both tasks learn (AUC > 0.65), and export
stays fast."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.cli import mmoe
from tests.docs import documents

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_demo_learns_both_tasks_and_exports(tmp_path: Path) -> None:
    data, run, model = tmp_path / "demo.parquet", tmp_path / "run", tmp_path / "demo.onnx"
    # The same steps as `make demo`.
    mmoe("data", "synthetic-ranking", "--rows", "200000", "--seed", "7", "--out", str(data))
    out = mmoe(
        "train",
        "--config",
        str(ROOT / "configs" / "demo.yaml"),
        "--data",
        str(data),
        "--out",
        str(run),
    )
    metrics = json.loads((run / "metrics.json").read_text())
    for task in ("ctr", "cvr"):
        assert metrics["best"][f"auc_{task}"] > 0.65, metrics["best"]
        assert f"auc_{task}=" in out  # printed by train
    started = time.perf_counter()
    text = mmoe("export", str(run), "--out", str(model))
    assert "parity" in text and model.stat().st_size > 0
    # Reported, not asserted (timings are the benchmark's job): the budget is 10 s.
    print(f"demo export took {time.perf_counter() - started:.1f}s")

    # The documentation shows `mmoe inspect` of this model: its inputs, tasks and outputs must be
    # what the demo really has (timestamps, hashes and metric digits may differ).
    shown = _readme_inspect_block()
    printed = mmoe("inspect", str(model))
    for section in ("inputs", "tasks", "outputs"):
        assert _section(printed, section) == _section(shown, section), section


def _readme_inspect_block() -> str:
    """The `mmoe inspect` output shown in the documentation (docs/export.md)."""
    marker = "$ mmoe inspect models/demo.onnx\n"
    shown = [doc.read_text() for doc in documents() if marker in doc.read_text()]
    assert len(shown) == 1, f"{len(shown)} documents show `mmoe inspect` of the demo"
    start = shown[0].index(marker)
    return shown[0][start : shown[0].index("```", start)]


def _section(text: str, title: str) -> list[str]:
    lines = text.splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith(title)) + 1
    body = []
    for line in lines[first:]:
        if not line.strip():
            break
        body.append(line.rstrip())
    assert body, f"no {title!r} section"
    return body
