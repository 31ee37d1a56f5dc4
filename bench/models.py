"""The models the benchmark runs on, and building whatever of them is missing (data, training
run, ONNX file), so `mmoe bench` works from a fresh checkout."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from mmoe.bench import taobao


@dataclass(frozen=True)
class BenchModel:
    name: str
    run_dir: Path
    onnx: Path
    data: Path
    # Features sent once per request (the user); the others are per-candidate columns.
    context: tuple[str, ...] = ()
    config: Path | None = None
    generate: Callable[[int, int], pa.Table] | None = None  # (rows, seed) -> training data
    rows: int = 200_000


def _synthetic_ranking(rows: int, seed: int) -> pa.Table:
    from mmoe.model.synthetic import synthetic_ranking

    return synthetic_ranking(rows, seed)


MODELS = {
    "demo": BenchModel(
        "demo",
        Path("runs/demo"),
        Path("models/demo.onnx"),
        Path("data/demo.parquet"),
        ("user_id", "age_level", "gender"),
        Path("configs/demo.yaml"),
        _synthetic_ranking,
        200_000,
    ),
    "easyrec": BenchModel(
        "easyrec_taobao",
        Path("runs/easyrec_taobao"),
        Path("models/easyrec_taobao.onnx"),
        Path("data/easyrec_taobao.parquet"),
        tuple(taobao.CONTEXT_FEATURES),
        Path("configs/easyrec_taobao.yaml"),
        taobao.taobao_like,
        300_000,
    ),
}


def _loads(run_dir: Path) -> bool:
    """True when the run exists and the current model code can load it."""
    if not (run_dir / "weights.pt").exists():
        return False
    from mmoe.model.checkpoint import load_run

    try:
        load_run(run_dir)
    except Exception:  # the network or config format changed since it was trained
        return False
    return True


def prepare(model: BenchModel, say: Callable[[str], None] = print) -> None:
    """Generate the data, train and export, for whichever of the three is missing or stale (a
    run the current code cannot load is trained again; an ONNX file older than its run's
    weights is exported again), so the service and the baseline serve the same weights."""
    if not model.data.exists():
        if model.generate is None:
            raise FileNotFoundError(f"{model.data} is missing")
        from mmoe.model.data import write_table

        say(f"{model.name}: generating {model.rows} rows -> {model.data}")
        write_table(model.generate(model.rows, 7), model.data)
    weights = model.run_dir / "weights.pt"
    if not _loads(model.run_dir):
        if model.config is None:
            raise FileNotFoundError(f"{model.run_dir} is not a training run this code can load")
        from mmoe.model.config import load_config
        from mmoe.model.train import train

        say(f"{model.name}: training {model.config} -> {model.run_dir}")
        train(load_config(model.config), model.data, model.run_dir)
    if not model.onnx.exists() or model.onnx.stat().st_mtime < weights.stat().st_mtime:
        from mmoe.export.exporter import export_run

        say(f"{model.name}: exporting -> {model.onnx}")
        export_run(model.run_dir, model.onnx)
