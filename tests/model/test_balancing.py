"""Task balancing (`train.loss_weighting`): config validation, and the learned weights moving
the way the methods say on a problem whose two losses differ by orders of magnitude."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, cast

import numpy as np
import pyarrow as pa
import pytest
import torch

from mmoe.model.config import ConfigError, TaskConfig, parse_config
from mmoe.model.data import write_table
from mmoe.model.losses import GradNorm, UncertaintyWeighting, task_balancer
from mmoe.model.synthetic import synthetic_ranking
from mmoe.model.train import train


@pytest.fixture(scope="module")
def two_scales(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Clicks, and a regression label in the hundreds (its MSE is ~1e3 times the log loss)."""
    table = synthetic_ranking(3000, seed=5)
    rng = np.random.default_rng(0)
    price = np.nan_to_num(table.column("price").to_numpy(zero_copy_only=False), nan=20.0)
    dwell = 100 * np.log1p(price) + 30 * rng.normal(size=len(price))
    table = table.append_column("dwell", pa.array(dwell))
    path = tmp_path_factory.mktemp("scales") / "scales.parquet"
    write_table(table, path)
    return path


def scales_config(tiny_dict: dict[str, Any], weighting: Any) -> dict[str, Any]:
    tiny_dict["tasks"][1] = {"name": "dwell", "label": "dwell", "kind": "regression", "tower": [8]}
    tiny_dict["train"] |= {"epochs": 2, "loss_weighting": weighting}
    return tiny_dict


def test_loss_weighting_accepts_a_name_or_a_mapping(tiny_dict: dict[str, Any]) -> None:
    tiny_dict["train"]["loss_weighting"] = "uncertainty"
    assert parse_config(tiny_dict).train.loss_weighting.kind == "uncertainty"
    tiny_dict["train"]["loss_weighting"] = {"kind": "gradnorm", "alpha": 0.5}
    lw = parse_config(tiny_dict).train.loss_weighting
    assert lw.kind == "gradnorm" and lw.alpha == 0.5
    assert parse_config({**tiny_dict, "train": {}}).train.loss_weighting.kind == "fixed"


@pytest.mark.parametrize(
    ("weighting", "where"),
    [
        ("equal", "train.loss_weighting.kind"),
        ({"kind": "uncertainty", "alpha": 1.0}, "train.loss_weighting.alpha"),
        ({"kind": "fixed", "lr": 0.1}, "train.loss_weighting.lr"),
        ({"kind": "gradnorm", "alpha": -1}, "train.loss_weighting.alpha"),
        ({"kind": "gradnorm", "beta": 1}, "train.loss_weighting.beta"),
    ],
)
def test_bad_loss_weighting_names_its_key_path(
    tiny_dict: dict[str, Any], weighting: Any, where: str
) -> None:
    tiny_dict["train"]["loss_weighting"] = weighting
    with pytest.raises(ConfigError, match=where.replace(".", r"\.")):
        parse_config(tiny_dict)


def test_learned_weighting_needs_two_tasks(tiny_dict: dict[str, Any]) -> None:
    tiny_dict["tasks"] = tiny_dict["tasks"][:1]
    tiny_dict["train"]["loss_weighting"] = "gradnorm"
    with pytest.raises(ConfigError, match=r"train\.loss_weighting\.kind: gradnorm balances two"):
        parse_config(tiny_dict)


def test_uncertainty_forms_match_the_paper() -> None:
    tasks = [
        TaskConfig(name="c", label="c"),
        TaskConfig(name="r", label="r", kind="regression", weight=2.0),
    ]
    u = UncertaintyWeighting(tasks)
    with torch.no_grad():
        u.log_var.copy_(torch.tensor([np.log(4.0), np.log(9.0)]))  # sigma = 2, 3
    losses = torch.tensor([0.5, 10.0])
    want = (0.5 / 4 + np.log(2.0)) + 2.0 * (10.0 / (2 * 9) + np.log(3.0))
    assert float(u(losses).detach()) == pytest.approx(want, rel=1e-6)
    assert u.weights() == pytest.approx([1 / 4, 2.0 / 18], rel=1e-6)


