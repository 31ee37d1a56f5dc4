"""`mmoe bench --monitoring` on the tiny model: the graph against its --no-monitor export, the
recording, and three servers, every request answered. It asserts nothing about speed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import onnxruntime as ort
import pytest

from mmoe.bench.monitoring import SERVERS, SERVICE_ROUNDS


@pytest.mark.slow
def test_monitoring_cost_runs_without_errors(
    tiny_run: Path, tiny_onnx: Path, tiny_plain_onnx: Path, tiny_data: Path, tmp_path: Path
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
    args += ["--monitoring", "--candidates", "16", "--concurrency", "2", "--out", str(out)]
    proc = subprocess.run(
        [sys.executable, "-m", "mmoe", "bench", *args], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    (run_dir,) = (p for p in out.iterdir() if p.is_dir())
    (model,) = json.loads((run_dir / "results.json").read_text())["models"]
    found = model["monitoring"]
    # The comparison file is an export of the same run without the monitoring outputs.
    plain = ort.InferenceSession(found["plain_onnx"], providers=["CPUExecutionProvider"])
    monitored = ort.InferenceSession(str(tiny_onnx), providers=["CPUExecutionProvider"])
    plain_outputs = {o.name for o in plain.get_outputs()}
    extra = {o.name for o in monitored.get_outputs()} - plain_outputs
    assert extra and all(name.startswith("monitor/") for name in extra), extra
    (graph,) = found["graph"]
    assert graph["rows"] == 16 and set(graph["ratios"]) == {"no-monitor file"}
    assert graph["recording"]["ratio"] > 0
    (service,) = found["service"]
    assert len(service["rounds"]) == SERVICE_ROUNDS
    assert set(service["ratios"]) == {label for label, _, _ in SERVERS[1:]}
    assert all(n == 0 for n in service["errors"].values()), service["errors"]
    assert all(rps > 0 for r in service["rounds"] for rps in r.values())
    report = (run_dir / "report.md").read_text()
    assert f"### {model['name']}: what monitoring costs" in report
    assert "| service over HTTP | 16 | 2 | settings off |" in report


def test_a_file_without_monitoring_outputs_is_refused(
    tiny_run: Path, tiny_plain_onnx: Path, tiny_data: Path, tmp_path: Path
) -> None:
    args = ["--run", str(tiny_run), "--onnx", str(tiny_plain_onnx), "--data", str(tiny_data)]
    args += ["--quick", "--no-baseline", "--monitoring", "--out", str(tmp_path / "results")]
    proc = subprocess.run(
        [sys.executable, "-m", "mmoe", "bench", *args], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 2
    assert "has no monitoring outputs" in proc.stderr, proc.stderr[-2000:]
