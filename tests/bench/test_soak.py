"""bench/soak.py works: a few seconds of mixed traffic against a real server, and its report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mmoe.bench.soak import main


def test_soak_runs_mixed_traffic_and_reports(tiny_context_onnx: Path, tmp_path: Path) -> None:
    """On a model with request context declared, as the demo's: the soak splits the features
        between `context` and `candidates` at random, and any answer but the expected one (a 5xx
    among them), other than a shed, is an error."""
    out = tmp_path / "soak.json"
    model = str(tiny_context_onnx)
    argv = [sys.executable, "-m", "mmoe.bench.soak", "--model", model, "--duration", "3"]
    argv += ["--max-requests", "400", "--concurrency", "8", "--sample", "1", "--json", str(out)]
    argv += ["--server-env", "MMOE_MAX_QUEUE=1"]  # some requests may be shed: not errors
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    assert 0 < report["requests"] <= 400
    assert report["errors"] == 0, report["errors_by_kind"]
    assert set(report["sheds_by_code"]) <= {"overloaded", "server busy: queue full"}
    kinds = set(report["requests_by_kind"])
    assert any(k.startswith("predict-") for k in kinds) and "kserve-32" in kinds
    assert kinds & {"truncated-json", "duplicate-key", "float-ids", "too-many-rows"}
    assert report["rss_start_mb"] > 0 and report["rss_end_mb"] > 0
    assert "requests in" in proc.stdout and "RSS" in proc.stdout


def test_soak_refuses_a_non_loopback_target() -> None:
    with pytest.raises(SystemExit, match="loopback"):
        main(["--url", "http://10.1.2.3:8000", "--duration", "1"])
