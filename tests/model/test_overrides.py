"""`key=value` overrides after `mmoe train`'s options: parsed, applied, validated like the file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from mmoe.cli import main
from mmoe.model.config import ConfigError, load_config, parse_config
from mmoe.model.overrides import apply_overrides, parse_key
from tests.conftest import TINY_CONFIG
from tests.model.test_easyrec import BUILTIN


def test_key_paths() -> None:
    assert parse_key("train.epochs") == ["train", "epochs"]
    assert parse_key("tasks[1].weight") == parse_key("tasks.1.weight") == ["tasks", 1, "weight"]
    assert parse_key("features[0].vocab.min_count") == ["features", 0, "vocab", "min_count"]
    for bad in ("train..epochs", "tasks[x].weight", "a-b"):
        with pytest.raises(ConfigError, match="is not a key name or a list index"):
            parse_key(bad)


def test_values_are_yaml_and_missing_sections_are_created(tiny_dict: dict[str, Any]) -> None:
    del tiny_dict["model"]
    out = apply_overrides(
        tiny_dict,
        [
            "model.experts=8",
            "model.expert_units=[32, 16]",
            "tasks[1].weight=0.5",
            "train.shuffle=false",
            "features.0.vocab={min_count: 3}",
            "name=two words",
        ],
    )
    assert "model" not in tiny_dict  # the input is not changed
    config = parse_config(out)
    assert config.model.experts == 8 and config.model.expert_units == [32, 16]
    assert config.tasks[1].weight == 0.5 and config.train.shuffle is False
    first: Any = config.features[0]
    assert first.vocab is not None and first.vocab.min_count == 3
    assert config.name == "two words"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.epochs", "expected KEY=VALUE"),
        ("tasks[5].weight=1", r"tasks\[5\]: no such item \(tasks has 2\)"),
        ("name.first=1", "name is not a mapping"),
        ("train[0]=1", "train is not a list"),
        ("train.lr=[1", "the value is not valid YAML"),
    ],
)
def test_malformed_overrides(tiny_dict: dict[str, Any], override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        apply_overrides(tiny_dict, [override])


def test_bad_keys_and_values_fail_validation_naming_their_path() -> None:
    with pytest.raises(ConfigError, match=r"tiny.yaml: train.epoch: Extra inputs"):
        load_config(TINY_CONFIG, ["train.epoch=1"])
    with pytest.raises(ConfigError, match=r"tasks\[0\].kind: Input should be"):
        load_config(TINY_CONFIG, ["tasks[0].kind=binery"])


def test_train_takes_overrides_after_its_options(tiny_data: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    args = ["train", "--config", str(TINY_CONFIG), "--data", str(tiny_data), "--out", str(run)]
    assert main([*args, "model.experts=2", "train.seed=9"]) == 0
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["model"]["experts"] == 2 and saved["train"]["seed"] == 9


def test_train_refuses_a_bad_override(
    tiny_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["train", "--config", str(TINY_CONFIG), "--data", str(tiny_data), "--out", str(tmp_path)]
    assert main([*args, "model.expertz=2"]) == 2
    assert "model.expertz: Extra inputs are not permitted" in capsys.readouterr().err
    assert not (tmp_path / "config.yaml").exists()


def test_overrides_apply_to_the_yaml_form_of_an_easyrec_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from mmoe.model.easyrec import load_pipeline_config

    config, mapping, _ = load_pipeline_config(
        BUILTIN, ["model.experts=2", "features[0].embedding_dim=4", "train.epochs=1"]
    )
    assert config.model.experts == 2 and config.features[0].embedding_dim == 4
    assert mapping["model"]["experts"] == 2
    args = ["train", "--config", str(BUILTIN), "--data", "x.csv", "--out", str(tmp_path)]
    assert main([*args, "train.epochs=1", "model.expertz=2"]) == 2
    err = capsys.readouterr().err
    assert "mmoe.config (in its YAML form): model.expertz: Extra inputs" in err
