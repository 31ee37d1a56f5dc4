"""`mmoe bench paper-census` on the real census-income rows in ../shared/data, tiny: the paper's
two tasks, a split of the test file, and AUC measured through the exported ONNX file."""

from __future__ import annotations

from pathlib import Path

import pytest

from mmoe.bench.census import CATEGORICAL, NOT_FEATURES, NUMERIC, read_census
from mmoe.bench.paper_census import Setting, run, splits, table
from mmoe.bench.run import main

CENSUS = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "census-income"
TEST_FILE = CENSUS / "census-income.test.gz"


def test_census_rows_and_the_papers_tasks() -> None:
    rows = read_census(TEST_FILE)
    assert rows.num_rows == 99_762
    # income > 50K in 6.2% of the rows, never married in 43.3% (the data's README)
    assert sum(rows.column("income").to_pylist()) / rows.num_rows == pytest.approx(0.062, abs=1e-3)
    assert sum(rows.column("marital").to_pylist()) / rows.num_rows == pytest.approx(0.433, abs=1e-3)
    assert len(CATEGORICAL) + len(NUMERIC) + len(NOT_FEATURES) == 42  # every column, once
    parts = splits(TEST_FILE, None)
    assert [parts[k].num_rows for k in ("train", "valid", "test")] == [49_881, 24_940, 24_941]


@pytest.mark.slow  # the ONNX export of a 32-table model takes most of it
def test_a_tiny_run_scores_through_the_exported_file(tmp_path: Path) -> None:
    setting = Setting(seeds=1, epochs=2, models=("MMoE",), rows=3000)
    (result,) = run(setting, TEST_FILE, None, log=False)
    income, marital = result.auc["income"][0], result.auc["marital"][0]
    assert 0.75 < income < 1 and 0.85 < marital < 1, (income, marital)
    assert result.epochs == [2] and result.epoch_seconds[0] > 0
    assert "| MMoE | " in table([result]) and "paper's MMoE" in table([result])


def test_the_command_and_a_missing_file(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stop:
        main(["paper-census", "--data", str(CENSUS / "census-income.data.gz")])
    assert stop.value.code == 2
    assert "docs/paper_census.md says where to download it" in capsys.readouterr().err
