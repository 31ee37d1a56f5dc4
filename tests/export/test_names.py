"""Features named like the tensors inside a network (`cat`, `add`, `relu`, `input`, ...) export,
load in plain onnxruntime and are served: internal names are prefixed, feature inputs and
outputs keep theirs."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnxruntime as ort
import pytest
import yaml

from mmoe.export.exporter import export_run
from mmoe.export.graph import FEATURE_VALUES, GATE_WEIGHTS
from mmoe.model.config import parse_config
from mmoe.model.data import write_table
from mmoe.model.synthetic import synthetic_ranking
from mmoe.model.train import train
from tests.server import ServerProcess

FEATURES = [
    {"name": "cat", "column": "category", "kind": "categorical", "embedding_dim": 4},
    {"name": "input", "column": "user_id", "kind": "categorical", "embedding_dim": 4},
    {
        "name": "output",
        "column": "item_id",
        "kind": "categorical",
        "hash_buckets": 200,
        "embedding_dim": 4,
        "default": "",
    },
    {
        "name": "mul",
        "column": "age_level",
        "kind": "categorical",
        "embedding_dim": 2,
        "default": "0",
    },
    {
        "name": "weight",
        "column": "gender",
        "kind": "categorical",
        "embedding_dim": 2,
        "default": "",
    },
    {
        "name": "embedding",
        "column": "tag_brand_list",
        "kind": "tags",
        "max_len": 3,
        "embedding_dim": 4,
        "default": [],
    },
    {"name": "add", "column": "price", "kind": "numeric", "default": 1.0, "transform": "log1p"},
    {"name": "gemm", "column": "price", "kind": "numeric", "default": 1.0, "transform": "standard"},
    {"name": "relu", "column": "hour", "kind": "numeric", "default": 12.0},
    {
        "name": "x",
        "column": "hour",
        "kind": "numeric",
        "default": 12.0,
        "boundaries": [6, 18],
        "embedding_dim": 2,
    },
    {"name": "sigmoid", "column": "hour", "kind": "numeric", "default": 0.0},
    {"name": "enc__cat", "column": "price", "kind": "numeric", "default": 0.0},
]
CONFIG = {
    "name": "names",
    "version": "1",
    "features": FEATURES,
    "tasks": [{"name": "ctr", "label": "clk", "tower": [8]}],
    "model": {"experts": 2, "expert_units": [8]},
    "train": {"batch_size": 256, "epochs": 1, "lr": 0.01, "seed": 1, "progress": False},
}
CANDIDATES: dict[str, list[Any]] = {
    "cat": ["c1", "c2", "c-new"],
    "input": ["u1", "u1", "u9"],
    "output": ["i1", "", "i3"],
    "embedding": [["b1"], "b2|b3", []],
    "add": [12.5, None, 3.0],
    "gemm": [12.5, 4.0, 3.0],
    "relu": [9.0, 13.0, 23.0],
    "x": [9.0, 13.0, 23.0],
    "sigmoid": [0.5, 1.0, 2.0],
    "enc__cat": [1.0, 2.0, 3.0],
}


@pytest.fixture(scope="module")
def names_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("names")
    write_table(synthetic_ranking(3000, seed=4), tmp / "train.parquet")
    (tmp / "config.yaml").write_text(yaml.safe_dump(CONFIG))
    train(parse_config(CONFIG), tmp / "train.parquet", tmp / "run")
    export_run(tmp / "run", tmp / "model.onnx", parity_rows=256)
    return tmp / "model.onnx"


def bare_feeds() -> dict[str, np.ndarray]:
    """CANDIDATES as arrays built by hand, as a caller without this project would."""

    def num(name: str, default: float) -> np.ndarray:
        return np.array([default if v is None else v for v in CANDIDATES[name]], np.float32)

    return {
        "cat": np.array(CANDIDATES["cat"], dtype=object),
        "input": np.array(CANDIDATES["input"], dtype=object),
        "output": np.array(CANDIDATES["output"], dtype=object),
        "mul": np.array(["0"] * 3, dtype=object),
        "weight": np.array([""] * 3, dtype=object),
        "embedding": np.array([["b1", "", ""], ["b2", "b3", ""], ["", "", ""]], dtype=object),
        "add": num("add", 1.0),
        "gemm": num("gemm", 1.0),
        "relu": num("relu", 12.0),
        "x": num("x", 12.0),
        "sigmoid": num("sigmoid", 0.0),
        "enc__cat": num("enc__cat", 0.0),
    }


@pytest.mark.slow
def test_features_named_like_tensors_export_and_are_served(
    names_onnx: Path, start_server: Callable[..., ServerProcess]
) -> None:
    session = ort.InferenceSession(str(names_onnx), providers=["CPUExecutionProvider"])
    assert {i.name for i in session.get_inputs()} == {f["name"] for f in FEATURES}
    assert {o.name for o in session.get_outputs()} == {
        "probs_ctr",
        "logits_ctr",
        FEATURE_VALUES,  # monitoring outputs: names with "/", never a feature's
        GATE_WEIGHTS,
    }
    (want,) = session.run(["probs_ctr"], bare_feeds())

    server = start_server(names_onnx)
    r = httpx.post(f"{server.url}/predict", json={"candidates": CANDIDATES}, timeout=30)
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(r.json()["scores"]["ctr"], want, rtol=0, atol=1e-6)
