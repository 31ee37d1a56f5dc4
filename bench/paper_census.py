"""The MMoE paper's real-data experiment (Ma et al., KDD 2018, section 6.2, Table 1): census-income
with two tasks, income over 50K and marital status "Never married"; MMoE against Shared-Bottom,
OMoE and one single-task model per task, several seeds, AUC per task measured through each run's
exported ONNX file (raw values in), next to the paper's Table 1.

    mmoe bench paper-census --data census-income.test.gz                 # 50/25/25 of one file
    mmoe bench paper-census --data census-income.test.gz --train census-income.data.gz
    mmoe bench paper-census --data census-income.test.gz --quick         # a smoke run

With only the test file (99,762 rows) its rows are shuffled (seed 0) and split 50/25/25 into
training, validation and test rows; with the training file too (199,523 rows), as in the paper,
the models train on it and the test file is split 1:1 into validation and test rows. Every model
stops early on the validation income AUC (the marital-only model on marital AUC) and is scored
on the test rows through `mmoe export`'s file with onnxruntime. docs/paper_census.md has the
results and what differs from the paper.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mmoe.bench.census import CATEGORICAL, NUMERIC, read_census

TASKS = ("income", "marital")
# model -> (experts, gate, tasks); the single-task models are one Shared-Bottom network per task
MODELS: dict[str, tuple[int, str, tuple[str, ...]]] = {
    "MMoE": (8, "per_task", TASKS),
    "OMoE": (8, "shared", TASKS),
    "Shared-Bottom": (1, "per_task", TASKS),
    "Single-task income": (1, "per_task", ("income",)),
    "Single-task marital": (1, "per_task", ("marital",)),
}
# Table 1 of the paper (trained on the training file): AUC (best, mean) per task.
PAPER = {
    "MMoE": {"income": (0.9410, 0.9359), "marital": (0.9926, 0.9927)},
    "Shared-Bottom": {"income": (0.9361, 0.9295), "marital": (0.9915, 0.9921)},
}


@dataclass(frozen=True)
class Setting:
    seeds: int = 3
    experts: int = 8
    expert_units: tuple[int, ...] = (64,)
    tower: tuple[int, ...] = (32,)
    embedding_dim: int = 8
    batch_size: int = 1024
    lr: float = 0.001
    epochs: int = 30
    patience: int = 3
    batch_norm: bool = True
    models: tuple[str, ...] = tuple(MODELS)
    rows: int | None = None  # only the first rows of each split (a smoke run)
    train_fraction: float = 1.0  # train on this share of the training rows (valid, test alike)


QUICK = Setting(seeds=1, epochs=2, models=("MMoE", "Shared-Bottom"), rows=3000)


def splits(data: Path, train: Path | None) -> dict[str, pa.Table]:
    """train / valid / test rows: the paper's (train file; test file 1:1) or 50/25/25 of one."""
    test = read_census(data)
    order = np.random.default_rng(0).permutation(test.num_rows)
    if train is not None:
        half = test.num_rows // 2
        return {
            "train": read_census(train),
            "valid": test.take(order[:half]),
            "test": test.take(order[half:]),
        }
    a, b = test.num_rows // 2, test.num_rows * 3 // 4
    return {
        "train": test.take(order[:a]),
        "valid": test.take(order[a:b]),
        "test": test.take(order[b:]),
    }


def shared_bottom_units(setting: Setting, input_dim: int) -> int:
    """The one expert's width that gives Shared-Bottom MMoE's parameter count (experts and
    gates; the towers are the same in both)."""
    k, h = setting.experts, setting.expert_units[-1]
    mmoe = k * (input_dim * h + h) + len(TASKS) * (input_dim * k + k)
    return max(1, round(mmoe / (input_dim + 1)))