def test_uncertainty_starts_at_the_first_steps_optimum() -> None:
    tasks = [TaskConfig(name="c", label="c"), TaskConfig(name="r", label="r", kind="regression")]
    u = UncertaintyWeighting(tasks)
    losses = torch.tensor([0.7, 5000.0], requires_grad=True)
    u.step(losses, None)
    (grad,) = torch.autograd.grad(u(losses), u.log_var)
    assert grad.abs().max() < 1e-5  # d/ds = 0: the optimum for these losses
    assert u.weights() == pytest.approx([1 / 1.4, 1 / (2 * 5000.0)], rel=1e-5)
    u.step(losses * 2, None)  # only the first step sets it
    assert u.weights() == pytest.approx([1 / 1.4, 1 / (2 * 5000.0)], rel=1e-5)


def test_gradnorm_moves_weight_to_the_task_with_the_smaller_gradient() -> None:
    """Two tasks on one shared layer, one with 100x the gradient: its weight falls, the other's
    rises, and they keep summing to the number of tasks."""
    tasks = [TaskConfig(name="a", label="a"), TaskConfig(name="b", label="b")]
    g = GradNorm(tasks, alpha=1.5, lr=0.05)
    shared = torch.nn.Parameter(torch.randn(4, 4))
    x = torch.randn(32, 4)
    for _ in range(30):
        h = x @ shared
        losses = torch.stack([h.pow(2).mean(), 100 * h.pow(2).mean()])
        g.step(losses, shared)
    wa, wb = g.weights()
    assert wa > 1.5 and wb < 0.5 and wa + wb == pytest.approx(2.0, rel=1e-5)


def test_gradnorm_starts_with_equal_weighted_gradient_norms() -> None:
    tasks = [TaskConfig(name="a", label="a"), TaskConfig(name="b", label="b")]
    g = GradNorm(tasks, alpha=1.5, lr=1e-9)  # no learning: the start alone
    shared = torch.nn.Parameter(torch.randn(4, 4))
    h = torch.randn(32, 4) @ shared
    losses = torch.stack([h.pow(2).mean(), 1000 * h.pow(2).mean()])
    g.step(losses, shared)
    wa, wb = g.weights()
    assert wa / wb == pytest.approx(1000, rel=1e-3) and wa + wb == pytest.approx(2.0)


def test_task_balancer_follows_the_config(tiny_dict: dict[str, Any]) -> None:
    tiny_dict["tasks"][1]["weight"] = 3.0
    assert task_balancer(parse_config(tiny_dict)).weights() == [1.0, 3.0]
    tiny_dict["train"]["loss_weighting"] = {"kind": "gradnorm", "alpha": 0.7}
    balancer = task_balancer(parse_config(tiny_dict))
    assert isinstance(balancer, GradNorm) and balancer.alpha == 0.7


@pytest.mark.parametrize("kind", ["fixed", "uncertainty", "gradnorm"])
def test_learned_weights_shrink_the_large_scale_task(
    tiny_dict: dict[str, Any], two_scales: Path, tmp_path: Path, kind: str
) -> None:
    """Per epoch in metrics.json; with a loss ~1e3x larger, the regression task's learned
    weight ends orders of magnitude below the click task's (fixed keeps 1 and 1)."""
    train(parse_config(scales_config(tiny_dict, kind)), two_scales, tmp_path / "run")
    epochs = json.loads((tmp_path / "run" / "metrics.json").read_text())["epochs"]
    weights = [e["task_weights"] for e in epochs]
    assert all(set(w) == {"ctr", "dwell"} for w in weights)
    last = weights[-1]
    if kind == "fixed":
        assert weights == [{"ctr": 1.0, "dwell": 1.0}] * 2
    else:
        assert last["dwell"] < 0.01 * last["ctr"]


