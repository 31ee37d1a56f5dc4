"""`mmoe report RUN_DIR`: PNG plots of a run from its metrics.json."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np


def write_report(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Writes curves.png (training loss and validation metrics per task, per epoch) and, for
    MMoE runs, gates.png (mean gate weight per task x expert on validation data)."""
    run_dir = Path(run_dir)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    out = Path(out_dir) if out_dir else run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    written = []

    epochs = metrics["epochs"]
    xs = [e["epoch"] for e in epochs]
    losses = sorted(epochs[0]["train_loss"])
    valid_names = sorted(epochs[0].get("valid", {}))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name in losses:
        axes[0].plot(xs, [e["train_loss"][name] for e in epochs], marker="o", label=name)
    axes[0].set(title="training loss", xlabel="epoch")
    axes[0].legend()
    for name in valid_names:
        axes[1].plot(xs, [e["valid"][name] for e in epochs], marker="o", label=name)
    axes[1].set(title="validation metrics", xlabel="epoch")
    if valid_names:
        axes[1].legend()
    if metrics.get("best_epoch"):
        for ax in axes:
            ax.axvline(metrics["best_epoch"], color="grey", linestyle=":", label="best")
    fig.tight_layout()
    path = out / "curves.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)

    gates = metrics.get("gates")
    if gates:
        tasks = list(gates)
        g = np.array([gates[t] for t in tasks])
        fig, ax = plt.subplots(figsize=(1.2 + 0.8 * g.shape[1], 1.2 + 0.6 * len(tasks)))
        im = ax.imshow(g, cmap="viridis", vmin=0, vmax=max(g.max(), 1e-6), aspect="auto")
        ax.set_xticks(range(g.shape[1]), [f"e{k}" for k in range(g.shape[1])])
        ax.set_yticks(range(len(tasks)), tasks)
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
