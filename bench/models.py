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
    # The same run exported without context declarations (every row recomputes the context, as
    # any other exporter's graph does): the naive floor. None: `onnx` is the only graph.
    naive_onnx: Path | None = None
    # The item key and the item features (the key's per-item columns), for item-feature runs.
    items: tuple[str, tuple[str, ...]] | None = None

    @property
    def naive(self) -> Path:
        return self.naive_onnx or self.onnx


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
        Path("models/demo.naive.onnx"),
        ("item_id", ("category", "price", "tag_brand_list")),
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
        Path("models/easyrec_taobao.naive.onnx"),
        ("adgroup_id", ("cate_id", "campaign_id", "customer", "brand", "price")),
    ),
}


def _current(model: BenchModel) -> bool:
    """True when the run exists, the current model code can load it, and it was trained from
    the config file as it is now (an edited config, say newly declared context features, is
    trained and exported again)."""
    if not (model.run_dir / "weights.pt").exists():
        return False
    from mmoe.model.checkpoint import load_run

    try:
        run = load_run(model.run_dir)
    except Exception:  # the network or config format changed since it was trained
        return False
    if model.config is None:
        return True
    from mmoe.model.config import load_config

    return run.config == load_config(model.config)


def prepare(model: BenchModel, say: Callable[[str], None] = print) -> None:
    """Generate the data, train and export, for whichever of them is missing or stale (a run
    the current code cannot load is trained again; an ONNX file older than its run's weights is
    exported again), so the service and the baseline serve the same weights; the same for the
    naive graph (exported without context declarations)."""
    if not model.data.exists():
        if model.generate is None:
            raise FileNotFoundError(f"{model.data} is missing")
        from mmoe.model.data import write_table

        say(f"{model.name}: generating {model.rows} rows -> {model.data}")
        write_table(model.generate(model.rows, 7), model.data)
    weights = model.run_dir / "weights.pt"
    if not _current(model):
        if model.config is None:
            raise FileNotFoundError(f"{model.run_dir} is not a training run this code can load")
        from mmoe.model.config import load_config
        from mmoe.model.train import train

        say(f"{model.name}: training {model.config} -> {model.run_dir}")
        train(load_config(model.config), model.data, model.run_dir)
    from mmoe.export.exporter import export_run

    if _stale(model.onnx, weights):
        say(f"{model.name}: exporting -> {model.onnx}")
        export_run(model.run_dir, model.onnx)
    if model.naive_onnx is not None and _stale(model.naive_onnx, weights):
        say(f"{model.name}: exporting without context declarations -> {model.naive_onnx}")
        export_run(model.run_dir, model.naive_onnx, context=False)


def _stale(onnx: Path, weights: Path) -> bool:
    return not onnx.exists() or onnx.stat().st_mtime < weights.stat().st_mtime
