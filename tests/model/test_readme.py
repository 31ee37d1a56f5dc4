"""The README's config section stays true: its Python examples run, and its YAML is a valid
config that lists every option the config accepts."""

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

README = Path(__file__).resolve().parents[2] / "README.md"
# Keys documented with their topic (until the README's list has them): those added for EasyRec
# configs, and request context.
EASYREC_DOC = README.parent / "docs" / "easyrec.md"
CONTEXT_DOC = README.parent / "docs" / "context.md"


def section() -> str:
    text = README.read_text()
    match = re.search(r"<!-- section:config -->(.*)<!-- /section:config -->", text, re.S)
    assert match, "README has no config section"
    return match.group(1)


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", section(), re.S)


def test_python_examples_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    examples = blocks("python")
    assert len(examples) == 2
    for code in examples:
        exec(compile(code, str(README), "exec"), {})
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
        assert not missing, f"{model.__name__}: {sorted(missing)} not in the README"
    # the values shown are the defaults
    defaults = RunConfig(features=config.features, tasks=config.tasks)
    assert config.model == defaults.model and config.train == defaults.train
