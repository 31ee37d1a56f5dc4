"""Task balancing on two tasks of very different scale: clicks (log loss ~0.5) and a dwell time
in seconds (values in the hundreds, MSE ~1e3-1e4), trained together with each
`train.loss_weighting` on the same rows and seeds.

With `fixed` weights the regression loss is thousands of times the click loss, so it owns the
shared experts' gradients and the click task learns little. `uncertainty` and `gradnorm` should
recover the click task's AUC without costing the dwell task more than the seed-to-seed spread.

    python -m mmoe.bench.task_balance                   # 3 seeds x 3 methods (~3 min, 1 core)
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
from mmoe.model.synthetic import synthetic_ranking
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


def run(rows: int, seeds: int, epochs: int) -> dict[str, Any]:
    results: dict[str, list[dict[str, float]]] = {m: [] for m in METHODS}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "dwell.parquet"
        table = dwell_data(rows)
        write_table(table, data)
        dwell = table.column("dwell").to_numpy()
        for seed in range(seeds):
            for method in METHODS:  # interleaved: the machine's load hits every method alike
                out = Path(tmp) / f"{method}-{seed}"
                t0 = time.perf_counter()
                history = train(parse_config(config(method, 1000 + seed, epochs)), data, out)
                metrics = json.loads((out / "metrics.json").read_text())
                best = history.best
                results[method].append(
                    {
                        "auc_ctr": best["auc_ctr"],
                        "mse_dwell": best["mse_dwell"],
                        "r2_dwell": 1 - best["mse_dwell"] / float(np.var(dwell)),
                        "weights": metrics["epochs"][-1]["task_weights"],
                        "seconds": time.perf_counter() - t0,
                    }
                )
    return {"rows": rows, "epochs": epochs, "seeds": seeds, "runs": results}


def summary(result: dict[str, Any]) -> str:
    """A markdown table: mean +- standard deviation over seeds."""

    def stat(values: list[float], digits: int) -> str:
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.fmean(values):.{digits}f} ± {spread:.{digits}f}"

    lines = [
        f"{result['rows']} rows (10% held out), {result['epochs']} epochs, "
        f"{result['seeds']} seeds; mean ± std over seeds",
        "",
        "| loss_weighting | auc_ctr | mse_dwell | r2_dwell | final weight ctr / dwell |",
        "| --- | --- | --- | --- | --- |",
    ]
    for method, runs in result["runs"].items():
        w = runs[-1]["weights"]
        lines.append(
            f"| {method} | {stat([r['auc_ctr'] for r in runs], 4)} "
            f"| {stat([r['mse_dwell'] for r in runs], 0)} "
            f"| {stat([r['r2_dwell'] for r in runs], 4)} "
            f"| {w['ctr']:.3g} / {w['dwell']:.3g} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mmoe.bench.task_balance", description=__doc__)
    p.add_argument("--rows", type=int, default=60_000)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="3000 rows, 1 seed, 1 epoch")
    p.add_argument("--json", help="write the per-run results here")
    args = p.parse_args(argv)
    if args.quick:
        args.rows, args.seeds, args.epochs = 3000, 1, 1
    result = run(args.rows, args.seeds, args.epochs)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    print(summary(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
