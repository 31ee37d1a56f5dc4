"""Expert health: per-epoch gate statistics on validation rows, and collapse warnings that fire
on a forced collapse and stay quiet on a healthy run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import torch

from mmoe.model import evaluation
from mmoe.model.batches import encode_table
from mmoe.model.checkpoint import load_run
from mmoe.model.config import parse_config
from mmoe.model.evaluation import expert_health
from mmoe.model.network import MMoE
from mmoe.model.train import train


def rows(tiny_run: Path, data: Path) -> tuple[Any, Any]:
    run = load_run(tiny_run)
    return run, encode_table(pq.read_table(data).slice(0, 2000), run.schema, run.config.tasks)


def force_gates(net: MMoE, bias: list[float]) -> None:
    with torch.no_grad():
        for gate in net.gates:
            out: Any = gate.out
            out.weight.zero_()
            out.bias.copy_(torch.tensor(bias))


def test_statistics_are_per_task_and_expert(tiny_run: Path, tiny_data: Path) -> None:
    run, data = rows(tiny_run, tiny_data)
    health = expert_health(run.model, data)
    assert health is not None and health.experts == ["e0", "e1", "e2"]
    for task in ("ctr", "cvr"):
        assert sum(health.gates[task]) == pytest.approx(1.0, abs=1e-6)
        assert 0.0 < health.gate_entropy[task] <= 1.0
    assert -1.0 <= health.expert_similarity <= 1.0


def test_a_starved_expert_and_uniform_gates_are_reported(tiny_run: Path, tiny_data: Path) -> None:
    run, data = rows(tiny_run, tiny_data)
    assert isinstance(run.model.net, MMoE)
    force_gates(run.model.net, [12.0, 12.0, 0.0])  # e2 gets ~6e-6 from both tasks
    health = expert_health(run.model, data)
    assert health is not None
    (starved,) = [w for w in health.warnings() if "gate weight" in w]
    assert starved.startswith("expert e2 gets almost no gate weight from any task")
    force_gates(run.model.net, [0.0, 0.0, 0.0])
    health = expert_health(run.model, data)
    assert health is not None
    uniform = [w for w in health.warnings() if "near-uniform" in w]
    assert len(uniform) == 2 and "task ctr's gate" in uniform[0]


def test_identical_experts_are_reported(tiny_run: Path, tiny_data: Path) -> None:
    run, data = rows(tiny_run, tiny_data)
    assert isinstance(run.model.net, MMoE)
    with torch.no_grad():
        for p in [*run.model.net.experts.weights, *run.model.net.experts.biases]:
            p.copy_(p[:1].expand_as(p))
    health = expert_health(run.model, data)
    assert health is not None and health.expert_similarity == pytest.approx(1.0)
    assert any("near-identical" in w for w in health.warnings())


def test_a_healthy_run_records_health_per_epoch_and_no_warning(
    tiny_dict: dict[str, Any], tiny_data: Path, tmp_path: Path
) -> None:
    tiny_dict["train"]["epochs"] = 3
    train(parse_config(tiny_dict), tiny_data, tmp_path / "run")
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["warnings"] == []
    for epoch in metrics["epochs"]:
        experts = epoch["experts"]
        assert set(experts["gates"]) == set(experts["gate_entropy"]) == {"ctr", "cvr"}
        assert len(experts["gates"]["ctr"]) == 3


def test_warnings_are_logged_and_kept_in_metrics(
    tiny_dict: dict[str, Any],
    tiny_data: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setattr(evaluation, "IDENTICAL", -1.0)  # any two experts count as identical
    tiny_dict["train"]["epochs"] = 2
    train(parse_config(tiny_dict), tiny_data, tmp_path / "run")
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert [w["epoch"] for w in metrics["warnings"]] == [1, 2]
    assert "near-identical" in metrics["warnings"][0]["warning"]
    assert "warning: epoch 1: the experts' outputs are near-identical" in capsys.readouterr().out


def test_ple_and_shared_bottom(tiny_dict: dict[str, Any], tiny_data: Path, tmp_path: Path) -> None:
    tiny_dict["model"] = {"kind": "ple", "experts": 2, "task_experts": 1, "expert_units": [8]}
    train(parse_config(tiny_dict), tiny_data, tmp_path / "ple")
    (epoch,) = json.loads((tmp_path / "ple" / "metrics.json").read_text())["epochs"]
    gates = epoch["experts"]["gates"]
    assert gates["ctr"][1] == 0.0 and gates["cvr"][0] == 0.0  # the other task's own expert
    assert 0.0 < epoch["experts"]["gate_entropy"]["ctr"] <= 1.0
    tiny_dict["model"] = {"experts": 1, "expert_units": [8]}
    train(parse_config(tiny_dict), tiny_data, tmp_path / "sb")
    metrics = json.loads((tmp_path / "sb" / "metrics.json").read_text())
    assert metrics["gates"] == {"ctr": [1.0], "cvr": [1.0]} and metrics["warnings"] == []
