"""A task's loss as a weighted sum of terms (`tasks[i].losses`, EasyRec's `losses`): the pairwise
term against a direct computation, and what the config refuses; PLE layers of their own widths."""

from __future__ import annotations

import itertools
import math
from typing import Any

import pytest
import torch

from mmoe.model.config import ConfigError, TaskConfig, parse_config
from mmoe.model.losses import pairwise_loss, pointwise_loss, task_loss


def test_pairwise_loss_is_the_mean_over_ordered_pairs() -> None:
    z = torch.tensor([2.0, -1.0, 0.5, 3.0, 0.0])
    y = torch.tensor([1.0, 0.0, 1.0, float("nan"), 0.0])  # row 3 is not in the task
    rows = ~torch.isnan(y)
    want = [
        math.log1p(math.exp(0.3 - (z[i] - z[j])))
        for i, j in itertools.product(range(5), range(5))
        if rows[i] and rows[j] and y[i] > y[j]
    ]
    assert len(want) == 4
    got = pairwise_loss(z, y, rows, margin=0.3)
    assert float(got) == pytest.approx(sum(want) / len(want), rel=1e-6)
    # one class only: no pair, no loss
    assert float(pairwise_loss(z, torch.zeros(5), rows)) == 0.0


def test_task_loss_sums_its_weighted_terms() -> None:
    task = TaskConfig(
        name="ctr",
        label="clk",
        losses=[{"kind": "pointwise", "weight": 0.5}, {"kind": "pairwise", "weight": 2.0}],
    )
    plain = TaskConfig(name="ctr", label="clk")
    logits = torch.randn(64, 1)
    y = (torch.rand(64) < 0.3).float()
    w = torch.ones(64)
    want = 0.5 * pointwise_loss(plain, logits, y, w) + 2.0 * pairwise_loss(logits[:, 0], y, w > 0)
    assert float(task_loss(task, logits, y, w)) == pytest.approx(float(want), rel=1e-6)
    assert float(task_loss(plain, logits, y, w)) == float(pointwise_loss(plain, logits, y, w))


@pytest.mark.parametrize(
    ("task", "message"),
    [
        (
            {"kind": "multiclass", "num_class": 3, "losses": [{"kind": "pairwise"}]},
            "pairwise loss terms rank binary or regression labels",
        ),
        ({"losses": [{"kind": "pointwise", "margin": 1.0}]}, "`margin` is only for pairwise"),
        ({"losses": [{"kind": "listwise"}]}, r"tasks\[0\]\.losses\[0\]\.kind"),
    ],
)
def test_loss_terms_are_checked(
    tiny_dict: dict[str, Any], task: dict[str, Any], message: str
) -> None:
    tiny_dict["tasks"][0] |= task
    tiny_dict["tasks"][0]["metrics"] = []
    with pytest.raises(ConfigError, match=message):
        parse_config(tiny_dict)


def test_ple_layers_of_their_own_widths(tiny_dict: dict[str, Any]) -> None:
    from mmoe.model.checkpoint import build_model
    from mmoe.model.network import PLE
    from mmoe.model.schema import SchemaFitter
    from mmoe.model.synthetic import synthetic_ranking

    tiny_dict["model"] = {
        "kind": "ple",
        "experts": 2,
        "task_experts": 1,
        "ple_layers": 2,
        "expert_units": [16, 8],
        "ple_expert_units": [[16, 8], [6]],
    }
    config = parse_config(tiny_dict)
    schema = SchemaFitter(config).fit(synthetic_ranking(200, seed=1).to_batches())
    net = build_model(config, schema).net
    assert isinstance(net, PLE)
    widths = [layer.shared.units for layer in net.layers]  # type: ignore[union-attr]
    assert widths == [[16, 8], [6]]
    tiny_dict["model"]["ple_expert_units"] = [[16, 8]]
    with pytest.raises(ConfigError, match=r"model\.ple_expert_units: 1 layers' units"):
        parse_config(tiny_dict)
    tiny_dict["model"] = {"kind": "mmoe", "ple_expert_units": [[4]]}
    with pytest.raises(ConfigError, match=r"model\.ple_expert_units: only for kind: ple"):
        parse_config(tiny_dict)