def config(setting: Setting, model: str, seed: int, input_dim: int) -> dict[str, Any]:
    experts, gate, tasks = MODELS[model]
    units = list(setting.expert_units)
    if experts == 1:
        units = [*units[:-1], shared_bottom_units(setting, input_dim)]
    features: list[dict[str, Any]] = [
        {"name": c, "kind": "categorical", "embedding_dim": setting.embedding_dim, "default": ""}
        for c in CATEGORICAL
    ]
    features += [
        {"name": c, "kind": "numeric", "transform": "standard", "default": 0.0} for c in NUMERIC
    ]
    return {
        "name": f"census-{model.lower().replace(' ', '-')}",
        "features": features,
        "tasks": [
            {"name": t, "label": t, "tower": list(setting.tower), "metrics": ["auc"]} for t in tasks
        ],
        "model": {
            "experts": experts,
            "expert_units": units,
            "gate": gate,
            "batch_norm": setting.batch_norm,
        },
        "train": {
            "batch_size": setting.batch_size,
            "epochs": setting.epochs,
            "lr": setting.lr,
            "seed": seed,
            "threads": 1,
            "progress": False,
            "early_stopping": {"metric": f"auc_{tasks[0]}", "patience": setting.patience},
        },
    }


@dataclass
class Result:
    model: str
    auc: dict[str, list[float]] = field(default_factory=dict)  # task -> test AUC per seed
    epoch_seconds: list[float] = field(default_factory=list)  # mean training s/epoch per seed
    epochs: list[int] = field(default_factory=list)  # epochs run per seed
    # per seed: each task's mean gate weight per expert on the validation rows (MMoE, OMoE)
    gates: list[dict[str, list[float]]] = field(default_factory=list)


def onnx_auc(onnx_path: Path, run_dir: Path, test: pa.Table) -> dict[str, float]:
    """Test AUC per task of the exported file, fed the raw test values."""
    import onnxruntime as ort
    from sklearn.metrics import roc_auc_score

    from mmoe.export.parity import to_onnx_inputs
    from mmoe.model.checkpoint import load_run

    run = load_run(run_dir)
    columns = {f.name: test.column(f.column).to_pylist() for f in run.schema.features}
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    outputs = dict(zip(names, session.run(None, to_onnx_inputs(run.schema, columns)), strict=True))
    return {
        t.name: float(roc_auc_score(test.column(t.label).to_numpy(), outputs[f"probs_{t.name}"]))
        for t in run.config.tasks
    }


def run(setting: Setting, data: Path, train_file: Path | None, log: bool = True) -> list[Result]:
    from mmoe.export.exporter import export_run
    from mmoe.model.config import parse_config
    from mmoe.model.train import train

    tables = splits(data, train_file)
    if setting.rows:
        tables = {k: v.slice(0, setting.rows) for k, v in tables.items()}
    if setting.train_fraction < 1:
        tables["train"] = tables["train"].slice(
            0, round(tables["train"].num_rows * setting.train_fraction)
        )
    results = {m: Result(m, {t: [] for t in MODELS[m][2]}) for m in setting.models}
    input_dim = len(CATEGORICAL) * setting.embedding_dim + len(NUMERIC)
    with tempfile.TemporaryDirectory(prefix="mmoe-census-") as tmp:
        work = Path(tmp)
        for name, table in tables.items():
            pq.write_table(table, work / f"{name}.parquet")
        if log:
            sizes = ", ".join(f"{k} {v.num_rows}" for k, v in tables.items())
            print(f"census-income rows: {sizes}", flush=True)
        for seed in range(setting.seeds):
            for model in setting.models:  # interleaved: the machine's load hits every model alike
                out = work / f"{model}-{seed}"
                cfg = parse_config(config(setting, model, seed, input_dim))
                t0 = time.perf_counter()
                history = train(cfg, work / "train.parquet", out / "run", work / "valid.parquet")
                seconds = time.perf_counter() - t0
                export_run(out / "run", out / "model.onnx", parity_rows=256, golden=0)
                auc = onnx_auc(out / "model.onnx", out / "run", tables["test"])
                result = results[model]
                for task, value in auc.items():
                    result.auc[task].append(value)
                per_epoch = [e["train_seconds"] for e in history.epochs]
                result.epoch_seconds.append(statistics.fmean(per_epoch))
                result.epochs.append(len(history.epochs))
                if history.gates is not None and len(history.gates.get(TASKS[0], [])) > 1:
                    result.gates.append(history.gates)
                if log:
                    scores = " ".join(f"{t} {v:.4f}" for t, v in auc.items())
                    print(
                        f"{model} seed {seed}: test AUC {scores}; {len(per_epoch)} epochs, "
                        f"{statistics.fmean(per_epoch):.2f} s/epoch training, {seconds:.0f} s "
                        "in all",
                        flush=True,
                    )
    return list(results.values())


