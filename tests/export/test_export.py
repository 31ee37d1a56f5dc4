"""Export: one ONNX file, raw features in, PyTorch's scores out, loadable by plain onnxruntime."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from mmoe.contract.metadata import FORMAT_VERSION, METADATA_KEY, format_text, read_metadata
from mmoe.export.exporter import export_run
from mmoe.export.graph import IR_VERSION, OPSET
from mmoe.export.network import quiet_exporter
from mmoe.export.parity import ParityError, check_parity, generate_rows, torch_outputs
from mmoe.model.checkpoint import load_run
from mmoe.model.config import load_config
from mmoe.model.data import write_table
from mmoe.model.synthetic import synthetic_ranking
from mmoe.model.train import train
from tests.cli import mmoe

HERE = Path(__file__).parent.parent
ALL_KINDS = HERE / "data" / "all_kinds.yaml"


@pytest.fixture(scope="module")
def all_kinds_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    table = synthetic_ranking(3000, seed=3)
    rng = np.random.default_rng(0)
    n = table.num_rows
    dwell = np.log1p(table["price"].to_numpy(zero_copy_only=False)) + rng.normal(0, 0.1, n)
    dwell[rng.random(n) < 0.1] = np.nan  # missing regression labels
    rating = rng.integers(0, 3, n).astype(np.float64)
    tag_str = pc.binary_join(table["tag_brand_list"], ";")
    table = (
        table.append_column("dwell", pa.array(dwell, from_pandas=True))
        .append_column("rating", pa.array(rating))
        .append_column("tag_str", tag_str)
    )
    tmp = tmp_path_factory.mktemp("all_kinds")
    write_table(table, tmp / "train.parquet")
    train(load_config(ALL_KINDS), tmp / "train.parquet", tmp / "run")
    return tmp / "run"


@pytest.fixture(scope="module")
def all_kinds_onnx(all_kinds_run: Path) -> Path:
    out = all_kinds_run.parent / "model.onnx"
    export_run(all_kinds_run, out, parity_rows=512)
    return out


def raw_rows() -> dict[str, list[object]]:
    """Hand-written raw values: known, out-of-vocabulary, missing, empty and over-long tags."""
    return {
        "user_id": ["u1", "never-seen-user", "", "u2", "ü-ñ-字"],
        "item_id": ["i10", "i99999", None, "", "i7"],
        "age_level": ["3", "17", None, "0", "6"],
        "price": [12.5, None, 0.0, -4.0, 1e6],
        "age_num": [3.0, 17.0, 0.0, -1.0, 6.0],
        "raw_hour": [0.0, 23.5, None, 6.0, 12.0],
        "hour": [5.999, 6.0, None, 18.0, 30.0],
        "tag_brand_list": [["b1", "b2"], [], None, ["b1", "zz", "b3", "b4", "b5"], ["b2"]],
        "tag_str": [["b1"], ["x", "", "y"], [], ["b7", "b8", "b9", "b1", "b2", "b3", "b4"], ["a"]],
    }


def bare_feeds(rows: dict[str, list[object]]) -> dict[str, np.ndarray]:
    """The graph's inputs built by hand with numpy, as a caller without this project would:
    strings for ids, float32 (NaN = missing) for numbers, [N, max_len] strings padded with ""."""

    def pad(lists: list[object], width: int, default: list[str]) -> np.ndarray:
        out = np.full((len(lists), width), "", dtype=object)
        for i, v in enumerate(lists):
            tokens = [t for t in (default if v is None else v) if t][:width]  # type: ignore[attr-defined]
            out[i, : len(tokens)] = tokens
        return out

    def ids(values: list[object], default: str) -> np.ndarray:
        return np.array([default if v is None else v for v in values], dtype=object)

    def num(values: list[object]) -> np.ndarray:
        return np.array([np.nan if v is None else v for v in values], dtype=np.float32)

    return {
        "user_id": ids(rows["user_id"], ""),
        "item_id": ids(rows["item_id"], "none"),
        "age_level": ids(rows["age_level"], "0"),
        "price": num(rows["price"]),
        "age_num": num(rows["age_num"]),
        "raw_hour": num(rows["raw_hour"]),
        "hour": num(rows["hour"]),
        "tag_brand_list": pad(rows["tag_brand_list"], 3, []),
        "tag_str": pad(rows["tag_str"], 5, []),
    }


@pytest.mark.slow
def test_bare_onnxruntime_matches_pytorch_for_every_kind(
    all_kinds_run: Path, all_kinds_onnx: Path
) -> None:
    session = ort.InferenceSession(str(all_kinds_onnx), providers=["CPUExecutionProvider"])
    rows = raw_rows()
    names = [o.name for o in session.get_outputs()]
    got = dict(zip(names, session.run(names, bare_feeds(rows)), strict=True))
    assert set(names) == {
        "probs_ctr",
        "logits_ctr",
        "y_dwell",
        "probs_rating",
        "logits_rating",
        # Not scores (docs/monitoring.md): named apart, listed in the metadata.
        "monitor/feature_values",
        "monitor/gate_weights",
    }
    run = load_run(all_kinds_run)
    expected = torch_outputs(run.model, run.schema, rows)
    for name, want in expected.items():
        assert got[name].shape == want.shape, name
        rtol = 0 if name.startswith("probs_") else 1e-5  # unbounded outputs: float32 resolution
        np.testing.assert_allclose(got[name], want, atol=1e-5, rtol=rtol, err_msg=name)
    assert got["probs_rating"].shape == (5, 3)
    np.testing.assert_allclose(got["probs_rating"].sum(1), 1.0, atol=1e-5)
    assert ((got["probs_ctr"] > 0) & (got["probs_ctr"] < 1)).all()


@pytest.mark.slow
def test_graph_inputs_are_raw_features_only(all_kinds_onnx: Path) -> None:
    model = onnx.load(str(all_kinds_onnx))
    inputs = {i.name: i.type.tensor_type for i in model.graph.input}
    string, float32 = onnx.TensorProto.STRING, onnx.TensorProto.FLOAT
    assert {k: v.elem_type for k, v in inputs.items()} == {
        "user_id": string,
        "item_id": string,
        "age_level": string,
        "price": float32,
        "age_num": float32,
        "raw_hour": float32,
        "hour": float32,
        "tag_brand_list": string,
        "tag_str": string,
    }
    tag_dims = [d.dim_param or d.dim_value for d in inputs["tag_str"].shape.dim]
    assert tag_dims == ["batch", 5]
    assert not model.graph.initializer or all(i.name not in inputs for i in model.graph.initializer)
    # Vocabularies and hashing are in the graph.
    ops = {n.op_type for n in model.graph.node}
    assert {"LabelEncoder", "MurmurHash3"} <= ops


@pytest.mark.slow
def test_file_versions_and_metadata(all_kinds_onnx: Path) -> None:
    model = onnx.load(str(all_kinds_onnx))
    assert model.ir_version == IR_VERSION
    opsets = {o.domain: o.version for o in model.opset_import}
    assert opsets[""] == OPSET and opsets["ai.onnx.ml"] == 3
    assert len(model.opset_import) == len(opsets)  # each domain once
    onnx.checker.check_model(model, full_check=True)
    meta = read_metadata({p.key: p.value for p in model.metadata_props})
    assert (meta.name, meta.version) == ("all_kinds", "3")
    assert [t.output for t in meta.tasks] == ["probs_ctr", "y_dwell", "probs_rating"]
    assert meta.tasks[2].num_class == 3
    by_name = {f.name: f for f in meta.features}
    assert by_name["user_id"].required and not by_name["item_id"].required
    assert by_name["tag_str"].separator == ";" and by_name["tag_str"].max_len == 5
    assert meta.config_hash and meta.exported_at
    assert METADATA_KEY in {p.key for p in model.metadata_props}


def test_parity_check_refuses_a_graph_that_differs(tiny_run: Path, tmp_path: Path) -> None:
    run = load_run(tiny_run)
    from mmoe.export.assemble import assemble

    data = assemble(run).SerializeToString()
    cols = generate_rows(run.schema, 64)
    assert check_parity(run.model, run.schema, data, cols).max_abs_diff < 1e-5
    # Same graph, PyTorch weights nudged: the check must notice.
    with __import__("torch").no_grad():
        next(run.model.net.parameters()).add_(0.05)
    with pytest.raises(ParityError, match="differs"):
        check_parity(run.model, run.schema, data, cols)


def test_a_failed_write_leaves_no_temporary_file(tiny_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "taken"
    out.mkdir()  # the rename onto a directory fails after the file was written
    with pytest.raises(OSError):
        export_run(tiny_run, out, parity_rows=16)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def test_export_refuses_a_directory_that_is_not_a_run(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not a training run"):
        export_run(tmp_path, tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.slow
def test_variants_are_written_and_run(tiny_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "m.onnx"
    report = export_run(tiny_run, out, parity_rows=128, optimize=True, int8=True, fp16=True)
    assert report.parity_max_abs_diff < 1e-5
    for tag in ("opt", "int8", "fp16"):
        path = tmp_path / f"m.{tag}.onnx"
        s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        assert {i.name for i in s.get_inputs()} == {
            i.name for i in ort.InferenceSession(str(out)).get_inputs()
        }
    assert report.variants["opt"]["max_abs_diff"] < 1e-5
    assert report.variants["int8"]["max_abs_diff"] < 0.05  # quantization drift on probabilities
    assert report.variants["fp16"]["max_abs_diff"] < 0.01
    # Each variant's golden rows allow its drift: a server loads it.
    for tag in ("opt", "int8"):
        assert "match what was exported" in mmoe("verify", str(tmp_path / f"m.{tag}.onnx"))


def test_inspect_prints_schema_tasks_and_io(tiny_onnx: Path) -> None:
    text = mmoe("inspect", str(tiny_onnx))
    for expected in (
        "tiny v7",
        "user_id",
        "required",
        "murmur3 hash into 1000 buckets",
        "tag_brand_list",
        "[batch, 4]",
        "probs_ctr",
        "probs_cvr",
        "IR 9",
        f"metadata format {format_text(FORMAT_VERSION)}",
        "golden rows (8:",
        "monitoring   outputs monitor/feature_values, monitor/gate_weights",
        "mean score ctr",
        '  1  {"user_id": "u',  # a golden row as a caller sends it
        "-> probs_ctr ",
    ):
        assert expected in text, expected


def test_the_exporter_is_kept_quiet_and_logging_left_as_it_was(
    capsys: pytest.CaptureFixture[str],
) -> None:
    logger = logging.getLogger("torch.onnx")
    before = logger.level
    logger.setLevel(logging.INFO)
    try:
        with quiet_exporter():
            print("[torch.onnx] Run decompositions...")
            assert logger.level == logging.ERROR
        assert logger.level == logging.INFO
        assert capsys.readouterr().out == ""
    finally:
        logger.setLevel(before)
