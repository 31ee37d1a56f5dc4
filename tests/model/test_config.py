"""The YAML config: every shipped config loads, and a wrong key or value fails when the file is
read with its key path in the message."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from mmoe.model.config import ConfigError, load_config, parse_config

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "path",
    sorted(ROOT.glob("configs/*.yaml")) + sorted(ROOT.glob("tests/data/*.yaml")),
    ids=lambda p: p.name,
)
def test_shipped_configs_load(path: Path) -> None:
    config = load_config(path)
    assert config.features and config.tasks


Mutation = Callable[[dict[str, Any]], None]


def _set(path: str, value: Any) -> Mutation:
    """A mutation setting a dotted path (`tasks.1.kind`) in the config dict."""

    def mutate(d: dict[str, Any]) -> None:
        parts = path.split(".")
        node: Any = d
        for p in parts[:-1]:
            node = node[int(p)] if isinstance(node, list) else node.setdefault(p, {})
        last = parts[-1]
        if isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value

    return mutate


BAD: list[tuple[str, Mutation, str]] = [
    # unknown keys, at every level
    ("top-level key", _set("optimiser", "adam"), "optimiser: Extra inputs are not permitted"),
    ("model key", _set("model.num_experts", 3), "model.num_experts: Extra inputs"),
    ("train key", _set("train.epoch", 3), "train.epoch: Extra inputs"),
    ("task key", _set("tasks.1.loss", "bce"), "tasks[1].loss: Extra inputs"),
    ("feature key", _set("features.2.dim", 4), "features[2].dim: Extra inputs"),
    ("vocab key", _set("features.0.vocab.min", 2), "features[0].vocab.min: Extra inputs"),
    ("senet key", _set("model.senet", {"ratio": 2}), "model.senet.ratio: Extra inputs"),
    (
        "early stopping key",
        _set("train.early_stopping", {"metric": "auc_ctr", "wait": 2}),
        "train.early_stopping.wait: Extra inputs",
    ),
    # bad values
    ("task kind", _set("tasks.1.kind", "ranking"), "tasks[1].kind: Input should be"),
    ("feature kind", _set("features.0.kind", "dense"), "features[0]: Input tag 'dense'"),
    ("experts", _set("model.experts", 0), "model.experts: Input should be greater than"),
    ("expert units", _set("model.expert_units", []), "model.expert_units: List should have"),
    ("tower units", _set("tasks.0.tower", [8, 0]), "tasks[0].tower[1]: Input should be greater"),
    ("gate units", _set("model.gate_units", [-1]), "model.gate_units[0]: Input should be"),
    ("gate", _set("model.gate", "per_expert"), "model.gate: Input should be"),
    ("activation", _set("model.activation", "swish"), "model.activation: Input should be"),
    ("dropout", _set("model.dropout", 1.0), "model.dropout: Input should be less than 1"),
    ("l2", _set("model.l2", -1e-5), "model.l2: Input should be greater"),
    ("batch_norm", _set("model.batch_norm", "yes please"), "model.batch_norm: Input should be"),
    ("model kind", _set("model.kind", "esmm"), "model.kind: Input should be"),
    ("optimizer", _set("train.optimizer", "sgd"), "train.optimizer: Input should be"),
    ("schedule", _set("train.lr_schedule", "linear"), "train.lr_schedule: Input should be"),
    ("lr", _set("train.lr", 0), "train.lr: Input should be greater than 0"),
    ("batch size", _set("train.batch_size", "big"), "train.batch_size: Input should be"),
    ("seed", _set("train.seed", 1.5), "train.seed: Input should be a valid integer"),
    ("min_count", _set("features.0.vocab.min_count", 0), "features[0].vocab.min_count"),
    ("hash buckets", _set("features.1.hash_buckets", 0), "features[1].hash_buckets"),
    ("pooling", _set("features.6.pooling", "max"), "features[6].pooling: Input should be"),
    ("transform", _set("features.4.transform", "log"), "features[4].transform"),
    ("feature name", _set("features.0.name", "user id"), "features[0].name: String should"),
    ("task weight", _set("tasks.0.weight", -1), "tasks[0].weight: Input should be greater"),
    ("metric", _set("tasks.0.metrics", ["auc", "ndcg"]), "tasks[0].metrics[1]: Input should"),
    ("empty label", _set("tasks.0.label", ""), "tasks[0].label: String should have at least"),
    # checks across keys
    (
        "vocab and hash",
        _set("features.0.hash_buckets", 10),
        "features[0]: set one of `vocab`, `hash_buckets`, `vocab_list`, `num_buckets`, "
        "not `vocab` and `hash_buckets`",
    ),
    (
        "unsorted boundaries",
        _set("features.5.boundaries", [6, 6, 18]),
        "features[5].boundaries: boundaries must be a non-empty, strictly increasing list",
    ),
    (
        "boundaries with transform",
        _set("features.5.transform", "log1p"),
        "features[5]: `boundaries` bucketise the raw value",
    ),
    (
        "multiclass without num_class",
        _set("tasks.1.kind", "multiclass"),
        "tasks[1]: multiclass tasks need `num_class`",
    ),
    ("num_class on binary", _set("tasks.1.num_class", 3), "tasks[1]: `num_class` is only for"),
    (
        "metric of another kind",
        _set("tasks.0.metrics", ["mse"]),
        "tasks[0]: metrics ['mse'] do not apply to a binary task",
    ),
    ("duplicate task", _set("tasks.1.name", "ctr"), "tasks[1].name: duplicate name 'ctr'"),
    (
        "duplicate feature",
        _set("features.2.name", "user_id"),
        "features[2].name: duplicate name 'user_id'",
    ),
    (
        "shared table of another size",
        _set("features.2.embedding_name", "user_id"),  # category (dim 4) into user_id's table
        "features[2].embedding_name: features sharing table 'user_id' must have the same",
    ),
    (
        "shared table of a bucketised feature",
        _set("features.2.embedding_name", "hour"),
        "features[2].embedding_name: table 'hour' belongs to the bucketised numeric feature",
    ),
    ("unknown group", _set("model.groups", ["user", "all"]), "model.groups: unknown groups"),
    (
        "early stopping metric",
        _set("train.early_stopping", {"metric": "auc_click"}),
        "train.early_stopping.metric: 'auc_click' is not computed",
    ),
    (
        "ple option on mmoe",
        _set("model.task_experts", 2),
        "model.task_experts: only for kind: ple",
    ),
]


@pytest.mark.parametrize(("mutate", "expected"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_config_names_the_key_path(
    tiny_dict: dict[str, Any], mutate: Mutation, expected: str, tmp_path: Path
) -> None:
    mutate(tiny_dict)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(tiny_dict))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert message.startswith(f"{path}: ")
    assert expected in message


def test_ple_rejects_the_mmoe_gate_option(tiny_dict: dict[str, Any]) -> None:
    tiny_dict["model"] |= {"kind": "ple", "gate": "shared"}
    with pytest.raises(ConfigError, match=r"model\.gate: only for kind: mmoe"):
        parse_config(tiny_dict)


def test_every_error_is_reported_at_once(tiny_dict: dict[str, Any]) -> None:
    tiny_dict["model"]["dropout"] = 2
    tiny_dict["tasks"][0]["kind"] = "nope"
    with pytest.raises(ConfigError) as err:
        parse_config(tiny_dict)
    assert "model.dropout" in str(err.value) and "tasks[0].kind" in str(err.value)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("features: [\n", "not valid YAML"),
        ("- just\n- a list\n", "expected a mapping"),
    ],
)
def test_unreadable_files(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=expected):
        load_config(path)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")


def test_defaults_are_the_documented_ones(tiny_dict: dict[str, Any]) -> None:
    minimal = {"features": tiny_dict["features"][:1], "tasks": [{"name": "ctr", "label": "clk"}]}
    config = parse_config(minimal)
    m, t, task = config.model, config.train, config.tasks[0]
    assert (m.kind, m.experts, m.expert_units, m.gate_units, m.gate) == (
        "mmoe",
        4,
        [128, 64],
        [],
        "per_task",
    )
    assert (m.activation, m.dropout, m.batch_norm, m.l2, m.embedding_l2) == (
        "relu",
        0.0,
        False,
        0.0,
        0.0,
    )
    assert (t.batch_size, t.epochs, t.lr, t.optimizer, t.seed, t.shuffle) == (
        1024,
        3,
        1e-3,
        "adam",
        1024,
        True,
    )
    assert (task.kind, task.weight, task.tower, task.default_metrics) == (
        "binary",
        1.0,
        [64],
        ["auc", "logloss"],
    )
    assert config.metric_names == ["auc_ctr", "logloss_ctr", "loss"]


@pytest.mark.parametrize(
    ("metric", "mode", "maximise"),
    [
        ("auc_ctr", None, True),
        ("logloss_ctr", None, False),
        ("loss", None, False),
        ("loss", "max", True),
        ("auc_ctr", "min", False),
    ],
)
def test_early_stopping_direction(
    tiny_dict: dict[str, Any], metric: str, mode: str | None, maximise: bool
) -> None:
    tiny_dict["train"]["early_stopping"] = {"metric": metric} | ({"mode": mode} if mode else {})
    es = parse_config(tiny_dict).train.early_stopping
    assert es is not None and es.maximise is maximise


def test_shared_tables_and_groups_that_agree_are_accepted(tiny_dict: dict[str, Any]) -> None:
    tiny_dict["features"].append(
        {"name": "last_item", "kind": "categorical", "column": "item_id", "hash_buckets": 1000}
        | {"embedding_dim": 4, "embedding_name": "item_id", "group": "history"}
    )
    tiny_dict["model"]["groups"] = ["all"]
    config = parse_config(tiny_dict)
    assert "last_item" not in [f.name for f in config.input_features]
    tiny_dict["model"]["groups"] = ["all", "history"]
    assert "last_item" in [f.name for f in parse_config(tiny_dict).input_features]
