"""The seed page's two EasyRec configs (completed with mmoe_on_taobao's features and data) train
on a headerless CSV of bench/taobao.py rows through `mmoe train`, export, and serve: outputs
probs_ctr / probs_cvr, served scores equal PyTorch's."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnx
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pytest

from tests.cli import mmoe
from tests.model.test_easyrec import BUILTIN, COMPONENT
from tests.server import ServerProcess


def write_headerless_csv(path: Path, rows: int, columns: list[str], seed: int = 3) -> pa.Table:
    """bench/taobao.py rows as EasyRec's CSVInput reads them: no header, `columns` in order,
    tags `|`-joined, price as an integer (its input_type is INT32), missing values empty."""
    from mmoe.bench.taobao import taobao_like

    table = taobao_like(rows, seed)
    out = []
    for name in columns:
        col = table.column(name)
        if pa.types.is_list(col.type):
            col = pc.binary_join(col, "|")
        elif name == "price":
            col = pc.cast(pc.round(col), pa.int64())
        out.append(col)
    written = pa.table(out, names=columns)
    pcsv.write_csv(written, path, pcsv.WriteOptions(include_header=False))
    return written


@pytest.mark.slow
@pytest.mark.parametrize("pipeline", [BUILTIN, COMPONENT], ids=["builtin", "component"])
def test_easyrec_config_trains_exports_and_serves(pipeline: Path, tmp_path: Path) -> None:
    from mmoe.export.parity import torch_outputs
    from mmoe.model.checkpoint import load_run
    from mmoe.model.easyrec import translate_file

    columns = translate_file(pipeline).config["data"]["columns"]
    data = tmp_path / "taobao.csv"
    table = write_headerless_csv(data, 3000, columns)
    run = tmp_path / "run"
    out = mmoe(
        "train", "--config", str(pipeline), "--data", str(data), "--out", str(run),
        "train.epochs=1", "train.progress=false", "train.threads=1",
    )  # fmt: skip
    assert "auc_ctr=" in out and "auc_cvr=" in out
    model = tmp_path / "model.onnx"
    assert "parity" in mmoe("export", str(run), "--out", str(model))
    outputs = [o.name for o in onnx.load(str(model), load_external_data=False).graph.output]
    assert {"probs_ctr", "probs_cvr"} <= set(outputs)

    rows = table.slice(0, 16).to_pylist()
    features = [f.name for f in load_run(run).schema.features]
    candidates: dict[str, list[Any]] = {
        name: [r[name] for r in rows] for name in features if name != "user_id"
    }
    for tags in ("tag_category_list", "tag_brand_list"):
        candidates[tags] = [v.split("|") if v else [] for v in candidates[tags]]
    context = {"user_id": rows[0]["user_id"]}
    with ServerProcess(model, log_path=tmp_path / "server.log") as server:
        r = httpx.post(
            f"{server.url}/predict", json={"context": context, "candidates": candidates}, timeout=30
        )
    assert r.status_code == 200, r.text
    scores = r.json()["scores"]
    loaded = load_run(run)
    raw = {**candidates, "user_id": [context["user_id"]] * len(rows)}
    for f in loaded.schema.features:
        if f.kind == "categorical":  # ids as the CSV is read in training: strings
            raw[f.name] = [None if v is None else str(v) for v in raw[f.name]]
    expected = torch_outputs(loaded.model, loaded.schema, raw)
    for task in ("ctr", "cvr"):
        np.testing.assert_allclose(scores[task], expected[f"probs_{task}"], atol=1e-5, rtol=0)