def _stat(values: list[float]) -> str:
    if not values:
        return "-"
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.4f} ± {spread:.4f} / {max(values):.4f}"


def table(results: list[Result]) -> str:
    """Markdown: AUC mean ± std / best per task, seconds per epoch, and the paper's Table 1."""
    lines = [
        "| model | income AUC mean ± std / best | marital AUC mean ± std / best | "
        "s/epoch (training) | epochs |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in results:
        seconds = statistics.fmean(r.epoch_seconds) if r.epoch_seconds else float("nan")
        epochs = "/".join(str(e) for e in r.epochs)
        lines.append(
            f"| {r.model} | {_stat(r.auc.get('income', []))} | "
            f"{_stat(r.auc.get('marital', []))} | {seconds:.2f} | {epochs} |"
        )
    for r in results:
        if r.gates:
            # how differently the tasks weigh the experts: half the L1 distance between their mean
            # gates (0: the same mixture for every task, as Shared-Bottom; 1: disjoint experts)
            apart = [
                0.5 * sum(abs(a - b) for a, b in zip(*g.values(), strict=True)) for g in r.gates
            ]
            lines.append(
                f"| {r.model}: tasks' gates apart (0-1) | {statistics.fmean(apart):.3f} | | | |"
            )
    for model, auc in PAPER.items():
        (ib, im), (mb, mm) = auc["income"], auc["marital"]
        lines.append(
            f"| paper's {model} (training file) | {im:.4f} / {ib:.4f} | {mm:.4f} / {mb:.4f} | | |"
        )
    return "\n".join(lines)


def _census_file(text: str) -> Path:
    path = Path(text)
    if not path.exists():
        raise argparse.ArgumentTypeError(
            f"{path} does not exist (docs/paper_census.md says where to download it)"
        )
    return path


def _models(text: str) -> tuple[str, ...]:
    models = tuple(m.strip() for m in text.split(","))
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown models {unknown}; choose from {list(MODELS)}")
    return models


def add_arguments(p: argparse.ArgumentParser) -> None:
    """`mmoe bench paper-census`'s arguments (bench/run.py adds it under `mmoe bench`)."""
    p.description = __doc__
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("--data", type=_census_file, required=True, help="census-income.test(.gz)")
    p.add_argument("--train", type=_census_file, help="census-income.data(.gz): the paper's split")
    p.add_argument("--seeds", type=int, help="runs per model (default 3)")
    p.add_argument("--models", type=_models, help="comma-separated, of: " + ", ".join(MODELS))
    p.add_argument("--epochs", type=int, help="most epochs per run (default 30)")
    p.add_argument(
        "--train-fraction", type=float, help="train on this share of the training rows (0-1]"
    )
    p.add_argument("--quick", action="store_true", help="3000 rows, 1 seed, 2 epochs, 2 models")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.set_defaults(func=command)


def command(args: argparse.Namespace) -> int:
    """Runs the experiment `add_arguments` parsed, prints the table (and writes --json)."""
    setting = QUICK if args.quick else Setting()
    changes: dict[str, Any] = {
        "seeds": args.seeds,
        "epochs": args.epochs,
        "train_fraction": args.train_fraction,
        "models": args.models,
    }
    setting = Setting(**(asdict(setting) | {k: v for k, v in changes.items() if v is not None}))
    results = run(setting, args.data, args.train)
    print()
    print(table(results))
    if args.json:
        payload = {"setting": asdict(setting), "results": [asdict(r) for r in results]}
        args.json.write_text(json.dumps(payload, indent=1))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mmoe bench paper-census")
    add_arguments(p)
    args = p.parse_args(argv)
    return command(args)


if __name__ == "__main__":
    raise SystemExit(main())
