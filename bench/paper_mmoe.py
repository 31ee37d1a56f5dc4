"""MMoE against Shared-Bottom on the MMoE paper's synthetic data (Ma et al., KDD 2018, 3.2-3.3).

Two regression tasks whose correlation p is controlled (`mmoe data paper-synthetic`). MMoE:
8 experts of 16 units, one softmax gate per task, towers of 8 units. Shared-Bottom: the same
network with one expert (`experts: 1`) whose width gives the same parameter count. Both train
with Adam on the same rows and are scored by test MSE (mean of the two tasks), averaged over
seeds. The paper's finding: MMoE is better when the tasks are less related, and the gap
shrinks as the correlation goes to 1.

    python -m bench.paper_mmoe                # the full table (several minutes on 2 cores)
    python -m bench.paper_mmoe --quick        # a smoke run (seconds)
    python -m bench.paper_mmoe --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from model.network import MMoE, TaskHead
from model.synthetic import paper_synthetic

DIM = 100
EXPERTS = 8
EXPERT_UNITS = 16
TOWER = 8


@dataclass(frozen=True)
class Setting:
    correlations: tuple[float, ...] = (0.5, 0.7, 0.9, 1.0)
    seeds: int = 4
    train_rows: int = 8000
    test_rows: int = 4000
    epochs: int = 30
    batch_size: int = 64
    lr: float = 1e-3


QUICK = Setting(correlations=(0.5, 1.0), seeds=1, train_rows=1000, test_rows=500, epochs=2)


def build(num_experts: int, units: int) -> MMoE:
    tasks = [TaskHead("y1", "regression", (TOWER,)), TaskHead("y2", "regression", (TOWER,))]
    return MMoE(DIM, num_experts, [units], tasks)


def num_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def shared_bottom_units() -> int:
    """Width of the one Shared-Bottom expert whose network has MMoE's parameter count."""
    target = num_params(build(EXPERTS, EXPERT_UNITS))
    return min(
        range(1, 4 * EXPERTS * EXPERT_UNITS), key=lambda u: abs(num_params(build(1, u)) - target)
    )


def data(correlation: float, rows: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    table = paper_synthetic(rows, correlation, dim=DIM, seed=seed)
    x = np.stack([table.column(f"x{i}").to_numpy() for i in range(DIM)], axis=1)
    y = np.stack([table.column("y1").to_numpy(), table.column("y2").to_numpy()], axis=1)
    return torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.float32)


def test_mse(
    setting: Setting, correlation: float, seed: int, num_experts: int, units: int
) -> float:
    """Train one model on fresh data for (correlation, seed); its mean test MSE over the tasks."""
    # One draw of the data set: training and test rows share the task weights (same seed).
    x, y = data(correlation, setting.train_rows + setting.test_rows, seed)
    x_train, y_train = x[: setting.train_rows], y[: setting.train_rows]
    x_test, y_test = x[setting.train_rows :], y[setting.train_rows :]
    torch.manual_seed(seed)
    model = build(num_experts, units)
    opt = torch.optim.Adam(model.parameters(), lr=setting.lr)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(setting.epochs):
        order = torch.randperm(setting.train_rows, generator=gen)
        for start in range(0, setting.train_rows, setting.batch_size):
            idx = order[start : start + setting.batch_size]
            out = model(x_train[idx])
            pred = torch.cat([out["y1"], out["y2"]], dim=1)
            loss = ((pred - y_train[idx]) ** 2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        out = model(x_test)
        pred = torch.cat([out["y1"], out["y2"]], dim=1)
        return float(((pred - y_test) ** 2).mean())


@dataclass
class Row:
    correlation: float
    mmoe: list[float]
    shared_bottom: list[float]

    @property
    def gap(self) -> float:
        """Shared-Bottom's mean test MSE minus MMoE's (positive: MMoE is better)."""
        return statistics.mean(self.shared_bottom) - statistics.mean(self.mmoe)


def run(setting: Setting, log: bool = True) -> list[Row]:
    sb_units = shared_bottom_units()
    if log:
        print(
            f"MMoE {EXPERTS}x{EXPERT_UNITS} units ({num_params(build(EXPERTS, EXPERT_UNITS))} "
            f"parameters) vs Shared-Bottom 1x{sb_units} ({num_params(build(1, sb_units))}); "
            f"towers {TOWER}; {setting.train_rows} training rows, {setting.epochs} epochs, "
            f"{setting.seeds} seeds",
            flush=True,
        )
    rows = []
    for p in setting.correlations:
        t = time.perf_counter()
        row = Row(p, [], [])
        for seed in range(setting.seeds):
            row.mmoe.append(test_mse(setting, p, seed, EXPERTS, EXPERT_UNITS))
            row.shared_bottom.append(test_mse(setting, p, seed, 1, sb_units))
        rows.append(row)
        if log:
            print(f"  correlation {p}: {time.perf_counter() - t:.0f}s", flush=True)
    return rows


def table(rows: list[Row]) -> str:
    def cell(values: list[float]) -> str:
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values):.4f} ± {sd:.4f}"

    lines = [
        "| correlation | MMoE test MSE | Shared-Bottom test MSE | gap (SB - MMoE) "
        "| MMoE better in |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        wins = sum(m <= s for m, s in zip(r.mmoe, r.shared_bottom, strict=True))
        lines.append(
            f"| {r.correlation:g} | {cell(r.mmoe)} | {cell(r.shared_bottom)} | {r.gap:+.4f} "
            f"| {wins}/{len(r.mmoe)} seeds |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.paper_mmoe", description=__doc__)
    p.add_argument("--quick", action="store_true", help="tiny data, one seed: a smoke run")
    p.add_argument("--correlations", type=float, nargs="+", help="task correlations to test")
    p.add_argument("--seeds", type=int, help="runs per model and correlation")
    p.add_argument("--epochs", type=int)
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--json", help="also write the results to this file")
    args = p.parse_args(argv)
    setting = QUICK if args.quick else Setting()
    overrides = {
        "correlations": tuple(args.correlations) if args.correlations else None,
        "seeds": args.seeds,
        "epochs": args.epochs,
    }
    setting = Setting(**(asdict(setting) | {k: v for k, v in overrides.items() if v is not None}))
    torch.set_num_threads(args.threads)
    rows = run(setting)
    print()
    print(table(rows))
    if args.json:
        payload = {
            "setting": asdict(setting),
            "rows": [asdict(r) | {"gap": r.gap} for r in rows],
        }
        with open(args.json, "w") as fh:
            json.dump(payload, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
