"""`mmoe data`, `mmoe train`, `mmoe report` (torch is imported only when they run)."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from typing import Any


def register(sub: Any) -> None:
    data = sub.add_parser("data", help="write a synthetic data set (or bring your own CSV/Parquet)")
    kinds = data.add_subparsers(dest="dataset", required=True, metavar="DATASET")
    rank = kinds.add_parser(
        "synthetic-ranking",
        help="a click/conversion log with ids, numbers and tags (the demo config's columns)",
    )
    rank.add_argument("--rows", type=int, default=200_000, help="rows to write (default 200000)")
    rank.add_argument(
        "--seed", type=int, default=7, help="random seed: the same seed writes the same rows"
    )
    rank.add_argument("--out", required=True, help="FILE.parquet or FILE.csv to write")
    rank.set_defaults(func=_data)
    paper = kinds.add_parser(
        "paper-synthetic",
        help="the MMoE paper's two regression tasks with controlled correlation (KDD 2018, 3.2)",
    )
    paper.add_argument(
        "--correlation", type=float, required=True, help="task correlation p in [-1, 1]"
    )
    paper.add_argument("--rows", type=int, default=10_000, help="rows to write (default 10000)")
    paper.add_argument("--dim", type=int, default=100, help="input dimension d (default 100)")
    paper.add_argument("--sines", type=int, default=10, help="number of sine terms m (default 10)")
    paper.add_argument("--scale", type=float, default=1.0, help="weight scale c (default 1)")
    paper.add_argument("--noise", type=float, default=0.01, help="label noise std (default 0.01)")
    paper.add_argument(
        "--seed", type=int, default=0, help="seed of u1, u2, x and the noise (default 0)"
    )
    paper.add_argument(
        "--sine-seed",
        type=int,
        default=0,
        help="seed of the sine parameters alpha, beta ~ N(0, 1) (default 0)",
    )
    paper.add_argument("--out", required=True, help="FILE.parquet or FILE.csv to write")
    paper.set_defaults(func=_data)

    train = sub.add_parser("train", help="fit the feature schema and train the model")
    train.add_argument(
        "--config", required=True, help="the training config, YAML (e.g. configs/demo.yaml)"
    )
    train.add_argument(
        "--data", required=True, help="training data (.parquet, .csv, or a directory)"
    )
    train.add_argument("--valid", help="validation data (default: hold out train.valid_fraction)")
    train.add_argument(
        "--out", required=True, help="RUN_DIR to write: weights, fitted schema, config, metrics"
    )
    train.add_argument("--nproc", type=int, default=1, help="processes (DDP via torchrun)")
    train.set_defaults(func=_train)

    report = sub.add_parser("report", help="plot a run's curves and gate utilisation")
    report.add_argument("run_dir", help="a RUN_DIR written by mmoe train")
    report.add_argument("--out", help="directory for PNGs (default RUN_DIR/report)")
    report.set_defaults(func=_report)


def _data(args: argparse.Namespace) -> int:
    from mmoe.model.data import write_table
    from mmoe.model.synthetic import paper_synthetic, synthetic_ranking

    if args.dataset == "synthetic-ranking":
        table = synthetic_ranking(args.rows, args.seed)
    else:
        table = paper_synthetic(
            args.rows,
            args.correlation,
            dim=args.dim,
            num_sines=args.sines,
            scale=args.scale,
            noise_std=args.noise,
            seed=args.seed,
            sine_seed=args.sine_seed,
        )
    write_table(table, args.out)
    print(f"wrote {table.num_rows} rows to {args.out}")
    return 0


def _train(args: argparse.Namespace) -> int:
    if args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={args.nproc}",
            "-m",
            "mmoe.model.train",
            "--config",
            args.config,
            "--data",
            args.data,
            "--out",
            args.out,
        ]
        if args.valid:
            cmd += ["--valid", args.valid]
        return subprocess.call(cmd)
    from mmoe.model.config import ConfigError, load_config
    from mmoe.model.train import train

    try:
        config = load_config(args.config)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        train(config, args.data, args.out, args.valid)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def _report(args: argparse.Namespace) -> int:
    from mmoe.model.report import write_report

    try:
        paths = write_report(args.run_dir, args.out)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    return 0
