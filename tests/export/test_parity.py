"""Parity that proves without refusing correct models: rows drawn from what training saw, the
run's own validation rows, a tolerance judged at each row's float32 scale. Correct models on raw
numbers of real-world scale and on the MMoE paper's synthetic data export; a graph that computes
something else is refused."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
import yaml

from mmoe.export.assemble import assemble
from mmoe.export.exporter import export_run
from mmoe.export.parity import (
    ParityError,
    check_parity,
    generate_rows,
    join_columns,
    sample_rows,
    to_onnx_inputs,
    torch_outputs,
)
from mmoe.model.checkpoint import load_run
from mmoe.model.config import parse_config
from mmoe.model.data import write_table
from mmoe.model.synthetic import synthetic_ranking
from mmoe.model.train import train
from tests.cli import mmoe
from tests.onnx_files import edit_weights


@pytest.fixture(scope="module")
def scale_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Binary and regression tasks on raw prices and counts up to 1e6, no transform."""
    tmp = tmp_path_factory.mktemp("scale")
    table = synthetic_ranking(4000, seed=2)
    rng = np.random.default_rng(0)
    n = table.num_rows
    views = np.minimum(np.round(rng.lognormal(9, 2.5, n)), 1e6)
    views[:3] = [0, 1e6, 999_999]
    price = np.round(rng.lognormal(4, 1.5, n), 2)
    revenue = 0.3 * price + 1e-4 * views + rng.normal(0, 5, n)
    table = (
        table.append_column("views", pa.array(views))
        .append_column("list_price", pa.array(price))
        .append_column("revenue", pa.array(revenue))
    )
    write_table(table, tmp / "train.parquet")
    config = {
        "name": "scale",
        "version": "1",
        "features": [
            {"name": "category", "kind": "categorical", "embedding_dim": 4},
            {"name": "list_price", "kind": "numeric"},
            {"name": "views", "kind": "numeric", "default": 0.0},
        ],
        "tasks": [
            {"name": "ctr", "label": "clk", "tower": [8]},
            {"name": "revenue", "label": "revenue", "kind": "regression", "tower": [8]},
        ],
        "model": {"experts": 2, "expert_units": [16]},
        "train": {"batch_size": 256, "epochs": 2, "lr": 0.01, "seed": 1, "progress": False},
    }
    train(parse_config(config), tmp / "train.parquet", tmp / "run")
    return tmp / "run"


@pytest.mark.slow
def test_raw_numbers_of_real_world_scale_export(scale_run: Path, tmp_path: Path) -> None:
    run = load_run(scale_run)
    views = run.schema["views"].stats
    assert views is not None and views.max == 1e6 and views.min == 0
    report = export_run(scale_run, tmp_path / "m.onnx", parity_rows=512)
    assert report.sample_rows > 100  # real validation rows were checked too
    assert report.parity_fraction_of_allowed < 1
    # The regression output runs to hundreds: float32 alone differs there by more than 1e-5.
    revenue = torch_outputs(run.model, run.schema, sample_rows(scale_run, run.schema) or {})
    assert np.abs(revenue["y_revenue"]).max() > 100


@pytest.mark.slow
def test_a_model_on_the_paper_synthetic_data_exports(tmp_path: Path) -> None:
    """Ma et al.'s data (100 inputs ~ N(0, 1), two regression tasks): refused before parity
    rows were drawn from what training saw ("y_t2 differs by 1.81e-05 (> 1e-05)")."""
    data = tmp_path / "paper.parquet"
    mmoe("data", "paper-synthetic", "--correlation", "0.5", "--rows", "4000", "--out", str(data))
    config = {
        "name": "paper",
        "version": "1",
        "features": [{"name": f"x{i}", "kind": "numeric"} for i in range(100)],
        "tasks": [
            {"name": "t1", "label": "y1", "kind": "regression", "tower": [8]},
            {"name": "t2", "label": "y2", "kind": "regression", "tower": [8]},
        ],
        "model": {"experts": 8, "expert_units": [16]},
        "train": {"batch_size": 128, "epochs": 3, "lr": 0.005, "seed": 2, "progress": False},
    }
    (tmp_path / "paper.yaml").write_text(yaml.safe_dump(config))
    run = tmp_path / "run"
    mmoe("train", "--config", str(tmp_path / "paper.yaml"), "--data", str(data), "--out", str(run))
    printed = mmoe("export", str(run), "--out", str(tmp_path / "paper.onnx"))
    assert "parity on" in printed and "golden rows stored" in printed


def test_generated_rows_stay_near_what_training_saw(tiny_run: Path) -> None:
    run = load_run(tiny_run)
    stats = run.schema["price"].stats
    assert stats is not None
    prices = [v for v in generate_rows(run.schema, 2000)["price"] if v is not None]
    span = stats.max - stats.min
    assert min(prices) >= stats.min - 0.1 * span and max(prices) <= stats.max + 0.1 * span
    assert stats.min in prices and stats.max in prices  # the extremes themselves
    # Most values lie between the 1st and 99th percentiles, as training's did.
    inside = np.mean([stats.quantiles["p1"] <= v <= stats.quantiles["p99"] for v in prices])
    assert inside > 0.8


def test_an_onnx_graph_whose_weights_changed_is_refused(tiny_run: Path, tmp_path: Path) -> None:
    run = load_run(tiny_run)
    path = tmp_path / "m.onnx"
    path.write_bytes(assemble(run).SerializeToString())
    cols = join_columns(
        run.schema, [generate_rows(run.schema, 256), sample_rows(tiny_run, run.schema) or {}]
    )
    assert check_parity(run.model, run.schema, path.read_bytes(), cols).fraction_of_allowed < 1
    for factor in (1.1, 1.01):
        edit_weights(path, tmp_path / "edited.onnx", factor)
        with pytest.raises(ParityError, match="differs by"):
            check_parity(run.model, run.schema, (tmp_path / "edited.onnx").read_bytes(), cols)


def test_tags_sent_as_one_string_are_split_as_training_splits_them(tiny_run: Path) -> None:
    """A separated string and the same tags as a list are one input, on both sides (parity once
    turned a string into no tags at all)."""
    run = load_run(tiny_run)
    row: dict[str, list[Any]] = {
        "user_id": ["u1"] * 3,
        "category": ["c1"] * 3,
        "price": [3.0] * 3,
        "hour": [9.0] * 3,
    }
    cols = row | {"tag_brand_list": ["b1|b2||b3", ["b1", "b2", "b3"], []]}
    feeds = to_onnx_inputs(run.schema, cols)
    assert feeds["tag_brand_list"][0].tolist() == ["b1", "b2", "b3", ""]
    assert feeds["tag_brand_list"][0].tolist() == feeds["tag_brand_list"][1].tolist()
    torch_side = torch_outputs(run.model, run.schema, cols)["probs_ctr"]
    assert torch_side[0] == torch_side[1] != torch_side[2]
    check_parity(run.model, run.schema, assemble(run).SerializeToString(), cols)
