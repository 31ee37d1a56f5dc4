"""The documented config stays true (the config section, docs/training.md): its Python examples
run, and its YAML is a valid config that lists every option the config accepts."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from mmoe.model.config import (
    CategoricalFeature,
    DataConfig,
    EarlyStoppingConfig,
    ModelConfig,
    NumericFeature,
    RunConfig,
    SENetConfig,
    TagsFeature,
    TaskConfig,
    TrainConfig,
    VocabConfig,
    parse_config,
)
from tests.docs import ROOT, section

DOC, CONFIG_SECTION = section("config")
# Keys documented with their topic (until docs/training.md's list has them): those added for
# EasyRec configs, and request context.
EASYREC_DOC = ROOT / "docs" / "easyrec.md"
CONTEXT_DOC = ROOT / "docs" / "context.md"


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", CONFIG_SECTION, re.S)


def test_python_examples_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    examples = blocks("python")
    assert len(examples) == 2
    for code in examples:
        exec(compile(code, str(DOC), "exec"), {})
    assert (tmp_path / "runs" / "small" / "weights.pt").exists()


def test_yaml_is_a_valid_config_listing_every_option() -> None:
    (text,) = blocks("yaml")
    config = parse_config(yaml.safe_load(text))
    assert [f.kind for f in config.features] == ["categorical", "numeric", "tags"]
    extra = [
        block
        for doc in (EASYREC_DOC, CONTEXT_DOC)
        for block in re.findall(r"```yaml\n(.*?)```", doc.read_text(), re.S)
    ]
    documented = set(re.findall(r"([a-z_0-9]+):", "\n".join([text, *extra])))
    for model in (
        DataConfig,
        RunConfig,
        CategoricalFeature,
        NumericFeature,
        TagsFeature,
        VocabConfig,
        TaskConfig,
        ModelConfig,
        SENetConfig,
        EarlyStoppingConfig,
        TrainConfig,
    ):
        missing = set(model.model_fields) - documented
        assert not missing, f"{model.__name__}: {sorted(missing)} not in {DOC.name}"
    # the values shown are the defaults
    defaults = RunConfig(features=config.features, tasks=config.tasks)
    assert config.model == defaults.model and config.train == defaults.train
