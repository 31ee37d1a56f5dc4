"""Task balancing on two tasks of very different scale, trained together with each
`train.loss_weighting` on the same rows and seeds. Two cases (`--case`):

- `dwell`: clicks (log loss ~0.5) and a dwell time in seconds (values in the hundreds, MSE
  ~1e3-1e4) on the demo's features;
- `paper`: the MMoE paper's two regressions (correlation 0.5) with the second label x1000, so
  that the MSEs are ~1e6 apart.

With `fixed` weights the large loss owns the shared experts' gradients and the small task
learns little. `uncertainty` and `gradnorm` should recover the small task without costing the
large one more than the seed-to-seed spread. Each task's validation MSE is also given over its
label's variance (1 = no better than predicting the mean).

    python -m mmoe.bench.task_balance                   # dwell: 3 seeds x 3 methods (~3 min)
    python -m mmoe.bench.task_balance --case paper      # the paper's data, second label x1000
    python -m mmoe.bench.task_balance --quick           # a smoke run (seconds)
    python -m mmoe.bench.task_balance --json out.json
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import yaml

from mmoe.model.config import parse_config
from mmoe.model.data import write_table
from mmoe.model.synthetic import paper_synthetic, synthetic_ranking
from mmoe.model.train import train

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
METHODS = ("fixed", "uncertainty", "gradnorm")


def dwell_data(rows: int, seed: int = 7) -> pa.Table:
    """The demo's impression log plus `dwell`: seconds on the item page, in the hundreds, from
    the price, the user's age level and the hour, with noise."""
    table = synthetic_ranking(rows, seed)
    rng = np.random.default_rng(seed + 1)
    price = np.nan_to_num(table.column("price").to_numpy(zero_copy_only=False), nan=20.0)
    age = table.column("age_level").to_numpy().astype(np.float64)
    hour = table.column("hour").to_numpy()
    dwell = (
        120
        + 40 * np.log1p(price)
        + 25 * age
        + 60 * np.sin(hour / 24 * 2 * np.pi)
        + 40 * rng.normal(size=rows)
    )
    return table.append_column("dwell", pa.array(dwell))


def config(method: str, seed: int, epochs: int) -> dict[str, Any]:
    cfg = copy.deepcopy(yaml.safe_load(CONFIG.read_text()))
    cfg["tasks"] = [
        cfg["tasks"][0],
        {
            "name": "dwell",
            "label": "dwell",
            "kind": "regression",
            "tower": [32],
            "metrics": ["mse"],
        },
    ]
    cfg["train"] |= {
        "epochs": epochs,
        "seed": seed,
        "progress": False,
        "threads": 1,
        "loss_weighting": method,
    }
    return cfg


# The paper case: 100 inputs, MMoE of 8 experts x 16 units, towers of 8 (bench/paper_mmoe.py).
PAPER_SCALE = 1000.0


def paper_data(rows: int, seed: int = 1) -> pa.Table:
    """The MMoE paper's two regressions (correlation 0.5), the second label times 1000."""
    table = paper_synthetic(rows, 0.5, seed=seed)
    y2 = table.column("y2").to_numpy() * PAPER_SCALE
    return table.set_column(table.schema.get_field_index("y2"), "y2", pa.array(y2))


def paper_config(method: str, seed: int, epochs: int) -> dict[str, Any]:
    return {
        "features": [{"name": f"x{i}", "kind": "numeric"} for i in range(100)],
        "tasks": [
            {"name": n, "label": n, "kind": "regression", "tower": [8], "metrics": ["mse"]}
            for n in ("y1", "y2")
        ],
        "model": {"experts": 8, "expert_units": [16]},
        "train": {
            "batch_size": 128,
            "epochs": epochs,
            "lr": 0.002,
            "seed": seed,
            "progress": False,
            "threads": 1,
            "loss_weighting": method,
        },
    }


def run(rows: int, seeds: int, epochs: int, case: str = "dwell") -> dict[str, Any]:
    results: dict[str, list[dict[str, Any]]] = {m: [] for m in METHODS}
    table = dwell_data(rows) if case == "dwell" else paper_data(rows)
    make_config = config if case == "dwell" else paper_config
    regressions = ["dwell"] if case == "dwell" else ["y1", "y2"]
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "rows.parquet"
        write_table(table, data)
        variance = {n: float(np.var(table.column(n).to_numpy())) for n in regressions}
        for seed in range(seeds):
            for method in METHODS:  # interleaved: the machine's load hits every method alike
                out = Path(tmp) / f"{method}-{seed}"
                t0 = time.perf_counter()
                history = train(parse_config(make_config(method, 1000 + seed, epochs)), data, out)
                metrics = json.loads((out / "metrics.json").read_text())
                last = history.epochs[-1]["valid"]  # every method after the same epochs
                record: dict[str, Any] = {f"mse_{n}": last[f"mse_{n}"] for n in regressions}
                record |= {f"ratio_{n}": last[f"mse_{n}"] / variance[n] for n in regressions}
                if case == "dwell":
                    record["auc_ctr"] = last["auc_ctr"]
                record["weights"] = metrics["epochs"][-1]["task_weights"]
                record["seconds"] = time.perf_counter() - t0
                results[method].append(record)
    return {"case": case, "rows": rows, "epochs": epochs, "seeds": seeds, "runs": results}


def summary(result: dict[str, Any]) -> str:
    """A markdown table: mean ± standard deviation over seeds, after the last epoch."""

    def stat(values: list[float], digits: int) -> str:
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.fmean(values):.{digits}f} ± {spread:.{digits}f}"

    columns = [k for k in result["runs"]["fixed"][0] if k not in ("weights", "seconds")]
    lines = [
        f"{result['case']}: {result['rows']} rows (10% held out), {result['epochs']} epochs, "
        f"{result['seeds']} seeds; mean ± std over seeds; ratio = validation MSE / label variance",
        "",
        "| loss_weighting | " + " | ".join(columns) + " | final weights |",
        "|---" * (len(columns) + 2) + "|",
    ]
    for method, runs in result["runs"].items():
        cells = []
        for c in columns:
            values = [r[c] for r in runs]
            digits = 4 if c.startswith(("auc", "ratio")) or max(values) < 10 else 0
            cells.append(stat(values, digits))
        w = runs[-1]["weights"]
        weights = " / ".join(f"{v:.3g}" for v in w.values())
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {weights} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mmoe.bench.task_balance", description=__doc__)
    p.add_argument("--case", choices=["dwell", "paper"], default="dwell")
    p.add_argument("--rows", type=int, default=60_000)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="3000 rows, 1 seed, 1 epoch")
    p.add_argument("--json", help="write the per-run results here")
    args = p.parse_args(argv)
    if args.quick:
        args.rows, args.seeds, args.epochs = 3000, 1, 1
    result = run(args.rows, args.seeds, args.epochs, args.case)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    print(summary(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
