"""EasyRec pipeline configs translated into the YAML config, in-process: the seed page's two
forms and EasyRec's mmoe_backbone_on_taobao shape, one test per field the translation reads,
and unsupported fields refused by name and line. Also the config keys the translation needs
(headerless CSV, fixed vocabularies, integer ids, an exponential lr decay) on their own."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pyarrow as pa
import pyarrow.csv as pcsv
import pytest
import yaml

from mmoe.cli import main
from mmoe.model.config import ConfigError, load_config, parse_config
from mmoe.model.easyrec import (
    EasyRecConfigError,
    is_easyrec_config,
    load_pipeline_config,
    translate,
    translate_file,
)

EASYREC = Path(__file__).resolve().parents[1] / "data" / "easyrec"
BUILTIN = EASYREC / "mmoe.config"
COMPONENT = EASYREC / "mmoe_component.config"
BACKBONE_SAMPLE = EASYREC / "mmoe_backbone_on_taobao.config"

# A small pipeline.config to vary field by field.
SMALL = """\
data_config {
  batch_size: 64
  label_fields: "clk"
  label_fields: "buy"
  input_type: CSVInput
  input_fields { input_name: "clk" input_type: INT32 }
  input_fields { input_name: "buy" input_type: INT32 }
  input_fields { input_name: "user_id" input_type: STRING }
  input_fields { input_name: "price" input_type: DOUBLE }
  input_fields { input_name: "tags" input_type: STRING }
}
feature_configs { input_names: "user_id" feature_type: IdFeature embedding_dim: 8
  hash_bucket_size: 1000 }
feature_configs { input_names: "price" feature_type: RawFeature }
feature_configs { input_names: "tags" feature_type: TagFeature embedding_dim: 8
  hash_bucket_size: 100 }
