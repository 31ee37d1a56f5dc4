"""`mmoe bench --quick` end to end on the tiny model: floors, service, both peers, the flat
requests, report and plot. It proves the benchmark runs; it asserts nothing about speed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
def test_quick_benchmark_writes_report_and_plot(
    tiny_run: Path, tiny_onnx: Path, tiny_data: Path, tmp_path: Path
) -> None:
    out = tmp_path / "results"
    args = ["--run", str(tiny_run), "--onnx", str(tiny_onnx), "--data", str(tiny_data)]
    # The grid's 256-candidate column: the one every target is stated at.
    args += ["--context", "user_id,age_level", "--quick", "--candidates", "256"]
    args += ["--seconds", "0.2", "--warmup", "0.05", "--client", "python", "--out", str(out)]
    proc = subprocess.run(
        [sys.executable, "-m", "mmoe", "bench", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    (run_dir,) = out.iterdir()
    report = (run_dir / "report.md").read_text()
    for heading in (
        "Floor, naive graph",
        "Floor, context-once graph",
        "Servers under load",
        "Start-up and memory",
        "Targets (service, 256 candidates)",
    ):
        assert f"### {heading}" in report
    assert (run_dir / "latency_throughput.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    results = json.loads((run_dir / "results.json").read_text())
    (model,) = results["models"]
    for graph in ("naive", "context"):
        assert [p["rows"] for p in model["floors"][graph]] == [1, 16, 64, 256, 1024]
    servers = {"service", "tuned", "baseline", "flat", "flat, naive graph"}
    assert set(model["servers"]) == servers
    cells = {(c["server"], c["candidates"], c["concurrency"]): c for c in model["cells"]}
    assert len(cells) == 3 * 3 + 2  # 3 servers x c=1, 8, 32; the two flat points
    assert all(c["errors"] == 0 for c in cells.values()), cells
    for server in servers:
        assert sum(c["requests"] for c in model["cells"] if c["server"] == server) > 0
    assert model["servers"]["service"]["cold_start_s"] > 0
    assert model["servers"]["service"]["processes"] > 1  # parent and workers, summed
    targets = [line for line in report.splitlines() if line.startswith("| c=") or "flat" in line]
    assert len([t for t in targets if t.endswith(("| yes |", "| **no** |"))]) == 7, targets
