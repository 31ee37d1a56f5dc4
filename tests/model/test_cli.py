"""`mmoe data`, `mmoe train` (also under torchrun) and `mmoe report` through the command line
entry point, and the generated data sets."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest
import yaml

from mmoe.cli import main
from mmoe.model.synthetic import paper_synthetic, synthetic_ranking
from tests.conftest import TINY_CONFIG


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def test_report_writes_curves_and_gate_heatmap(
    tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["report", str(tiny_run), "--out", str(tmp_path / "report")]) == 0
    printed = capsys.readouterr().out.split()
    names = ["curves.png", "task_weights.png", "experts.png", "gates.png"]
    assert printed == [str(tmp_path / "report" / name) for name in names]
    for name in names:
        width, height = png_size(tmp_path / "report" / name)
        assert width > 200 and height > 100


def test_report_of_a_multi_epoch_ple_run(
    tiny_dict: dict[str, Any], tiny_data: Path, tmp_path: Path
) -> None:
    tiny_dict["model"] = {"kind": "ple", "experts": 2, "task_experts": 2, "expert_units": [8]}
    tiny_dict["train"]["epochs"] = 2
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(tiny_dict))
    run_dir = tmp_path / "run"
    assert (
        main(["train", "--config", str(config), "--data", str(tiny_data), "--out", str(run_dir)])
        == 0
    )
    assert main(["report", str(run_dir)]) == 0
    assert png_size(run_dir / "report" / "curves.png")[0] > 200
    assert png_size(run_dir / "report" / "gates.png")[0] > 200
    assert png_size(run_dir / "report" / "experts.png")[0] > 200


def test_report_of_a_missing_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", str(tmp_path)]) == 2
    assert "has no metrics.json" in capsys.readouterr().err


def test_train_reports_config_errors_with_the_key_path(
    tiny_dict: dict[str, Any], tiny_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tiny_dict["tasks"][1]["kind"] = "ranking"
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(tiny_dict))
    code = main(
        ["train", "--config", str(config), "--data", str(tiny_data), "--out", str(tmp_path / "r")]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "tasks[1].kind" in err
    assert not (tmp_path / "r").exists()


def test_train_reports_data_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        [
            "train",
            "--config",
            str(TINY_CONFIG),
            "--data",
            str(tmp_path / "x.parquet"),
            "--out",
            str(tmp_path / "r"),
        ]
    )
    assert code == 2
    assert "data file not found" in capsys.readouterr().err


def test_data_synthetic_ranking(tmp_path: Path) -> None:
    out = tmp_path / "rank.csv"
    assert (
        main(["data", "synthetic-ranking", "--rows", "500", "--seed", "3", "--out", str(out)]) == 0
    )
    table = pcsv.read_csv(out)
    assert table.num_rows == 500
    assert {"user_id", "item_id", "price", "tag_brand_list", "clk", "buy"} <= set(
        table.column_names
    )
    expected = synthetic_ranking(500, seed=3)
    assert table.column("clk").to_pylist() == expected.column("clk").to_pylist()
    buy, clk = np.array(table.column("buy").to_pylist()), np.array(table.column("clk").to_pylist())
    assert (buy <= clk).all()  # purchases follow clicks


def test_data_paper_synthetic_flags(tmp_path: Path) -> None:
    out = tmp_path / "paper.parquet"
    args = ["data", "paper-synthetic", "--correlation", "0.5", "--rows", "300", "--dim", "8"]
    args += ["--sines", "3", "--scale", "2", "--noise", "0.1", "--seed", "4", "--out", str(out)]
    assert main(args) == 0
    table = pq.read_table(out)
    assert table.column_names == [f"x{i}" for i in range(8)] + ["y1", "y2"]
    expected = paper_synthetic(300, 0.5, dim=8, num_sines=3, scale=2, noise_std=0.1, seed=4)
    assert table.equals(expected)
    with pytest.raises(SystemExit):
        main(["data", "paper-synthetic", "--rows", "10", "--out", str(out)])  # no --correlation


def _task_directions(table: Any, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares fits of y1, y2 on x: with no sines they recover w1 and w2."""
    x = np.stack([table.column(f"x{i}").to_numpy() for i in range(dim)], axis=1)
    w = [np.linalg.lstsq(x, table.column(y).to_numpy(), rcond=None)[0] for y in ("y1", "y2")]
    return w[0], w[1]


