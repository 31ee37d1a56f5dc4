"""The arguments of `mmoe data`, `mmoe train`, `mmoe convert-config` and `mmoe report`
(mmoe/cli.py's command table); torch is imported only when they run."""

from __future__ import annotations

import argparse
import sys


def data(parser: argparse.ArgumentParser) -> None:
    kinds = parser.add_subparsers(dest="dataset", required=True, metavar="DATASET")
    rank = kinds.add_parser(
        "synthetic-ranking",
        help="a click/conversion log with ids, numbers and tags (the demo config's columns)",
        description="A click/conversion log drawn from a fixed world (users, items, their "
        "categories, prices and brands, and what drives clicks and purchases). --seed draws the "
        "rows from that world, --world-seed the world itself: files made with different --seed "
        "and the same --world-seed are samples of one world, e.g. a training and a validation "
        "file.",
    )
    rank.add_argument("--rows", type=int, default=200_000, help="rows to write (default 200000)")
    rank.add_argument(
        "--seed", type=int, default=7, help="seed of the rows drawn from the world (default 7)"
    )
    rank.add_argument(
        "--world-seed",
        type=int,
        default=0,
        help="seed of the world: users, items, categories and their effects (default 0)",
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
    paper.add_argument(
        "--sine-params",
        choices=["normal", "index"],
        default="normal",
        help="alpha, beta of the sines (the paper gives none): N(0, 1) draws from --sine-seed "
        "(default), or alpha_j = j+1, beta_j = j^2 as in Google Research's generator",
    )
    paper.add_argument("--out", required=True, help="FILE.parquet or FILE.csv to write")
    paper.set_defaults(func=_data)


def train(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        required=True,
        help="the training config: YAML (e.g. configs/demo.yaml), or an EasyRec pipeline.config",
    )
    parser.add_argument(
        "--data", required=True, help="training data (.parquet, .csv, or a directory)"
    )
    parser.add_argument("--valid", help="validation data (default: hold out train.valid_fraction)")
    parser.add_argument(
        "--out", required=True, help="RUN_DIR to write: weights, fitted schema, config, metrics"
    )
    parser.add_argument("--nproc", type=int, default=1, help="processes (DDP via torchrun)")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="clear RUN_DIR first if it exists and is not empty (else that is refused)",
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="config overrides after the options, e.g. train.epochs=1 model.experts=8",
    )
    parser.set_defaults(func=_train)


def convert_config(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="EasyRec pipeline.config (protobuf text format)")
    parser.add_argument("--out", required=True, help="config.yaml to write")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="as for mmoe train, right after CONFIG (or all options first)",
    )
    parser.set_defaults(func=_convert_config)


def report(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="a RUN_DIR written by mmoe train")
    parser.add_argument("--out", help="directory for PNGs (default RUN_DIR/report)")
    parser.set_defaults(func=_report)


def _data(args: argparse.Namespace) -> int:
    from mmoe.model.data import write_table
    from mmoe.model.synthetic import paper_synthetic, synthetic_ranking

    if args.dataset == "synthetic-ranking":
        table = synthetic_ranking(args.rows, args.seed, args.world_seed)
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
            sine_params=args.sine_params,
        )
    write_table(table, args.out)
    print(f"wrote {table.num_rows} rows to {args.out}")
    return 0


def _train(args: argparse.Namespace) -> int:
    from mmoe.model.train import recipe_main

    return recipe_main(args)


def _convert_config(args: argparse.Namespace) -> int:
    from pathlib import Path

    import yaml

    from mmoe.model.config import ConfigError
    from mmoe.model.easyrec import is_easyrec_config, load_pipeline_config

    if not is_easyrec_config(args.config):
        print(f"error: {args.config} is not an EasyRec pipeline.config", file=sys.stderr)
        return 2
    try:
        _, mapping, notes = load_pipeline_config(args.config, args.overrides)
    except (ConfigError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    header = [f"# Translated from {args.config} (EasyRec pipeline config); docs/easyrec.md"]
    header += [f"# note: {note}" for note in notes]
    out.write_text("\n".join(header) + "\n" + yaml.safe_dump(mapping, sort_keys=False, width=100))
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    print(f"wrote {out}")
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
