"""`mmoe export --int8` prints its own report, not onnxruntime's quantization advice (which does
not fit these graphs: export/variants.py says why)."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest
from onnxruntime.quantization import QuantType, quantize_dynamic

from mmoe.export.variants import PRE_PROCESS_ADVICE


@pytest.mark.slow
def test_int8_export_prints_no_raw_quantizer_advice(tiny_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "model.onnx"
    cmd = [sys.executable, "-m", "mmoe", "export", str(tiny_run), "--out", str(out), "--int8"]
    proc = subprocess.run([*cmd, "--rows", "64"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "int8: max output drift" in proc.stdout
    assert (tmp_path / "model.int8.onnx").is_file()
    printed = proc.stdout + proc.stderr
    assert PRE_PROCESS_ADVICE not in printed, printed
    assert "WARNING:root" not in printed, printed


def test_onnxruntime_still_gives_the_advice_the_export_drops(
    tiny_onnx: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The export's filter matches this text: if onnxruntime words it differently, the advice is
    # back in the export's output; if it no longer gives it, the filter is dead code.
    with caplog.at_level(logging.WARNING):
        quantize_dynamic(
            tiny_onnx,
            tmp_path / "q.onnx",
            weight_type=QuantType.QInt8,
            op_types_to_quantize=["MatMul", "Gemm"],
        )
    messages = [r.getMessage() for r in caplog.records]
    assert any(PRE_PROCESS_ADVICE in m for m in messages), (
        "onnxruntime's quantizer no longer logs the advice export/variants.py filters out "
        f"(it logged {messages}): update or remove _skip_pre_process_advice"
    )
