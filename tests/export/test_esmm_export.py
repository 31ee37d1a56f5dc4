"""An ESMM model (`tasks[i].multiply`) exports pCVR and pCTCVR, and the service returns both."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import yaml

from mmoe.contract.metadata import read_metadata
from mmoe.export.exporter import export_run
from mmoe.export.parity import generate_rows, to_onnx_inputs
from mmoe.model.checkpoint import load_run
from mmoe.model.config import parse_config
from mmoe.model.train import train
from tests.conftest import TINY_CONFIG
from tests.server import ServerProcess


@pytest.fixture(scope="module")
def esmm_onnx(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    config = copy.deepcopy(yaml.safe_load(TINY_CONFIG.read_text()))
    # no `product`: cvr x ctr is served as ctcvr, the name EasyRec and DeepCTR give it
    config["tasks"][1] |= {"multiply": "ctr"}
    tmp = tmp_path_factory.mktemp("esmm")
    train(parse_config(config), tiny_data, tmp / "run")
    export_run(tmp / "run", tmp / "model.onnx", parity_rows=256)
    return tmp / "model.onnx"


def test_onnx_serves_pcvr_and_its_product_with_pctr(esmm_onnx: Path) -> None:
    session = ort.InferenceSession(str(esmm_onnx), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    assert {"probs_ctr", "probs_cvr", "probs_ctcvr"} <= set(names)
    run = load_run(esmm_onnx.parent / "run")
    feeds = to_onnx_inputs(run.schema, generate_rows(run.schema, 200))
    out = dict(zip(names, session.run(names, feeds), strict=True))
    np.testing.assert_allclose(out["probs_ctcvr"], out["probs_ctr"] * out["probs_cvr"], rtol=1e-6)
    assert not np.allclose(out["probs_ctcvr"], out["probs_cvr"])
    props = {p.key: p.value for p in onnx.load(esmm_onnx).metadata_props}
    tasks = {t.name: t for t in read_metadata(props).tasks}
    assert tasks["ctcvr"].output == "probs_ctcvr" and tasks["ctcvr"].kind == "binary"
    assert tasks["cvr"].output == "probs_cvr"


def test_the_service_returns_the_product(
    esmm_onnx: Path, start_server: Callable[..., ServerProcess]
) -> None:
    server = start_server(esmm_onnx)
    candidates = {
        "user_id": ["u1", "u2", "u3"],
        "item_id": ["i1", "i2", "never-seen"],
        "category": ["c1", "c7", "c3"],
        "price": [12.5, 3.0, 100.0],
    }
    r = httpx.post(f"{server.url}/predict", json={"candidates": candidates})
    assert r.status_code == 200, r.text
    scores = r.json()["scores"]
    assert set(scores) == {"ctr", "cvr", "ctcvr"}
    want = np.array(scores["ctr"]) * np.array(scores["cvr"])
    np.testing.assert_allclose(scores["ctcvr"], want, rtol=1e-5)
