"""Training speed of epochs 2+ with the encoded rows kept in memory (`train.cache_mb`, the
default) against streaming the file every epoch (`cache_mb: 0`), on the same config and data,
interleaved (the machine's load hits both alike). Rows/s of the training steps alone
(metrics.json `epochs[].rows_per_second`), epoch 1 apart.

    python -m mmoe.bench.epoch_speed --config configs/demo.yaml --data data/demo.parquet
    python -m mmoe.bench.epoch_speed --config configs/easyrec_taobao.yaml \\
        --data data/taobao.parquet --epochs 2 --threads 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path
from typing import Any

import yaml

from mmoe.model.config import parse_config
from mmoe.model.train import train


def measure(config: Path, data: Path, epochs: int, rounds: int, threads: int) -> dict[str, Any]:
    base = yaml.safe_load(config.read_text())
    base["train"] |= {"epochs": epochs, "progress": False, "threads": threads}
    runs: dict[str, list[dict[str, float]]] = {"stream": [], "memory": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            order = ("stream", "memory") if r % 2 == 0 else ("memory", "stream")
            for mode in order:
                cfg = dict(
                    base, train=base["train"] | {"cache_mb": 0 if mode == "stream" else 4096}
                )
                out = Path(tmp) / f"{mode}{r}"
                train(parse_config(cfg), data, out)
                epochs_ = json.loads((out / "metrics.json").read_text())["epochs"]
                later = [e["rows_per_second"] for e in epochs_[1:]]
                runs[mode].append(
                    {"epoch_1": epochs_[0]["rows_per_second"], "epochs_2+": statistics.fmean(later)}
                )
    return {"config": str(config), "epochs": epochs, "rounds": rounds, "runs": runs}


def summary(result: dict[str, Any]) -> str:
    def med(mode: str, key: str) -> float:
        return statistics.median(r[key] for r in result["runs"][mode])

    lines = [
        f"{result['config']}: {result['epochs']} epochs, {result['rounds']} interleaved rounds "
        "(median training rows/s)",
        "",
        "| epochs | streamed every epoch | from memory | ratio |",
        "| --- | --- | --- | --- |",
    ]
    for key in ("epoch_1", "epochs_2+"):
        s, m = med("stream", key), med("memory", key)
        lines.append(f"| {key.replace('_', ' ')} | {s:,.0f} | {m:,.0f} | {m / s:.2f}x |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mmoe.bench.epoch_speed", description=__doc__)
    p.add_argument("--config", type=Path, default=Path("configs/demo.yaml"))
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", help="write the per-run results here")
    args = p.parse_args(argv)
    result = measure(args.config, args.data, args.epochs, args.rounds, args.threads)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    print(summary(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
