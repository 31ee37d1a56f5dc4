"""ESMM on the entire space (`tasks[i].multiply`): config validation, and the product being what
is trained (its log loss over every impression)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from mmoe.model.batches import encode_table
from mmoe.model.checkpoint import load_run
from mmoe.model.config import ConfigError, TaskConfig, parse_config
from mmoe.model.evaluation import predict
from mmoe.model.losses import task_loss
from mmoe.model.train import train


def esmm(tiny_dict: dict[str, Any], **cvr: Any) -> dict[str, Any]:
    tiny_dict["tasks"][1] |= {"multiply": "ctr", "product": "ctcvr"} | cvr
    return tiny_dict


@pytest.mark.parametrize(
    ("cvr", "where"),
    [
        ({"multiply": "nope"}, r"tasks\[1\]\.multiply: 'nope' is not another task"),
        ({"multiply": "cvr"}, r"tasks\[1\]\.multiply: 'cvr' is not another task"),
        ({"product": "ctr"}, r"tasks\[1\]\.product: 'ctr' is already the name"),
        (
            {"only_where": {"clk": 1}},
            r"tasks\[1\]: `multiply` trains on every row.*drop `only_where`",
        ),
        ({"kind": "regression", "metrics": ["mse"]}, r"tasks\[1\]: `multiply` is for binary tasks"),
    ],
)
def test_bad_products_name_their_key_path(
    tiny_dict: dict[str, Any], cvr: dict[str, Any], where: str
) -> None:
    with pytest.raises(ConfigError, match=where):
        parse_config(esmm(tiny_dict, **cvr))


def test_a_product_needs_a_binary_task_that_is_no_product(tiny_dict: dict[str, Any]) -> None:
    tiny_dict["tasks"][0] |= {"kind": "regression", "metrics": ["mse"]}
    with pytest.raises(ConfigError, match=r"tasks\[1\]\.multiply: 'ctr' must be a binary"):
        parse_config(esmm(tiny_dict))
    tiny_dict["tasks"][1]["product"] = None
    # cvr x ctr is ctcvr, as EasyRec's and DeepCTR's ESMM name it; other pairs <multiply>_<name>
    assert TaskConfig(name="cvr", label="buy", multiply="ctr").product_name == "ctcvr"
    assert TaskConfig(name="buy", label="buy", multiply="click").product_name == "click_buy"


def test_product_metrics_can_stop_early(tiny_dict: dict[str, Any]) -> None:
    esmm(tiny_dict)["train"]["early_stopping"] = {"metric": "auc_ctcvr"}
    config = parse_config(tiny_dict)
    assert {"auc_cvr", "auc_ctcvr"} <= set(config.metric_names)


def test_the_loss_is_the_log_loss_of_the_product() -> None:
    task = TaskConfig(name="cvr", label="buy", multiply="ctr")
    torch.manual_seed(0)
    z_cvr, z_ctr = torch.randn(64, 1) * 3, torch.randn(64, 1) * 3
    y = (torch.rand(64) < 0.2).float()
    w = torch.ones(64)
    product = torch.sigmoid(z_cvr[:, 0]) * torch.sigmoid(z_ctr[:, 0])
    want = F.binary_cross_entropy(product.double(), y.double())
    assert float(task_loss(task, z_cvr, y, w, z_ctr)) == pytest.approx(float(want), rel=1e-5)
    # and it differs from the loss on pCVR alone
    assert float(task_loss(task, z_cvr, y, w)) != pytest.approx(float(want), rel=1e-2)


def test_esmm_trains_the_product_over_every_impression(
    tiny_dict: dict[str, Any], tiny_data: Path, tmp_path: Path
) -> None:
    """Trained on pCTCVR against buy over all rows, pCTCVR is calibrated to the buy rate of all
    rows and pCVR to the buy rate of the clicked rows (several times higher): a loss on pCVR
    over all rows would pull pCVR to the overall rate."""
    tiny_dict["train"] |= {"epochs": 3}
    tiny_dict["model"]["l2"] = 0.0
    train(parse_config(esmm(tiny_dict)), tiny_data, tmp_path / "run")
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert {"auc_ctr", "auc_cvr", "auc_ctcvr", "loss"} <= set(metrics["best"])
    run = load_run(tmp_path / "run")
    table = pq.read_table(tiny_data)
    out = predict(run.model, encode_table(table, run.schema, run.config.tasks))
    np.testing.assert_allclose(out["probs_ctcvr"], out["probs_ctr"] * out["probs_cvr"], rtol=1e-6)
    clk = table.column("clk").to_numpy().astype(bool)
    buy = table.column("buy").to_numpy().astype(float)
    assert out["probs_ctcvr"].mean() == pytest.approx(buy.mean(), rel=0.5)
    assert out["probs_cvr"][clk].mean() == pytest.approx(buy[clk].mean(), rel=0.5)
    assert out["probs_cvr"][clk].mean() > 2 * buy.mean()
