"""Request context computed once: `context: true` in the config reaches the schema and the
file's metadata; the exported graph takes context inputs with batch 1 or N and scores a request
exactly as the same request sent flat, and as PyTorch, for every network shape and feature kind.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from mmoe.contract.metadata import FeatureInfo, ModelMetadata, read_metadata
from mmoe.export.exporter import export_run
from mmoe.export.graph import BATCH_DIM, CONTEXT_DIM
from mmoe.export.parity import (
    ParityError,
    RawColumn,
    check_parity,
    generate_rows,
    to_onnx_inputs,
    torch_outputs,
)
from mmoe.model.checkpoint import load_run
from mmoe.model.config import ConfigError, parse_config
from mmoe.model.data import write_table
from mmoe.model.synthetic import synthetic_ranking
from mmoe.model.train import train
from tests.cli import mmoe

# Every feature kind, twice where it has variants; two training columns feed two features each.
FEATURES: list[dict[str, Any]] = [
    {"name": "user_id", "kind": "categorical", "vocab": {"min_count": 2}, "embedding_dim": 4},
    {"name": "age_level", "kind": "categorical", "embedding_dim": 2, "default": "0"},
    {"name": "item_id", "kind": "categorical", "hash_buckets": 500, "embedding_dim": 4,
     "default": "none"},
    {"name": "category", "kind": "categorical", "embedding_dim": 3},
    {"name": "price", "kind": "numeric", "default": 1.0, "transform": "log1p"},
    {"name": "age_num", "column": "age_level", "kind": "numeric", "transform": "standard"},
    {"name": "raw_hour", "column": "hour", "kind": "numeric", "default": 0.0},
    {"name": "hour", "kind": "numeric", "default": 12.0, "boundaries": [6, 12, 18],
     "embedding_dim": 2},
    {"name": "tag_brand_list", "kind": "tags", "max_len": 3, "embedding_dim": 4, "default": []},
    {"name": "tag_hashed", "column": "tag_brand_list", "kind": "tags", "pooling": "sum",
     "max_len": 5, "hash_buckets": 64, "embedding_dim": 3},
]  # fmt: skip
# Between them, every kind as context: a vocabulary and a hashed id, each numeric transform and
# boundaries, tags with a vocabulary and hashed.
USER = ("user_id", "age_level", "age_num", "raw_hour", "hour", "tag_brand_list")
ITEM = ("item_id", "price", "tag_hashed")

VARIANTS: dict[str, tuple[dict[str, Any], tuple[str, ...]]] = {
    "mmoe-user": ({"experts": 3, "expert_units": [8, 4]}, USER),
    "mmoe-item": ({"experts": 3, "expert_units": [8, 4]}, ITEM),
    "gate_units-batch_norm": (
        {"experts": 2, "expert_units": [8, 4], "gate_units": [4], "batch_norm": True},
        USER,
    ),
    "shared_gate": ({"experts": 2, "expert_units": [8], "gate": "shared"}, ITEM),
    "shared_bottom": ({"experts": 1, "expert_units": [8]}, USER),
    "ple": (
        {
            "kind": "ple",
            "experts": 2,
            "task_experts": 2,
            "ple_layers": 2,
            "expert_units": [8],
            "gate_units": [4],
            "batch_norm": True,
        },
        USER,
    ),
    "senet": ({"experts": 2, "expert_units": [8], "senet": {"reduction_ratio": 2}}, ITEM),
    "senet-batch_norm": (
        {"experts": 2, "expert_units": [8], "senet": {"reduction_ratio": 3}, "batch_norm": True},
        USER,
    ),
}


def config(model: dict[str, Any], context: tuple[str, ...]) -> dict[str, Any]:
    return {
        "name": "ctx",
        "features": [{**f, "context": f["name"] in context} for f in FEATURES],
        "tasks": [
            {"name": "ctr", "label": "clk", "tower": [4]},
            {"name": "cvr", "label": "buy", "tower": [4]},
        ],
        "model": model,
        "train": {"batch_size": 256, "epochs": 1, "seed": 5, "progress": False, "threads": 1},
    }


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("context") / "train.parquet"
    write_table(synthetic_ranking(3000, seed=3), path)
    return path


@pytest.fixture(scope="module", params=list(VARIANTS))
def exported(
    request: pytest.FixtureRequest, data: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, Path]:
    """(run dir, model.onnx) of a variant; the export itself checked parity at both shapes."""
    model, context = VARIANTS[request.param]
    tmp = tmp_path_factory.mktemp(request.param)
    train(parse_config(config(model, context)), data, tmp / "run")
    export_run(tmp / "run", tmp / "model.onnx", parity_rows=256)
    return tmp / "run", tmp / "model.onnx"


def one_request(
    cols: dict[str, RawColumn], context: list[str] | tuple[str, ...], n: int
) -> dict[str, RawColumn]:
    """n rows of `cols` as one ranking request: each context feature holds its first value."""
    return {k: [v[0]] * n if k in context else v[:n] for k, v in cols.items()}


@pytest.mark.slow
@pytest.mark.parametrize("n", [1, 7, 64])
def test_context_once_scores_the_request_as_flat_and_as_pytorch(
    exported: tuple[Path, Path], n: int
) -> None:
    run_dir, path = exported
    run = load_run(run_dir)
    context = run.schema.context_features
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    cols = generate_rows(run.schema, 64, seed=n)
    request = one_request(cols, context, n)
    flat = to_onnx_inputs(run.schema, request)  # context broadcast: n rows each
    once = {k: v[:1] if k in context else v for k, v in flat.items()}
    assert once[context[0]].shape[0] == 1
    got_once = dict(zip(names, session.run(names, once), strict=True))
    got_flat = dict(zip(names, session.run(names, flat), strict=True))
    expected = torch_outputs(run.model, run.schema, request)
    assert set(expected) == set(names)
    for name in names:
        assert got_once[name].shape == expected[name].shape, name
        np.testing.assert_allclose(got_once[name], got_flat[name], atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(got_once[name], expected[name], atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def user_run(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    model, context = VARIANTS["mmoe-user"]
    out = tmp_path_factory.mktemp("user") / "run"
    train(parse_config(config(model, context)), data, out)
    return out


@pytest.mark.slow
def test_context_inputs_have_their_own_batch_axis_and_are_declared(
    user_run: Path, tmp_path: Path
) -> None:
    export_run(user_run, tmp_path / "m.onnx", parity_rows=128)
    model = onnx.load(str(tmp_path / "m.onnx"))
    batch = {i.name: i.type.tensor_type.shape.dim[0].dim_param for i in model.graph.input}
    assert batch == {f["name"]: CONTEXT_DIM if f["name"] in USER else BATCH_DIM for f in FEATURES}
    tag_dims = [d.dim_param or d.dim_value for d in _input(model, "tag_brand_list").shape.dim]
    assert tag_dims == [CONTEXT_DIM, 3]
    meta = read_metadata({p.key: p.value for p in model.metadata_props})
    assert [f.name for f in meta.features if f.context] == list(USER)
    assert all(o.type.tensor_type.shape.dim[0].dim_param == BATCH_DIM for o in model.graph.output)
    # Nothing of size [N, H] is built from the context before it meets the candidates.
    assert "Expand" not in {n.op_type for n in model.graph.node}


def _input(model: onnx.ModelProto, name: str) -> onnx.TypeProto.Tensor:
    return next(i for i in model.graph.input if i.name == name).type.tensor_type


@pytest.mark.slow
def test_without_context_every_input_is_per_row(user_run: Path, tmp_path: Path) -> None:
    """The naive graph: same scores, no context declared, and a [1]-shaped context refused."""
    text = mmoe("export", str(user_run), "--out", str(tmp_path / "naive.onnx"), "--no-context")
    assert "parity" in text and "once per request" not in text
    text = mmoe("export", str(user_run), "--out", str(tmp_path / "context.onnx"))
    assert f"context (once per request): {', '.join(USER)}" in text
    naive = onnx.load(str(tmp_path / "naive.onnx"))
    assert {i.type.tensor_type.shape.dim[0].dim_param for i in naive.graph.input} == {BATCH_DIM}
    meta = read_metadata({p.key: p.value for p in naive.metadata_props})
    assert not any(f.context for f in meta.features)

    run = load_run(user_run)
    cols = generate_rows(run.schema, 32, seed=1)
    flat = to_onnx_inputs(run.schema, one_request(cols, USER, 32))
    sessions = {
        k: ort.InferenceSession(str(tmp_path / f"{k}.onnx"), providers=["CPUExecutionProvider"])
        for k in ("naive", "context")
    }
    once = {k: v[:1] if k in USER else v for k, v in flat.items()}
    for a, b in zip(
        sessions["naive"].run(None, flat), sessions["context"].run(None, once), strict=True
    ):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
    with pytest.raises(Exception, match=r"Concat|dimension|shape"):
        sessions["naive"].run(None, once)


@pytest.mark.slow
def test_parity_check_refuses_a_file_whose_graph_does_not_take_its_context_once(
    user_run: Path, tmp_path: Path
) -> None:
    """A per-row graph whose metadata says context: the flat rows agree with PyTorch, the
    requests with the context given once do not run, and the check says so."""
    export_run(user_run, tmp_path / "naive.onnx", parity_rows=64, context=False)
    model = onnx.load(str(tmp_path / "naive.onnx"))
    props = {p.key: p.value for p in model.metadata_props}
    meta = read_metadata(props)
    claimed = meta.model_copy(
        update={
            "features": [f.model_copy(update={"context": f.name in USER}) for f in meta.features]
        }
    )
    onnx.helper.set_model_props(model, claimed.to_props())
    run = load_run(user_run)
    cols = generate_rows(run.schema, 128)
    with pytest.raises(ParityError, match="context inputs given once"):
        check_parity(run.model, run.schema, model.SerializeToString(), cols)


# ------------------------------------------------------------------------------- the flag


def test_the_flag_reaches_the_fitted_schema(tiny_context_run: Path) -> None:
    from tests.conftest import TINY_CONTEXT

    run = load_run(tiny_context_run)
    assert run.schema.context_features == list(TINY_CONTEXT)
    assert [f.name for f in run.config.features if f.context] == list(TINY_CONTEXT)


def test_a_config_with_only_context_features_is_refused() -> None:
    all_context = config({}, tuple(f["name"] for f in FEATURES))
    with pytest.raises(ConfigError, match="features: every feature the network reads is"):
        parse_config(all_context)
    bad = config({}, USER)
    bad["features"][0]["context"] = "sometimes"
    with pytest.raises(ConfigError, match=r"features\[0\]\.context"):
        parse_config(bad)


def test_metadata_without_the_flag_still_loads() -> None:
    """Files exported before `context` existed: every feature per row."""
    raw = FeatureInfo(name="user_id", kind="categorical", dtype="string").model_dump()
    del raw["context"]
    meta = ModelMetadata(name="m", version="1", features=[], tasks=[]).model_dump()
    meta["features"] = [raw]
    loaded = read_metadata({"mmoe": json.dumps(meta)})
    assert loaded.features[0].context is False
