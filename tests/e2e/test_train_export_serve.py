"""The whole path through the real command line: data -> train -> export -> serve -> predict,
and the served probabilities equal PyTorch's in-process outputs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from tests.cli import mmoe
from tests.conftest import TINY_CONFIG
from tests.server import ServerProcess


@pytest.mark.slow
def test_cli_path_serves_pytorch_scores(tmp_path: Path) -> None:
    from mmoe.export.parity import torch_outputs
    from mmoe.model.checkpoint import load_run

    data = tmp_path / "train.csv"
    mmoe("data", "synthetic-ranking", "--rows", "4000", "--seed", "5", "--out", str(data))
    out = mmoe(
        "train", "--config", str(TINY_CONFIG), "--data", str(data), "--out", str(tmp_path / "run")
    )
    assert "auc_ctr=" in out
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert 0.0 <= metrics["best"]["auc_ctr"] <= 1.0  # computed; quality is test_demo's concern
    onnx_path = tmp_path / "model.onnx"
    assert "parity" in mmoe("export", str(tmp_path / "run"), "--out", str(onnx_path))

    context = {"user_id": "u12", "age_level": 3}
    candidates: dict[str, list[Any]] = {
        "item_id": ["i1", "i2", "never-seen", "", "i5"],
        "category": ["c1", "c7", "c-unknown", "c3", "c1"],
        "price": [12.5, None, 0.0, 1e6, -3.0],
        "hour": [0, 6, 12.5, 23, 18],
        "tag_brand_list": [
            ["b1", "b2"],
            [],
            "b7|b8|b9",
            None,
            ["b1", "b1", "b2", "b3", "b4", "b5"],
        ],
    }
    with ServerProcess(onnx_path, log_path=tmp_path / "server.log") as server:
        r = httpx.post(f"{server.url}/predict", json={"context": context, "candidates": candidates})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["n"] == 5 and body["model"] == {"name": "tiny", "version": "7"}

    run = load_run(tmp_path / "run")
    rows: dict[str, list[Any]] = {k: list(v) for k, v in candidates.items()}
    rows["user_id"] = ["u12"] * 5
    rows["age_level"] = ["3"] * 5
    rows["tag_brand_list"] = [
        v.split("|") if isinstance(v, str) else v for v in candidates["tag_brand_list"]
    ]
    expected = torch_outputs(run.model, run.schema, rows)
    for task in ("ctr", "cvr"):
        got = np.array(body["scores"][task])
        assert got.shape == (5,)
        assert ((got >= 0) & (got <= 1)).all()
        np.testing.assert_allclose(got, expected[f"probs_{task}"], atol=1e-5, rtol=0)