model_config {
  model_class: "MMoE"
  feature_groups {
    group_name: "all"
    feature_names: "user_id"
    feature_names: "price"
    feature_names: "tags"
    wide_deep: DEEP
  }
  mmoe {
    expert_dnn { hidden_units: [16] }
    num_expert: 2
    task_towers { tower_name: "ctr" label_name: "clk" dnn { hidden_units: [8] } }
    task_towers { tower_name: "cvr" label_name: "buy" dnn { hidden_units: [8] } }
  }
}
"""


USER_FEATURE = (
    'feature_configs { input_names: "user_id" feature_type: IdFeature embedding_dim: 8\n'
    "  hash_bucket_size: 1000 }"
)
TAGS_FEATURE = (
    'feature_configs { input_names: "tags" feature_type: TagFeature embedding_dim: 8\n'
    "  hash_bucket_size: 100 }"
)


def line_of(text: str, needle: str) -> int:
    """The 1-based line of the first line of `text` holding `needle`."""
    return next(i for i, line in enumerate(text.splitlines(), 1) if needle in line)


def small(old: str = "", new: str = "") -> str:
    assert old in SMALL, old
    return SMALL.replace(old, new, 1)


def config_of(text: str) -> dict[str, Any]:
    """The YAML form of a pipeline.config, checked to be a valid config."""
    mapping = translate(text, "p.config").config
    parse_config(mapping)
    return mapping


def refused(text: str) -> str:
    with pytest.raises(EasyRecConfigError) as err:
        config_of(text)
    return str(err.value)


def feature(mapping: dict[str, Any], name: str) -> dict[str, Any]:
    return next(f for f in mapping["features"] if f["name"] == name)


# --------------------------------------------------------------------- the seed page's forms


TAOBAO_FEATURES = [
    "user_id",
    "cms_segid",
    "cms_group_id",
    "age_level",
    "pvalue_level",
    "shopping_level",
    "occupation",
    "new_user_class_level",
    "adgroup_id",
    "cate_id",
    "campaign_id",
    "customer",
    "brand",
    "price",
    "pid",
    "tag_category_list",
    "tag_brand_list",
]


def test_builtin_form_translates_every_part() -> None:
    t = translate_file(BUILTIN)
    c = t.config
    parse_config(c)
    assert [f["name"] for f in c["features"]] == TAOBAO_FEATURES  # the feature group's order
    assert c["data"]["columns"][:3] == ["clk", "buy", "pid"] and len(c["data"]["columns"]) == 20
    assert c["data"]["separator"] == ","
    assert feature(c, "user_id") == {
        "name": "user_id",
        "kind": "categorical",
        "hash_buckets": 100000,
        "embedding_dim": 16,
        "default": "",
    }
    assert feature(c, "price")["num_buckets"] == 50 and feature(c, "price")["default"] == "0"
    assert feature(c, "tag_brand_list")["kind"] == "tags"
    assert c["model"] == {
        "experts": 4,
        "expert_units": [256, 192, 128, 64],
        "gate_units": [],
        "activation": "relu",
        "dropout": 0.0,
        "batch_norm": True,  # EasyRec's DNN default use_bn: true
        "l2": pytest.approx(5e-7),
        "embedding_l2": pytest.approx(5e-5 * 4096 / 2),
    }
    assert [(x["name"], x["label"], x["kind"], x["tower"], x["metrics"]) for x in c["tasks"]] == [
        ("ctr", "clk", "binary", [256, 192, 128, 64], ["auc"]),
        ("cvr", "buy", "binary", [256, 192, 128, 64], ["auc"]),
    ]
    assert c["train"] == {
        "batch_size": 4096,
        "shuffle": True,
        "optimizer": "adam",
        "lr": 0.001,
        "lr_schedule": "exponential",
        "decay_steps": 1000,
        "decay_factor": 0.5,
        "staircase": True,
        "min_lr": 1e-07,
        # EasyRec stops at num_steps (num_epochs unset: no bound of its own)
        "num_steps": 5000,
        "epochs": 5000,
    }
    assert "train_input_path, eval_input_path, model_dir: not read; the rows come from --data" in (
        "\n".join(t.notes)
    )


def test_component_form_multitask_model_with_senet_and_mmoe_blocks() -> None:
    c = translate_file(COMPONENT).config
    parse_config(c)
    assert c["name"] == "MMoE"  # model_name
    assert c["model"]["experts"] == 3 and c["model"]["expert_units"] == [256, 128]
    assert c["model"]["senet"] == {"reduction_ratio": 4}
    assert [x["tower"] for x in c["tasks"]] == [[128, 64], [128, 64]]
    assert [f["name"] for f in c["features"]] == TAOBAO_FEATURES


def test_backbone_sample_shape_and_feature_config_v2() -> None:
    sample = translate_file(BACKBONE_SAMPLE).config
    builtin = translate_file(BUILTIN).config
    # feature_config { features {} } reads as feature_configs {} does
    assert sample["features"] == builtin["features"]
    assert sample["model"] == {**builtin["model"], "senet": {"reduction_ratio": 4}}


def test_component_form_num_task_must_match_the_towers() -> None:
    text = COMPONENT.read_text().replace("num_task: 2", "num_task: 3")
    message = refused(text)
    line = text.splitlines().index("          num_task: 3") + 1
    assert f"p.config:{line}:" in message and "num_task" in message


# ---------------------------------------------------------------------------- features


def test_id_feature_hash_bucket_size_num_buckets_vocab_list() -> None:
    c = config_of(
        small(
            USER_FEATURE,
            'feature_configs { input_names: "user_id" feature_type: IdFeature embedding_dim: 8 '
            'vocab_list: ["u1", "u2"] }\n'
            'feature_configs { feature_name: "price_id" input_names: "price" '
            "feature_type: IdFeature embedding_dim: 4 num_buckets: 50 }",
        ).replace('feature_names: "price"', 'feature_names: "price_id"')
    )
    assert feature(c, "user_id")["vocab_list"] == ["u1", "u2"]
    price = feature(c, "price_id")
    assert price["num_buckets"] == 50 and price["column"] == "price"
    assert price["embedding_dim"] == 4
    assert feature(c, "tags")["hash_buckets"] == 100


def test_id_feature_needs_a_way_to_map_ids() -> None:
    message = refused(small(USER_FEATURE, USER_FEATURE.replace("hash_bucket_size: 1000 ", "")))
    line = line_of(SMALL, USER_FEATURE.splitlines()[0])
    assert f"p.config:{line}:" in message
    assert "hash_bucket_size, vocab_list or num_buckets" in message


def test_embedding_name_shares_a_table() -> None:
    text = small(
        TAGS_FEATURE,
        'feature_configs { input_names: "tags" feature_type: TagFeature embedding_dim: 8 '
        'hash_bucket_size: 1000 embedding_name: "user_id" }',
    )
    c = config_of(text)
    assert feature(c, "tags")["embedding_name"] == "user_id"
    mismatch = text.replace(
        "hash_bucket_size: 1000 embedding_name", "hash_bucket_size: 9 embedding_name"
    )
    with pytest.raises(ConfigError, match=r"features\[2\].embedding_name"):
        load_pipeline_config_text(mismatch)


def load_pipeline_config_text(text: str, tmp: Path | None = None) -> Any:
    path = (tmp or Path("/tmp")) / f"p{abs(hash(text))}.config"
    path.write_text(text)
    try:
        return load_pipeline_config(path)
    finally:
        path.unlink()


def test_raw_feature_plain_and_with_boundaries() -> None:
    assert feature(config_of(SMALL), "price") == {
        "name": "price",
        "kind": "numeric",
        "default": 0.0,
    }
    c = config_of(
        small(
            "feature_type: RawFeature }",
            "feature_type: RawFeature boundaries: [50, 10, 200] embedding_dim: 4 }",
        )
    )
    assert feature(c, "price")["boundaries"] == [10, 50, 200]  # sorted, as EasyRec does
    assert feature(c, "price")["embedding_dim"] == 4


def test_raw_feature_options_easyrec_ignores_are_ignored_with_a_note() -> None:
    """EasyRec hashes no raw value and uses embedding_dim only with boundaries (at most as a
    learned vector scaled by the value, which the first layer already is): ignored, noted."""
    text = small(
        "feature_type: RawFeature }",
        "feature_type: RawFeature embedding_dim: 4 hash_bucket_size: 400 }",
    )
    t = translate(text, "p.config")
    assert feature(t.config, "price") == {"name": "price", "kind": "numeric", "default": 0.0}
    assert any(
        n.startswith(
            "RawFeature options ignored, as EasyRec ignores them: price "
            "(hash_bucket_size, embedding_dim)"
        )
        for n in t.notes
    )
    parse_config(t.config)


def test_tag_feature_separator_and_combiner() -> None:
    c = config_of(
        small("hash_bucket_size: 100 }", 'hash_bucket_size: 100 separator: ";" combiner: "sum" }')
    )
    tags = feature(c, "tags")
    assert tags["separator"] == ";" and tags["pooling"] == "sum" and tags["hash_buckets"] == 100
    assert tags["default"] == [] and tags["max_len"] == 20
    assert "combiner" in refused(
        small("hash_bucket_size: 100 }", 'hash_bucket_size: 100 combiner: "sqrtn" }')
    )


def test_feature_groups_deep_only_one_group_known_features() -> None:
    message = refused(small("wide_deep: DEEP", "wide_deep: WIDE"))
    assert (
        f"p.config:{line_of(SMALL, 'wide_deep')}:" in message
        and "WIDE" in message
        and "DEEP" in message
    )
    two = small(
        "  mmoe {", '  feature_groups { group_name: "other" feature_names: "price" }\n  mmoe {'
    )
    assert "one feature group" in refused(two)
    unknown = small('feature_names: "tags"', 'feature_names: "tagz"')
    tags_line = line_of(SMALL, 'feature_names: "tags"')
    assert f"p.config:{tags_line}:" in refused(unknown) and "'tagz'" in refused(unknown)


# -------------------------------------------------------------------------------- data


def test_data_config_columns_defaults_labels_batch_size_separator() -> None:
    text = small(
        'input_name: "price" input_type: DOUBLE',
        'input_name: "price" input_type: DOUBLE default_val: "2.5"',
    )
    text = text.replace("batch_size: 64", 'batch_size: 64\n  separator: "\\t"')
    text = text.replace('label_name: "clk" ', "").replace('label_name: "buy" ', "")
    c = config_of(text)
    assert c["data"] == {"separator": "\t", "columns": ["clk", "buy", "user_id", "price", "tags"]}
    assert feature(c, "price")["default"] == 2.5
    assert [t["label"] for t in c["tasks"]] == ["clk", "buy"]  # label_fields, in order
    assert c["train"]["batch_size"] == 64
    header = config_of(small("batch_size: 64", "batch_size: 64\n  with_header: true"))
    assert "columns" not in header["data"]


def test_headerless_csv_is_read_by_the_columns_it_names(tmp_path: Path) -> None:
    from mmoe.model.data import DataSource

    config = parse_config(config_of(SMALL))
    path = tmp_path / "d.csv"
    path.write_text("1,0,u1,3.5,a|b\n0,0,u2,,\n")
    table = next(DataSource(path, config).batches(10))
    assert table.column("user_id").to_pylist() == ["u1", "u2"]  # the first line is data
    assert table.column("price").to_pylist()[0] == 3.5
    assert DataSource(path, config).count_rows() == 2
    path.write_text("1,0,u1,3.5\n")
    with pytest.raises(ValueError, match=r"data.columns names 5 columns"):
        DataSource(path, config)


def test_num_steps_stop_training_after_that_many_steps(tmp_path: Path) -> None:
    """EasyRec trains num_steps steps (or num_epochs, whichever ends first), not whole epochs:
    30 steps of 9 per epoch are 3 epochs and 3 steps of a fourth."""
    from mmoe.model.train import train

    decay = (
        "train_config {\n  num_steps: 30\n  optimizer_config { adam_optimizer { learning_rate {"
        " exponential_decay_learning_rate { initial_learning_rate: 0.01 decay_steps: 1 "
        "decay_factor: 0.9 } } } }\n}\n"
    )
    path = tmp_path / "p.config"
    path.write_text(SMALL + decay)
    config, _, _ = load_pipeline_config(path)
    assert (config.train.num_steps, config.train.epochs) == (30, 30)  # epochs: an upper bound
    data = tmp_path / "d.csv"
    data.write_text("".join(f"{i % 2},0,u{i % 50},1.0,a|b\n" for i in range(640)))
    # 640 rows - 10% held out = 576 = 9 batches of 64
    history = train(config, data, tmp_path / "run")
    assert len(history.epochs) == 4
    # the lr falls 0.9x a step: after the last epoch it tells the steps taken
    assert history.epochs[-1]["lr"] == pytest.approx(0.01 * 0.9**30)
    assert history.epochs[0]["lr"] == pytest.approx(0.01 * 0.9**9)
    path.write_text(SMALL.replace("batch_size: 64", "batch_size: 64\n  num_epochs: 2") + decay)
    assert load_pipeline_config(path)[0].train.epochs == 2  # whichever ends first
    assert load_pipeline_config(path, ["train.epochs=1"])[0].train.epochs == 1


# ------------------------------------------------------------------------------- train


def test_train_config_constant_lr_and_exponential_decay() -> None:
    constant = config_of(
        SMALL + "train_config { optimizer_config { adam_optimizer { learning_rate { "
        "constant_learning_rate { learning_rate: 0.01 } } } } }"
    )
    assert constant["train"]["lr"] == 0.01 and "lr_schedule" not in constant["train"]
    decayed = config_of(
        SMALL + "train_config { optimizer_config { adam_optimizer { learning_rate { "
        "exponential_decay_learning_rate { initial_learning_rate: 0.002 decay_steps: 10 "
        "decay_factor: 0.9 staircase: false } } } } }"
    )
    assert decayed["train"] | {} == {
        "batch_size": 64,
        "shuffle": True,
        "optimizer": "adam",
        "lr": 0.002,
        "lr_schedule": "exponential",
        "decay_steps": 10,
        "decay_factor": 0.9,
        "staircase": False,
        "min_lr": 0.0,
    }


def test_train_config_refusals() -> None:
    adam = "adam_optimizer { learning_rate { constant_learning_rate { learning_rate: 0.01 } } }"
    moving = (
        SMALL
        + f"train_config {{\n  optimizer_config {{\n    {adam}\n"
        + "    use_moving_average: true\n  }\n}\n"
    )
    assert f"p.config:{line_of(moving, 'use_moving')}:" in refused(
        moving
    ) and "use_moving_average" in refused(moving)
    two = (
        SMALL
        + f"train_config {{\n  optimizer_config {{ {adam} }}\n  optimizer_config {{ {adam} }}\n}}\n"
    )
    second = len(two.splitlines()) - 1
    assert f"p.config:{second}:" in refused(two) and "optimizer_config[1]" in refused(two)
    momentum = SMALL + "train_config {\n  optimizer_config {\n    momentum_optimizer { }\n  }\n}\n"
    message = refused(momentum)
    assert message.startswith(
        f"p.config:{line_of(momentum, 'momentum')}:5: "
        "momentum_optimizer (in Optimizer) is not supported"
    )
    assert "adam_optimizer" in message


def test_eval_config_metrics_set_applies_to_towers_without_their_own() -> None:
    c = config_of(SMALL + "eval_config { metrics_set { auc {} } metrics_set { accuracy {} } }")
    assert [t["metrics"] for t in c["tasks"]] == [["auc", "accuracy"], ["auc", "accuracy"]]


# ------------------------------------------------------------------------------- towers


def test_task_towers_kinds_weights_metrics() -> None:
    c = config_of(
        small(
            'task_towers { tower_name: "cvr" label_name: "buy" dnn { hidden_units: [8] } }',
            'task_towers { tower_name: "dwell" label_name: "buy" loss_type: L2_LOSS weight: 0.5 '
            "metrics_set { mean_squared_error {} } metrics_set { mean_absolute_error {} } }\n"
            '    task_towers { tower_name: "grade" label_name: "buy" num_class: 3 '
            "dnn { hidden_units: [8, 4] } }",
        ).replace("num_expert: 2", "num_expert: 2")
    )
    assert c["tasks"][1] == {
        "name": "dwell",
        "label": "buy",
        "kind": "regression",
        "weight": 0.5,
        "tower": [],  # no dnn: the output layer on the experts' mix
        "metrics": ["mse", "mae"],
    }
    assert c["tasks"][2]["kind"] == "multiclass" and c["tasks"][2]["num_class"] == 3
    assert c["tasks"][2]["tower"] == [8, 4] and c["tasks"][2]["metrics"] == ["accuracy"]
    assert c["tasks"][0]["metrics"] == ["auc"]  # CLASSIFICATION's default metric


def test_tower_refusals_name_their_line() -> None:
    auc = small(
        'label_name: "buy" dnn', 'label_name: "buy" loss_type: L2_LOSS metrics_set { auc {} } dnn'
    )
    assert f"p.config:{line_of(auc, 'L2_LOSS')}:" in refused(
        auc
    ) and "auc does not apply to a regression task" in refused(auc)
    bn = small(
        'label_name: "buy" dnn { hidden_units: [8] }',
        'label_name: "buy" dnn { hidden_units: [8] use_bn: false }',
    )
    message = refused(bn)
    where = f"p.config:{line_of(bn, 'use_bn')}"
    assert message.startswith(f"{where}: model_config.mmoe.task_towers[1].dnn.use_bn:")
    drop = small(
        "expert_dnn { hidden_units: [16] }",
        "expert_dnn {\n      hidden_units: [16, 8]\n      dropout_ratio: [0.1, 0.2]\n    }",
    )
    where = f"p.config:{line_of(drop, 'dropout_ratio')}"
    assert refused(drop).startswith(f"{where}: model_config.mmoe.expert_dnn.dropout_ratio:")
    act = small(
        "expert_dnn { hidden_units: [16] }",
        'expert_dnn { hidden_units: [16] activation: "tf.nn.leaky_relu" }',
    )
    assert "tf.nn.leaky_relu" in refused(act)


def test_same_options_everywhere_become_the_model_options() -> None:
    text = SMALL.replace(
        "hidden_units: [16] }",
        'hidden_units: [16] dropout_ratio: [0.2] activation: "tf.nn.gelu" use_bn: false }',
    )
    text = text.replace(
        "hidden_units: [8] }",
        'hidden_units: [8] dropout_ratio: [0.2] activation: "gelu" use_bn: false }',
    )
    m = config_of(text)["model"]
    assert (m["dropout"], m["activation"], m["batch_norm"]) == (0.2, "gelu", False)


# -------------------------------------------------------------------------- unsupported


def test_unsupported_fields_are_refused_by_name_and_line() -> None:
    clipped = SMALL + "train_config {\n  gradient_clipping_by_norm: 10.0\n}\n"
    message = refused(clipped)
    assert message.startswith(
        f"p.config:{line_of(clipped, 'clipping')}:3: "
        "gradient_clipping_by_norm (in TrainConfig) is not supported"
    )
    nested = small(
        'tower_name: "cvr"', 'tower_name: "cvr"\n      task_space_indicator_label: "clk"'
    )
    assert refused(nested).startswith(
        f"p.config:{line_of(nested, 'task_space')}:7: task_space_indicator_label (in TaskTower) "
        "is not supported"
    )
    assert "tower_name, label_name, metrics_set" in refused(nested)
    other = small('model_class: "MMoE"', 'model_class: "DeepFM"')
    assert refused(other).startswith(
        f"p.config:{line_of(other, 'DeepFM')}: model_config.model_class:"
    )
    layer = COMPONENT.read_text().replace("class_name: 'SENet'", "class_name: 'MaskNet'")
    assert "'MaskNet'" in refused(layer)
    sequence = small("feature_type: TagFeature", "feature_type: SequenceFeature")
    assert "SequenceFeature (a FeatureType) is not supported" in refused(sequence)


def test_detected_by_extension_or_content(tmp_path: Path) -> None:
    assert is_easyrec_config(BUILTIN)
    assert not is_easyrec_config(Path(__file__).parents[1] / "data" / "tiny.yaml")
    text = tmp_path / "pipeline.txt"
    text.write_text(SMALL)
    assert is_easyrec_config(text)


# ------------------------------------------------------------------------ convert-config


def test_convert_config_writes_the_yaml_it_trains(tmp_path: Path) -> None:
    out = tmp_path / "c.yaml"
    assert main(["convert-config", "--out", str(out), str(BUILTIN), "train.epochs=2"]) == 0
    text = out.read_text()
    assert text.startswith(f"# Translated from {BUILTIN}")
    assert "# note: SENet" not in text and "# note: l2_regularization" in text
    written = load_config(out)
    translated, _, _ = load_pipeline_config(BUILTIN, ["train.epochs=2"])
    assert written == translated
    assert written.train.epochs == 2


def test_convert_config_refusals(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "c.yaml"
    assert main(["convert-config", str(BUILTIN), "train.epochz=1", "--out", str(out)]) == 2
    assert "train.epochz" in capsys.readouterr().err
    assert not out.exists()


# ----------------------------------------------------------- the config keys on their own


def test_fixed_vocabularies_and_integer_ids_in_yaml(
    tiny_dict: dict[str, Any], tiny_data: Path, tmp_path: Path
) -> None:
    """vocab_list and num_buckets fix the vocabulary; training and the exported graph encode
    ids alike, out-of-range and non-integer ids included."""
    from mmoe.export.graph import encoded_name, preprocessing_graph
    from mmoe.model.schema import FeatureSchema, SchemaFitter
    from mmoe.model.train import train

    features = tiny_dict["features"]
    features[2] = {
        "name": "category",
        "kind": "categorical",
        "vocab_list": ["c3", "c1"],
        "embedding_dim": 4,
    }
    features[3] = {
        "name": "age_level",
        "kind": "categorical",
        "num_buckets": 4,
        "embedding_dim": 2,
        "default": "0",
    }
    config = parse_config(tiny_dict)
    schema = SchemaFitter(config).fit([])
    assert schema["category"].vocab == ["c3", "c1"]
    assert schema["age_level"].vocab == ["0", "1", "2", "3"]
    rows = pa.table(
        {
            "category": ["c1", "c3", "c9", ""],
            "age_level": pa.array([3, 0, 4, -1]),
        }
    )
    small_schema = FeatureSchema(features=[schema["category"], schema["age_level"]])
    encoded = small_schema.encode(rows)
    assert encoded["category"].tolist() == [3, 2, 1, 0]  # 2 + index, OOV 1, missing 0
    assert encoded["age_level"].tolist() == [5, 2, 1, 1]  # 2 + id; out of range -> OOV
    graph = preprocessing_graph(small_schema)
    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(
        [encoded_name("category"), encoded_name("age_level")],
        {
            "category": np.array(["c1", "c3", "c9", ""], dtype=object),
            "age_level": np.array(["3", "0", "4", "-1"], dtype=object),
        },
    )
    assert [g.tolist() for g in got] == [
        encoded["category"].tolist(),
        encoded["age_level"].tolist(),
    ]
    history = train(config, tiny_data, tmp_path / "run")  # and it trains
    assert history.best_epoch == 1


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"vocab_list": ["a", "a"]}, "features[0].vocab_list: Value error, 'a' is listed twice"),
        ({"vocab_list": ["a"], "hash_buckets": 3}, "set one of"),
        ({"num_buckets": 0}, "features[0].num_buckets"),
        ({"vocab_list": [""]}, "features[0].vocab_list[0]"),
    ],
)
def test_fixed_vocabulary_keys_are_validated(
    tiny_dict: dict[str, Any], change: dict[str, Any], message: str
) -> None:
    tiny_dict["features"][0] = {"name": "user_id", "kind": "categorical", **change}
    with pytest.raises(ConfigError) as err:
        parse_config(tiny_dict)
    assert message.replace("Value error, ", "") in str(err.value)


def test_data_keys_are_validated(tiny_dict: dict[str, Any]) -> None:
    for data, message in (
        ({"separator": "||"}, "data.separator"),
        ({"columns": ["a", "a"]}, "data.columns: column 'a' is named twice"),
        ({"header": False}, "data.header: Extra inputs"),
    ):
        tiny_dict["data"] = data
        with pytest.raises(ConfigError, match=message):
            parse_config(tiny_dict)


def test_exponential_lr_decay_per_step(
    tiny_dict: dict[str, Any], tiny_data: Path, tmp_path: Path
) -> None:
    from mmoe.model.train import train

    tiny_dict["train"].update(epochs=2, lr=0.004, lr_schedule="exponential", decay_factor=0.5)
    with pytest.raises(ConfigError, match=r"train\.decay_steps: only for lr_schedule: exponential"):
        parse_config(
            {
                **tiny_dict,
                "train": {**tiny_dict["train"], "lr_schedule": "constant", "decay_steps": 5},
            }
        )
    probe = train(
        parse_config({**tiny_dict, "train": {**tiny_dict["train"], "epochs": 1}}),
        tiny_data,
        tmp_path / "probe",
    )
    steps = json.loads((tmp_path / "probe" / "metrics.json").read_text())["steps_per_epoch"]
    assert probe.epochs[0]["lr"] == pytest.approx(0.004 * 0.5 ** (steps // 1000))
    tiny_dict["train"].update(decay_steps=steps, min_lr=0.0015)
    history = train(parse_config(tiny_dict), tiny_data, tmp_path / "run")
    # the lr after each epoch: one halving per epoch (staircase), then the floor
    assert [e["lr"] for e in history.epochs] == pytest.approx([0.002, 0.0015])
    tiny_dict["train"].update(staircase=False, decay_steps=2 * steps, min_lr=0.0)
    history = train(parse_config(tiny_dict), tiny_data, tmp_path / "smooth")
    assert [e["lr"] for e in history.epochs] == pytest.approx([0.004 * 0.5**0.5, 0.002])


def test_yaml_of_a_translation_round_trips() -> None:
    mapping = translate_file(COMPONENT).config
    assert parse_config(yaml.safe_load(yaml.safe_dump(mapping))) == parse_config(mapping)


def test_csv_written_from_taobao_data_matches_the_columns(tmp_path: Path) -> None:
    """The e2e tests' data: bench/taobao.py rows as a headerless CSV in input_fields order."""
    from tests.model.test_easyrec_serving import write_headerless_csv

    path = tmp_path / "t.csv"
    columns = translate_file(BUILTIN).config["data"]["columns"]
    write_headerless_csv(path, 50, columns)
    table = pcsv.read_csv(path, read_options=pcsv.ReadOptions(column_names=columns))
    assert table.num_rows == 50 and table.column_names == columns
