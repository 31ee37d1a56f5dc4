"""The model benchmarks run: the MMoE paper comparison (its --quick mode) and batched against
separate experts."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from mmoe.bench import experts, paper_mmoe


def test_shared_bottom_has_mmoes_parameter_count() -> None:
    mmoe = paper_mmoe.num_params(paper_mmoe.build(paper_mmoe.EXPERTS, paper_mmoe.EXPERT_UNITS))
    units = paper_mmoe.shared_bottom_units()
    shared_bottom = paper_mmoe.make_model("Shared-Bottom")
    assert len(shared_bottom.gates) == 0 and shared_bottom.experts.units == [units]
    assert len(paper_mmoe.make_model("OMoE").gates) == 1
    assert abs(paper_mmoe.num_params(shared_bottom) - mmoe) / mmoe < 0.01


def test_paper_benchmark_quick_mode(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "paper.json"
    assert paper_mmoe.main(["--quick", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "| correlation | MMoE test MSE | OMoE test MSE | Shared-Bottom test MSE |" in table
    result = json.loads(out.read_text())
    assert [r["correlation"] for r in result["rows"]] == [0.5, 1.0]
    for row in result["rows"]:
        assert set(row["mse"]) == {"MMoE", "OMoE", "Shared-Bottom"}
        for (mse,) in row["mse"].values():  # one seed
            assert math.isfinite(mse) and 0 < mse < 50
        assert row["gap"] == pytest.approx(row["mse"]["Shared-Bottom"][0] - row["mse"]["MMoE"][0])


@pytest.mark.slow
def test_experts_benchmark_measures_both_variants(tmp_path: Path) -> None:
    result = experts.measure(12, 3, [8, 4], batch=16, repeat=3, tmp=tmp_path)
    for kind in ("torch", "train", "ort"):
        assert result[f"{kind}_batched"] > 0 and result[f"{kind}_separate"] > 0
