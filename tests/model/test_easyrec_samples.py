"""EasyRec's own multi-task sample configs (../shared/easyrec-samples, read in place): every
MMoE, ESMM and PLE sample trains as shipped, on rows of its input_fields (generated Taobao rows,
real census rows); the DBMTL, AITM and SimpleMultiTask ones are refused with one line naming
the one thing they need that this project lacks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pyarrow as pa
import pyarrow.csv as pcsv
import pytest

from mmoe.cli import main
from mmoe.model.config import RunConfig
from mmoe.model.easyrec import load_pipeline_config, translate_file
from mmoe.model.train import train
from tests.model.test_easyrec_serving import write_headerless_csv

SHARED = Path(__file__).resolve().parents[2] / ".." / "shared"
SAMPLES = SHARED / "easyrec-samples"
CENSUS = SHARED / "data" / "census-income" / "census-income.test.gz"

# sample -> what its translation must be: (model kind, experts or shared experts)
TRAINS: dict[str, tuple[str, int]] = {
    "mmoe_on_taobao.config": ("mmoe", 4),
    "mmoe_on_taobao_deprecated.config": ("mmoe", 4),
    "mmoe_on_taobao_with_multi_loss.config": ("mmoe", 4),
    "mmoe_mirrored_strategy_on_taobao.config": ("mmoe", 3),
    "mmoe_backbone_on_taobao.config": ("mmoe", 3),
    "mmoe_component_seed_doc.config": ("mmoe", 3),
    "mmoe_census_income.config": ("mmoe", 4),
    "odps_mmoe_demo.config": ("mmoe", 4),
    "esmm_on_taobao.config": ("mmoe", 1),
    "ple_on_taobao.config": ("ple", 3),
}
REFUSED = {
    "dbmtl_on_taobao.config": "model_class: 'DBMTL' is not trained here: DBMTL needs task "
    "relations (a tower that reads other towers' outputs",
    "dbmtl_mmoe_on_taobao.config": "model_class: 'DBMTL' is not trained here: DBMTL needs task "
    "relations",
    "dbmtl_backbone_on_taobao.config": "relation_tower_names: DBMTL needs task relations",
    "aitm_on_taobao.config": "keras_layer 'AITMTower': AITM needs information passed from one "
    "task's tower into the next",
    "simple_multi_task_on_taobao.config": "model_class: 'SimpleMultiTask' is not trained here: "
    "its towers read the features with nothing shared between the tasks",
    "simple_multi_task_backbone_on_taobao.config": "the backbone has no MMoE block: its towers "
    "read the features with nothing shared",
}


def test_every_sample_is_covered() -> None:
    assert {p.name for p in SAMPLES.glob("*.config")} == set(TRAINS) | set(REFUSED)


def census_csv(path: Path, columns: list[str], rows: int) -> pa.Table:
    """Real census rows in mmoe_census_income.config's input_fields order: label_1 (income),
    label_2 (never married), then the 40 other columns of the file in its order."""
    from mmoe.bench.census import COLUMNS, read_census

    table = read_census(CENSUS).slice(0, rows)
    source = ["income", "marital"] + [c for c in COLUMNS if c not in ("marital_stat", "income_50k")]
    assert len(source) == len(columns)
    out = pa.table([table.column(c) for c in source], names=columns)
    pcsv.write_csv(out, path, pcsv.WriteOptions(include_header=False))
    return out


def sample_data(name: str, config: RunConfig, tmp: Path) -> Path:
    tmp.mkdir(parents=True, exist_ok=True)
    data = tmp / "rows.csv"
    assert config.data.columns is not None
    if name == "mmoe_census_income.config":
        census_csv(data, config.data.columns, 3000)
    else:
        write_headerless_csv(data, 1200, config.data.columns)
    return data


@pytest.mark.parametrize("name", sorted(TRAINS))
def test_sample_trains_as_shipped(name: str, tmp_path: Path) -> None:
    # Shorter than shipped (one epoch of the generated rows), unchanged otherwise.
    config, _, _ = load_pipeline_config(SAMPLES / name, ["train.epochs=1"])
    kind, experts = TRAINS[name]
    assert (config.model.kind, config.model.experts) == (kind, experts)
    history = train(config, sample_data(name, config, tmp_path), tmp_path / "run")
    best = history.best
    for task in config.tasks:
        assert 0.0 <= best[f"auc_{task.name}"] <= 1.0, (task.name, best)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert len(metrics["epochs"]) == 1


def test_data_sources_and_input_types_are_a_note_not_an_error() -> None:
    """Hive blocks, ODPS input and paths say where EasyRec reads rows: here --data does."""
    for name, named in [
        (
            "mmoe_census_income.config",
            "hive_train_input, hive_eval_input, data_config.input_type HiveInput: not read",
        ),
        (
            "odps_mmoe_demo.config",
            "train_input_path, eval_input_path, data_config.input_type "
            "OdpsInputV2, model_dir, export_config: not read",
        ),
    ]:
        notes = translate_file(SAMPLES / name).notes
        lines = [n for n in notes if "the rows come from --data" in n]
        assert len(lines) == 1 and lines[0].startswith(named), notes
        assert "in data_config.input_fields order" in lines[0]


def test_deprecated_experts_form_is_the_expert_dnn_form() -> None:
    """`mmoe { experts { expert_name, dnn } x4 }` trains the same model as
    `mmoe { expert_dnn, num_expert: 4 }` (mmoe_on_taobao), with a note."""
    old = translate_file(SAMPLES / "mmoe_on_taobao_deprecated.config")
    new = translate_file(SAMPLES / "mmoe_on_taobao.config")
    assert old.config["model"] == new.config["model"]
    assert any(
        n.startswith("mmoe.experts (EasyRec's deprecated form): 4 experts") for n in old.notes
    )


def test_raw_feature_options_easyrec_ignores_are_noted() -> None:
    t = translate_file(SAMPLES / "mmoe_census_income.config")
    age = next(f for f in t.config["features"] if f["name"] == "age")
    assert age == {"name": "age", "kind": "numeric", "default": 0.0}  # hash_bucket_size, dim 9
    note = next(n for n in t.notes if n.startswith("RawFeature options ignored"))
    assert "age (hash_bucket_size, embedding_dim)" in note


def test_several_losses_per_tower_train_a_pairwise_term() -> None:
    t = translate_file(SAMPLES / "mmoe_on_taobao_with_multi_loss.config")
    ctr, cvr = t.config["tasks"]
    assert ctr["losses"] == [
        {"kind": "pointwise", "weight": 1.0},
        {"kind": "pairwise", "weight": 1.0},
    ]
    assert "losses" not in cvr


def test_distribution_strategy_is_a_note() -> None:
    notes = translate_file(SAMPLES / "mmoe_mirrored_strategy_on_taobao.config").notes
    assert any(
        n.startswith("train_config.train_distribute MultiWorkerMirroredStrategy") for n in notes
    )


def test_num_steps_bound_the_run() -> None:
    """EasyRec stops at num_steps (num_epochs, when set, can stop it first)."""
    esmm = translate_file(SAMPLES / "esmm_on_taobao.config").config["train"]
    assert (esmm["num_steps"], esmm["epochs"]) == (100, 100)  # num_epochs 10000
    census = translate_file(SAMPLES / "mmoe_census_income.config").config["train"]
    assert (census["num_steps"], census["epochs"]) == (25, 1)  # num_epochs 1


@pytest.mark.slow
def test_esmm_and_ple_samples_export_and_serve_their_tasks(tmp_path: Path) -> None:
    """ESMM's groups become one bottom and its product `ctcvr`; PLE keeps three extraction
    layers of different widths. Both export to one ONNX file that answers raw rows."""
    from mmoe.export.exporter import export_run
    from mmoe.export.parity import generate_rows, to_onnx_inputs
    from mmoe.model.checkpoint import load_run

    expected = {
        "esmm_on_taobao.config": {"probs_ctr", "probs_cvr", "probs_ctcvr"},
        "ple_on_taobao.config": {"probs_ctr", "probs_cvr"},
    }
    for name, outputs in expected.items():
        # smaller id tables than shipped (100,000 rows each make a 70 MB file): a faster export
        features = translate_file(SAMPLES / name).config["features"]
        smaller = [
            f"features.{i}.hash_buckets=1000"
            for i, f in enumerate(features)
            if f.get("hash_buckets", 0) > 1000
        ]
        config, _, _ = load_pipeline_config(SAMPLES / name, ["train.epochs=1", *smaller])
        if name == "ple_on_taobao.config":
            assert config.model.ple_expert_units == [[128, 64, 32], [64, 32, 16], [64, 32, 16]]
        run = tmp_path / name / "run"
        train(config, sample_data(name, config, tmp_path / name), run)
        onnx_path = tmp_path / name / "model.onnx"
        export_run(run, onnx_path, parity_rows=64)
        session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        assert outputs <= {o.name for o in session.get_outputs()}
        schema = load_run(run).schema
        inputs = to_onnx_inputs(schema, generate_rows(schema, 5))
        names = [o.name for o in session.get_outputs()]
        got = dict(zip(names, session.run(None, inputs), strict=True))
        assert all(np.all((got[o] >= 0) & (got[o] <= 1)) for o in outputs)


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_other_samples_are_refused_in_one_line(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    args = ["train", "--config", str(SAMPLES / name), "--data", "unused.csv", "--out", str(out)]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith(f"error: {SAMPLES / name}:")
    assert REFUSED[name] in err and err.endswith(
        "MMoE, ESMM and PLE configs train here (docs/easyrec.md)"
    )
    assert not out.exists()
