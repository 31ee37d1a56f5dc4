"""The network as a Python API: ExpertBank, MMoE (and OMoE / Shared-Bottom), PLE, SENet, the
feature embeddings and the output heads, built in code without a config."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mmoe.model.network import (
    PLE,
    ExpertBank,
    FeatureEmbedding,
    FeatureSpec,
    Gate,
    MMoE,
    RankingModel,
    SENet,
    TaskHead,
    task_outputs,
)

TASKS = [
    TaskHead("ctr"),
    TaskHead("dwell", "regression", (8,)),
    TaskHead("rating", "multiclass", (), 3),
]


@pytest.mark.parametrize("batch_norm", [False, True])
@pytest.mark.parametrize("units", [[8], [16, 8, 4]])
def test_expert_bank_equals_separate_experts(units: list[int], batch_norm: bool) -> None:
    torch.manual_seed(0)
    bank = ExpertBank(12, 5, units, activation="tanh", batch_norm=batch_norm)
    if batch_norm:  # give the norms statistics of their own
        bank.train()
        for _ in range(3):
            bank(torch.randn(64, 12) * 3 + 1)
    bank.eval()
    x = torch.randn(33, 12)
    out = bank(x)
    assert out.shape == (5, 33, units[-1])
    separate = torch.stack([expert(x) for expert in bank.as_modules()])
    torch.testing.assert_close(out, separate, rtol=1e-5, atol=1e-5)


def test_experts_are_initialised_independently() -> None:
    torch.manual_seed(0)
    bank = ExpertBank(32, 8, [16, 8])
    for w, b in zip(bank.weights, bank.biases, strict=True):
        flat = w.detach().flatten(1)
        # every pair of experts differs, and is no more alike than two random draws
        corr = torch.corrcoef(flat)
        off_diagonal = corr[~torch.eye(8, dtype=torch.bool)]
        assert off_diagonal.abs().max() < 0.3
        assert len({tuple(v.tolist()) for v in b.detach()}) == 8
        # nn.Linear's default init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
        bound = 1 / w.shape[1] ** 0.5
        assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound
    x = torch.randn(16, 32)
    h = bank(x)
    assert all(not torch.allclose(h[0], h[k]) for k in range(1, 8))


def test_mmoe_outputs_and_gates() -> None:
    torch.manual_seed(0)
    net = MMoE(20, 4, [16, 8], TASKS, gate_units=[6], activation="gelu")
    x = torch.randn(10, 20)
    out = net(x).logits
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "ctr": (10, 1),
        "dwell": (10, 1),
        "rating": (10, 3),
    }
    g = net.gate_weights(x)
    assert g.shape == (3, 10, 4)
    torch.testing.assert_close(g.sum(-1), torch.ones(3, 10))
    assert not torch.allclose(g[0], g[1])  # one gate per task
    # gate_units put an MLP before the softmax (DeepCTR's gate_dnn_hidden_units)
    gate = net.gates[0]
    assert isinstance(gate, Gate)
    assert [m.out_features for m in gate.hidden if isinstance(m, nn.Linear)] == [6]
    assert net.expert_names == ["e0", "e1", "e2", "e3"]


def test_mmoe_task_input_is_the_gated_sum_of_experts() -> None:
    torch.manual_seed(0)
    net = MMoE(6, 3, [5], [TaskHead("a", tower=())]).eval()
    x = torch.randn(4, 6)
    experts = net.experts(x)  # [K, B, H]
    g = net.gate_weights(x)[0]  # [B, K]
    mixed = sum(g[:, k : k + 1] * experts[k] for k in range(3))
    torch.testing.assert_close(net(x).logits["a"], net.towers[0](mixed))


def test_shared_gate_is_omoe_and_one_expert_is_shared_bottom() -> None:
    torch.manual_seed(0)
    omoe = MMoE(8, 3, [4], TASKS, gate="shared")
    assert len(omoe.gates) == 1
    g = omoe.gate_weights(torch.randn(5, 8))
    torch.testing.assert_close(g[0], g[1])
    shared_bottom = MMoE(8, 1, [4], TASKS)
    assert len(shared_bottom.gates) == 0
    x = torch.randn(5, 8)
    bottom = shared_bottom.experts(x)[0]
    torch.testing.assert_close(shared_bottom(x).logits["ctr"], shared_bottom.towers[0](bottom))
    with pytest.raises(ValueError, match="gate must be"):
        MMoE(8, 3, [4], TASKS, gate="per_expert")


def test_dropout_and_batch_norm_act_in_training_only() -> None:
    torch.manual_seed(0)
    net = MMoE(8, 2, [16], [TaskHead("a", tower=(16,))], dropout=0.5, batch_norm=True)
    kinds = {type(m) for m in net.modules()}
    assert nn.Dropout in kinds and nn.BatchNorm1d in kinds
    x = torch.randn(32, 8)
    net.train()
    assert not torch.allclose(net(x).logits["a"], net(x).logits["a"])
    net.eval()
    torch.testing.assert_close(net(x).logits["a"], net(x).logits["a"])


@pytest.mark.parametrize("activation", ["relu", "gelu", "silu", "tanh", "sigmoid", "leaky_relu"])
def test_activations(activation: str) -> None:
    net = MMoE(4, 2, [3], [TaskHead("a")], activation=activation)
    names = {type(m).__name__.lower() for m in net.modules()}
    assert activation.replace("_", "") in names
    assert net(torch.randn(2, 4)).logits["a"].shape == (2, 1)


def test_ple_gates_choose_own_and_shared_experts() -> None:
    torch.manual_seed(0)
    net = PLE(10, 2, 3, [8, 4], TASKS[:2], num_layers=2, gate_units=[4])
    x = torch.randn(7, 10)
    out = net(x).logits
    assert out["ctr"].shape == (7, 1) and out["dwell"].shape == (7, 1)
    own = ["ctr.0", "ctr.1", "ctr.2", "dwell.0", "dwell.1", "dwell.2"]
    assert net.expert_names == [*own, "shared.0", "shared.1"]
    g = net.gate_weights(x)
    torch.testing.assert_close(g.sum(-1), torch.ones(2, 7))
    assert (g[0, :, 3:6] == 0).all() and (g[1, :, 0:3] == 0).all()  # not another task's experts
    assert (g[0, :, 6:] > 0).all()  # every task sees the shared experts
    assert len(net.layers) == 2


def test_senet_reweights_each_field() -> None:
    torch.manual_seed(0)
    senet = SENet(num_fields=3, reduction_ratio=2)
    fields = [torch.randn(4, 5), torch.randn(4, 1), torch.randn(4, 2)]
    out = senet(fields)
    for f, o in zip(fields, out, strict=True):
        scale = o / f
        assert o.shape == f.shape
        # one weight in (0, 1) per row and field
        torch.testing.assert_close(scale, scale[:, :1].expand_as(scale))
        assert ((scale > 0) & (scale < 1)).all()


def test_feature_embedding_pools_tags_and_shares_tables() -> None:
    specs = [
        FeatureSpec("item", "categorical", table="items"),
        FeatureSpec("history_mean", "tags", table="items", pooling="mean"),
        FeatureSpec("history_sum", "tags", table="items", pooling="sum"),
        FeatureSpec("price", "numeric"),
    ]
    emb = FeatureEmbedding(specs, {"items": (10, 4)})
    assert len(emb.tables) == 1 and emb.layout.width == 4 + 4 + 4 + 1
    assert emb.layout.columns({"price", "history_sum"}) == [8, 9, 10, 11, 12]
    history = torch.tensor([[3, 5, 0, 0], [0, 0, 0, 0]])
    inputs = {
        "item": torch.tensor([3, 7]),
        "history_mean": history,
        "history_sum": history,
        "price": torch.tensor([1.5, -2.0]),
    }
    fields, _ = emb(inputs)
    table = emb.table("items").weight
    torch.testing.assert_close(fields[0], table[[3, 7]])
    torch.testing.assert_close(fields[1][0], (table[3] + table[5]) / 2)  # padding ignored
    torch.testing.assert_close(fields[2][0], table[3] + table[5])
    torch.testing.assert_close(fields[1][1], torch.zeros(4))  # an empty list pools to zero
    torch.testing.assert_close(fields[3], torch.tensor([[1.5], [-2.0]]))


def test_ranking_model_with_senet_in_front_of_ple() -> None:
    torch.manual_seed(0)
    specs = [FeatureSpec("a", "categorical", table="a"), FeatureSpec("x", "numeric")]
    net = PLE(5, 1, 1, [4], [TaskHead("ctr")])
    model = RankingModel(specs, {"a": (6, 4)}, net, senet_reduction=1)
    assert model.senet is not None and model.tasks == [TaskHead("ctr")]
    inputs = {"a": torch.tensor([1, 2]), "x": torch.tensor([0.5, 1.0])}
    out = model(inputs)
    assert out.logits["ctr"].shape == (2, 1) and out.gates is None
    assert isinstance(out.penalty, torch.Tensor) and out.penalty.item() > 0
    with_gates = model.eval()(inputs, gates=True)
    assert with_gates.gates is not None and with_gates.gates.shape == (1, 2, 2)
    assert with_gates.penalty == 0  # the embedding penalty is a training term


@pytest.mark.parametrize(
    "module",
    [
        ExpertBank(6, 3, [5, 4], batch_norm=True),
        Gate(6, 3, [4], "relu"),
        Gate(6, 3, [], "relu"),
        MMoE(6, 3, [5], TASKS, gate_units=[4]),
        MMoE(6, 1, [5], TASKS),
        PLE(6, 2, 2, [5, 4], TASKS[:2], num_layers=2),
    ],
    ids=["experts", "gate_mlp", "gate", "mmoe", "shared_bottom", "ple"],
)
def test_a_module_from_its_input_layers_is_the_module(module: nn.Module) -> None:
    """`m(x)` equals `m.from_input_layers([x @ w + b for w, b in m.input_layers()])`: export
    splits those layers to compute a request's context once."""
    torch.manual_seed(0)
    module.eval()
    x = torch.randn(5, 6)
    h = [x @ w + b for w, b in module.input_layers()]  # type: ignore[operator]
    whole, split = module(x), module.from_input_layers(h)  # type: ignore[operator]
    if isinstance(whole, torch.Tensor):
        torch.testing.assert_close(split, whole)
        return
    for name, logits in whole.logits.items():
        torch.testing.assert_close(split.logits[name], logits)
    gated = module.from_input_layers(h, gates=True).gates  # type: ignore[operator]
    torch.testing.assert_close(gated, module(x, gates=True).gates)