@pytest.mark.parametrize("p", [-0.3, 0.0, 0.5, 0.9, 1.0])
def test_paper_synthetic_task_correlation(p: float) -> None:
    """w1 = c*u1, w2 = c*(p*u1 + sqrt(1-p^2)*u2): the cosine of the task weights is p."""
    table = paper_synthetic(4000, p, dim=20, num_sines=0, scale=1.5, noise_std=0.01, seed=1)
    w1, w2 = _task_directions(table, 20)
    assert np.linalg.norm(w1) == pytest.approx(1.5, rel=1e-3)
    cosine = w1 @ w2 / np.linalg.norm(w1) / np.linalg.norm(w2)
    assert cosine == pytest.approx(p, abs=1e-3)


def test_paper_synthetic_sines_noise_and_seeds() -> None:
    a = paper_synthetic(2000, 1.0, seed=0)
    b = paper_synthetic(2000, 1.0, seed=0)
    assert a.equals(b)
    y1, y2 = a.column("y1").to_numpy(), a.column("y2").to_numpy()
    # correlation 1: the two labels differ only by their noise (std 0.01 each)
    assert np.std(y1 - y2) == pytest.approx(0.01 * np.sqrt(2), rel=0.1)
    # the sines make y non-linear in x: a linear fit leaves a large residual
    w1, _ = _task_directions(a, 100)
    x = np.stack([a.column(f"x{i}").to_numpy() for i in range(100)], axis=1)
    assert np.var(y1 - x @ w1) > 0.2  # vs the noise variance of 1e-4
    c = paper_synthetic(2000, 1.0, seed=1)
    assert not np.allclose(c.column("y1").to_numpy(), y1)
    with pytest.raises(ValueError, match="correlation must be in"):
        paper_synthetic(10, 1.5)


def test_paper_synthetic_index_sines_follow_the_formula() -> None:
    """alpha_j = j + 1, beta_j = j^2: y minus its noise is exactly z + sum sin(alpha z + beta)."""
    t = paper_synthetic(500, 1.0, dim=10, num_sines=4, noise_std=0.0, seed=3, sine_params="index")
    x = np.stack([t.column(f"x{i}").to_numpy() for i in range(10)], axis=1)
    u1 = np.linalg.qr(np.random.default_rng(3).normal(size=(10, 2)))[0][:, 0]  # seed 3's u1
    z = x @ u1
    want = z + sum(np.sin((j + 1) * z + j**2) for j in range(4))
    np.testing.assert_allclose(t.column("y1").to_numpy(), want, atol=1e-9)
    with pytest.raises(ValueError, match="sine_params must be"):
        paper_synthetic(10, 0.5, sine_params="uniform")


def test_metrics_json_is_plain_json(tiny_run: Path) -> None:
    metrics = json.loads((tiny_run / "metrics.json").read_text())
    assert isinstance(metrics["epochs"][0]["valid"]["auc_ctr"], float)


def test_train_refuses_a_non_empty_out_dir_unless_overwrite(
    tiny_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    (out / "report").mkdir(parents=True)
    (out / "report" / "stale.png").write_bytes(b"old")
    args = ["train", "--config", str(TINY_CONFIG), "--data", str(tiny_data), "--out", str(out)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"--out {out} exists and is not empty; pass --overwrite" in err
    assert (out / "report" / "stale.png").exists()  # untouched
    assert main([*args, "--config", str(tmp_path / "missing.yaml"), "--overwrite"]) == 2
    assert (out / "report" / "stale.png").exists()  # a bad config clears nothing
    assert main([*args, "--overwrite"]) == 0
    assert not (out / "report").exists() and (out / "weights.pt").exists()
    assert main([*args, "--overwrite"]) == 0  # again over its own run: the Makefile's case


def test_torchrun_runs_mmoe_train(tiny_data: Path, tmp_path: Path) -> None:
    """`torchrun -m mmoe train ARGS` is `mmoe train ARGS` in each process (one here: the
    two-process run is tests/model/test_ddp.py's)."""
    out = tmp_path / "run"
    command = [
        *("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"),
        *("-m", "mmoe", "train", "--config", str(TINY_CONFIG), "--data", str(tiny_data)),
        *("--out", str(out), "train.epochs=1"),
    ]
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK")}
    proc = subprocess.run(
        [sys.executable, *command], capture_output=True, text=True, timeout=300, env=env
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "run written to" in proc.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 1 and len(metrics["epochs"]) == 1
