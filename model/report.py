"""`mmoe report RUN_DIR`: PNG plots of a run from its metrics.json."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np


def write_report(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Writes curves.png (per task and in total: training loss and validation metrics per
    epoch, the best epoch marked), task_weights.png (each task's loss weight per epoch: learned
    with `train.loss_weighting` uncertainty or gradnorm) and, when the run has validation data,
    gates.png (mean gate weight per task x expert on it, best epoch) and experts.png (per
    epoch: each task's gate weight per expert, gate entropy, experts' output similarity)."""
    run_dir = Path(run_dir)
    path = run_dir / "metrics.json"
    if not path.exists():
        raise FileNotFoundError(f"{run_dir} has no metrics.json: is it a training run?")
    metrics = json.loads(path.read_text())
    out = Path(out_dir) if out_dir else run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    written = []

    epochs = metrics["epochs"]
    if not epochs:
        raise ValueError(f"{run_dir}/metrics.json has no epochs")
    xs = [e["epoch"] for e in epochs]
    tasks = [k for k in epochs[0]["train_loss"] if k != "total"]
    valid = [e.get("valid", {}) for e in epochs]
    # One column per task (and one for the total): training loss above, validation below.
    columns = ["total", *tasks]
    fig, axes = plt.subplots(2, len(columns), figsize=(3.6 * len(columns), 6.5), squeeze=False)
    for c, task in enumerate(columns):
        top, bottom = axes[0][c], axes[1][c]
        top.plot(xs, [e["train_loss"][task] for e in epochs], marker="o", label="train")
        top.set(title=f"{task}: loss", xlabel="epoch")
        names = ["loss"] if task == "total" else [n for n in valid[0] if n.endswith(f"_{task}")]
        for name in names:
            bottom.plot(xs, [v.get(name, np.nan) for v in valid], marker="o", label=name)
        if task == "total" and names and "loss" in valid[0]:
            top.plot(xs, [v["loss"] for v in valid], marker="o", label="validation")
        bottom.set(title=f"{task}: validation", xlabel="epoch")
        for ax in (top, bottom):
            if metrics.get("best_epoch"):
                ax.axvline(metrics["best_epoch"], color="grey", linestyle=":", label="best")
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize="small")
    fig.tight_layout()
    path = out / "curves.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    written.append(path)

    weights = [e.get("task_weights") for e in epochs]
    if all(weights):
        fig, ax = plt.subplots(figsize=(5.5, 3.6))
        for task in weights[0]:
            ax.plot(xs, [w[task] for w in weights], marker="o", label=task)
        kind = metrics.get("loss_weighting", "fixed")
        ax.set(title=f"task loss weights ({kind}, end of epoch)", xlabel="epoch", yscale="log")
        ax.legend(fontsize="small")
        fig.tight_layout()
        path = out / "task_weights.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)

    health = [e.get("experts") for e in epochs]
    if all(health):
        path = out / "experts.png"
        _expert_health(xs, health, metrics.get("gate_experts"), path)
        written.append(path)

    gates = metrics.get("gates")
    if gates:
        gate_tasks = list(gates)
        g = np.array([gates[t] for t in gate_tasks])
        fig, ax = plt.subplots(figsize=(2.0 + 0.8 * g.shape[1], 1.4 + 0.6 * len(gate_tasks)))
        im = ax.imshow(g, cmap="viridis", vmin=0, vmax=max(g.max(), 1e-6), aspect="auto")
        experts = metrics.get("gate_experts") or [f"e{k}" for k in range(g.shape[1])]
        ax.set_xticks(range(g.shape[1]), experts, rotation=45 if len(experts) > 8 else 0)
        ax.set_yticks(range(len(gate_tasks)), gate_tasks)
        for (i, k), v in np.ndenumerate(g):
            ax.text(
                k, i, f"{v:.2f}", ha="center", va="center", color="w" if v < g.max() * 0.6 else "k"
            )
        ax.set_title("mean gate weight (validation)")
        fig.colorbar(im, ax=ax)
        fig.tight_layout()
        path = out / "gates.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def _expert_health(
    xs: list[int], health: list[dict[str, Any]], experts: list[str] | None, path: Path
) -> None:
    tasks = list(health[0]["gates"])
    k = len(health[0]["gates"][tasks[0]])
    names = experts or [f"e{i}" for i in range(k)]
    fig, axes = plt.subplots(1, len(tasks) + 1, figsize=(3.6 * (len(tasks) + 1), 3.4))
    for ax, task in zip(axes, tasks, strict=False):
        for i, name in enumerate(names):
            ax.plot(xs, [h["gates"][task][i] for h in health], marker="o", label=name)
        ax.set(title=f"{task}: mean gate weight", xlabel="epoch", ylim=(0, 1))
        ax.legend(fontsize="x-small", ncol=2)
    last = axes[-1]
    for task in tasks:
        last.plot(
            xs, [h["gate_entropy"][task] for h in health], marker="o", label=f"{task} entropy"
        )
    last.plot(xs, [h["expert_similarity"] for h in health], marker="s", label="expert similarity")
    last.set(title="gate entropy / expert similarity", xlabel="epoch", ylim=(-0.05, 1.05))
    last.legend(fontsize="x-small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
