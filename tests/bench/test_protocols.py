"""`mmoe bench --protocols` on the tiny model: /predict JSON, KServe HTTP binary tensors and
KServe gRPC measured on one server, every call answered. It asserts nothing about speed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mmoe.bench.protocols import PROTOCOLS


@pytest.mark.slow
def test_protocol_comparison_runs_without_errors(
    tiny_run: Path, tiny_onnx: Path, tiny_data: Path, tmp_path: Path
) -> None:
    out = tmp_path / "results"
    args = ["--run", str(tiny_run), "--onnx", str(tiny_onnx), "--data", str(tiny_data)]
    args += [
        "--context",
        "user_id,age_level",
        "--quick",
        "--seconds",
        "0.2",
        "--warmup",
        "0.05",
        "--client",
        "python",
        "--no-baseline",
        "--no-tuned",
        "--no-flat",
    ]
    args += ["--protocols", "--candidates", "16,64", "--concurrency", "1,4", "--out", str(out)]
    proc = subprocess.run(
        [sys.executable, "-m", "mmoe", "bench", *args], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    (run_dir,) = out.iterdir()
    (model,) = json.loads((run_dir / "results.json").read_text())["models"]
    cells = {(c["protocol"], c["candidates"], c["concurrency"]): c for c in model["protocols"]}
    assert set(cells) == {(p, n, c) for p in PROTOCOLS for n in (16, 64) for c in (1, 4)}
    for key, cell in cells.items():
        assert cell["errors"] == 0 and cell["requests"] > 0, (key, cell)
        assert cell["server_cpu_ms_per_request"] is not None, key
    report = (run_dir / "report.md").read_text()
    assert f"### {model['name']}: protocols" in report
    assert "| 64 | 4 | grpc |" in report