def test_task_outputs_are_named_as_in_easyrec() -> None:
    z = torch.randn(4, 3)
    binary = task_outputs(TaskHead("ctr"), z[:, :1])
    torch.testing.assert_close(binary["probs_ctr"], torch.sigmoid(z[:, 0]))
    assert set(binary) == {"probs_ctr", "logits_ctr"}
    assert set(task_outputs(TaskHead("d", "regression"), z[:, :1])) == {"y_d"}
    multi = task_outputs(TaskHead("r", "multiclass", num_class=3), z)
    assert multi["probs_r"].shape == (4, 3)
    torch.testing.assert_close(multi["probs_r"].sum(1), torch.ones(4))


def test_mmoe_learns_two_tasks_in_a_plain_training_loop() -> None:
    """The README's Python example: MMoE as a plain nn.Module in a user's own loop."""
    torch.manual_seed(0)
    x = torch.randn(512, 10)
    y_click = (x[:, 0] > 0).float()
    y_dwell = x[:, 1] * 2 + 0.5
    net = MMoE(10, 4, [16], [TaskHead("click"), TaskHead("dwell", "regression")])
    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    for _ in range(150):
        out = net(x).logits
        loss = nn.functional.binary_cross_entropy_with_logits(out["click"][:, 0], y_click)
        loss = loss + nn.functional.mse_loss(out["dwell"][:, 0], y_dwell)
        opt.zero_grad()
        loss.backward()
        opt.step()
    out = net(x).logits
    accuracy = ((out["click"][:, 0] > 0).float() == y_click).float().mean()
    assert accuracy > 0.9
    assert nn.functional.mse_loss(out["dwell"][:, 0], y_dwell) < 0.2