@pytest.fixture(scope="module")
def scaled_paper(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[float]]:
    """The MMoE paper's two regressions (correlation 0.5) with the second label x1000: MSEs
    ~1e6 apart. Training and validation files, and each label's validation variance."""
    from mmoe.model.synthetic import paper_synthetic

    table = paper_synthetic(5000, 0.5, seed=1)
    y2 = table.column("y2").to_numpy() * 1000
    table = table.set_column(table.schema.get_field_index("y2"), "y2", pa.array(y2))
    tmp = tmp_path_factory.mktemp("scaled")
    write_table(table.slice(0, 4000), tmp / "train.parquet")
    write_table(table.slice(4000), tmp / "valid.parquet")
    valid = table.slice(4000)
    variances = [float(np.var(valid.column(c).to_numpy())) for c in ("y1", "y2")]
    return tmp / "train.parquet", tmp / "valid.parquet", variances


@pytest.mark.parametrize("kind", ["fixed", "uncertainty", "gradnorm"])
def test_learned_weights_recover_the_small_task_at_a_million_fold_loss_ratio(
    scaled_paper: tuple[Path, Path, list[float]], tmp_path: Path, kind: str
) -> None:
    """`fixed` leaves the small task near its variance (the large one owns the experts); the
    learned weights train both, the large task included (it used to stay worse than its mean
    under `uncertainty`: its tower could not grow to the label's scale, see LabelScale)."""
    train_path, valid_path, variances = scaled_paper
    config = parse_config(
        {
            "features": [{"name": f"x{i}", "kind": "numeric"} for i in range(100)],
            "tasks": [
                {"name": n, "label": n, "kind": "regression", "tower": [8], "metrics": ["mse"]}
                for n in ("y1", "y2")
            ],
            "model": {"experts": 8, "expert_units": [16]},
            "train": {"batch_size": 128, "epochs": 3, "lr": 0.002, "progress": False,
                      "loss_weighting": kind},
        }
    )  # fmt: skip
    history = train(config, train_path, tmp_path / "run", valid_path)
    small, large = (
        history.epochs[-1]["valid"][f"mse_{n}"] / v
        for n, v in zip(("y1", "y2"), variances, strict=True)
    )
    if kind == "fixed":
        assert small > 0.5 and large < 0.1, (small, large)
    else:
        assert small < 0.2 and large < 0.1, (small, large)


def test_a_regression_tower_outputs_in_its_labels_units(
    tiny_dict: dict[str, Any], two_scales: Path, tmp_path: Path
) -> None:
    """LabelScale: set from the first batch's labels, saved with the weights, loaded back."""
    import pyarrow.parquet as pq

    from mmoe.model.checkpoint import load_run
    from mmoe.model.network import LabelScale

    train(parse_config(scales_config(tiny_dict, "fixed")), two_scales, tmp_path / "run")
    towers = load_run(tmp_path / "run").model.net.towers
    scale = cast(torch.nn.Sequential, cast(torch.nn.ModuleList, towers)[1])[-1]
    assert isinstance(scale, LabelScale)
    dwell = pq.read_table(two_scales).column("dwell").to_numpy()
    assert float(scale.shift) == pytest.approx(dwell.mean(), rel=0.1)
    assert float(scale.scale) == pytest.approx(dwell.std(), rel=0.2)

    # A run saved before towers ended in a LabelScale has none: it loads with the identity;
    # any other missing or unexpected weight is still refused.
    older = tmp_path / "older"
    shutil.copytree(tmp_path / "run", older)
    state = torch.load(older / "weights.pt", weights_only=True)
    old = {k: v for k, v in state.items() if not k.endswith((".scale", ".shift"))}
    assert len(old) < len(state)
    torch.save(old, older / "weights.pt")
    scales = [m for m in load_run(older).model.modules() if isinstance(m, LabelScale)]
    assert scales and all(float(m.scale) == 1.0 and float(m.shift) == 0.0 for m in scales)
    old.pop(next(iter(old)))
    torch.save(old, older / "weights.pt")
    with pytest.raises(RuntimeError, match="does not fit its config"):
        load_run(older)
