"""`mmoe items build`: an item table (docs/items.md) from training or log data: each item's most
recent row, so a new deployment serves the item features the model was trained on.

The most recent row of an item is its last in file order, or, with `--time COLUMN`, the one of
the latest time (file order breaks ties; a null time is older than any). Its values are taken
as they are: a null there stays null, which the server reads as the feature's default, as
training did. The columns are the model's item features: its candidate (non-context)
features, or those named by `--features`; the output is checked as the server checks a table.
Needs only pyarrow (and onnxruntime for `--model`): it runs in the serving install.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from mmoe.contract.metadata import FeatureInfo

if TYPE_CHECKING:
    import pyarrow as pa
    import pyarrow.dataset as ds

_ROW = "__mmoe_row"
_POS = "__mmoe_pos"


@dataclass(frozen=True)
class BuildReport:
    rows: int  # data rows read
    items: int  # rows written: one per key
    null_keys: int  # data rows skipped for a null key
    seconds: float


def model_features(path: str | os.PathLike[str]) -> list[FeatureInfo]:
    """The features of a model.onnx, from its metadata."""
    import onnxruntime as ort

    from mmoe.contract.metadata import MetadataError, read_metadata
    from mmoe.service.items import ItemTableError

    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return read_metadata(session.get_modelmeta().custom_metadata_map).features
    except MetadataError as err:
        raise ItemTableError(f"{path}: {err}") from None
    except Exception as err:  # onnxruntime's own errors: a missing or broken file
        raise ItemTableError(f"{path}: cannot read the model: {err}") from None


def run_features(run_dir: str | os.PathLike[str]) -> tuple[list[FeatureInfo], dict[str, str]]:
    """The features of a training run (its fitted schema.json, as export describes them) and
    the data column of each."""
    from mmoe.service.items import ItemTableError

    path = Path(run_dir) / "schema.json"
    try:
        fitted = json.loads(path.read_text())["features"]
        features = [
            FeatureInfo(
                name=f["name"],
                kind=f["kind"],
                dtype="float32" if f["kind"] == "numeric" else "string",
                default=f.get("default"),
                separator=f.get("separator"),
                max_len=f.get("max_len"),
                context=f.get("context", False),
            )
            for f in fitted
        ]
        columns = {f["name"]: f.get("column") or f["name"] for f in fitted}
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ItemTableError(f"{path}: not a training run's fitted schema ({err})") from None
    return features, columns


def item_features(
    features: Sequence[FeatureInfo], key: str, only: Sequence[str] | None = None
) -> list[FeatureInfo]:
    """The features an item table of `key` holds: the model's candidate features other than
    the key, or those of `only`."""
    from mmoe.service.items import ItemTableError

    by_name = {f.name: f for f in features}
    candidates = [f.name for f in features if not f.context]
    k = by_name.get(key)
    if k is None or k.context or k.kind != "categorical":
        raise ItemTableError(
            f"key {key!r}: an item key is one of the model's categorical candidate features "
            f"({', '.join(n for n in candidates if by_name[n].kind == 'categorical')})"
        )
    names = list(only) if only is not None else [n for n in candidates if n != key]
    for name in names:
        if name not in candidates or name == key:
            raise ItemTableError(
                f"feature {name!r} is not an item feature of the model (its candidate "
                f"features: {', '.join(n for n in candidates if n != key)})"
            )
    return [by_name[n] for n in names]


def build_table(
    data: str | os.PathLike[str],
    out: str | os.PathLike[str],
    features: Sequence[FeatureInfo],
    key: str,
    *,
    time_column: str | None = None,
    columns: Mapping[str, str] | None = None,
    only: Sequence[str] | None = None,
    batch_rows: int = 1 << 20,
) -> BuildReport:
    """Writes to `out` (Parquet, or Arrow IPC for .arrow/.feather) the most recent row of
    each `key` in `data` (Parquet file or folder, CSV, Arrow IPC), with the item features
    (item_features). `columns` maps a feature to its data column where the names differ.
    The data is read in batches of `batch_rows`; what is held is one row per item."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from mmoe.service.items import ItemTableError, check_columns, type_class

    t0 = time.perf_counter()
    held = item_features(features, key, only)
    column_of = {f.name: (columns or {}).get(f.name, f.name) for f in features}
    wanted = [column_of[key], *(column_of[f.name] for f in held)]
    dataset = _dataset(Path(data))
    read = list(dict.fromkeys([*wanted, *([time_column] if time_column else [])]))
    missing = [c for c in read if c not in dataset.schema.names]
    if missing:
        raise ItemTableError(f"{data}: no column {', '.join(map(repr, missing))} in the data")
    latest: pa.Table | None = None
    rows = null_keys = 0
    for batch in dataset.to_batches(columns=read, batch_size=batch_rows):
        table = pa.Table.from_batches([batch]).append_column(
            _ROW, pa.array(range(rows, rows + batch.num_rows), pa.int64())
        )
        rows += batch.num_rows
        ids = table.column(column_of[key])
        if ids.null_count:
            null_keys += ids.null_count
            table = table.filter(pc.is_valid(ids))
        latest = table if latest is None else pa.concat_tables([latest, table])
        latest = _latest(latest, column_of[key], time_column)
    if latest is None:
        latest = dataset.schema.empty_table().select(read)
    result = pa.table(
        [latest.column(column_of[name]) for name in [key, *(f.name for f in held)]],
        names=[key, *(f.name for f in held)],
    ).sort_by(key)
    types = {name: type_class(result.schema.field(name).type) for name in result.column_names}
    check_columns(types, features, key)
    _write_atomically(result, Path(out))
    return BuildReport(rows, result.num_rows, null_keys, time.perf_counter() - t0)


def _latest(table: pa.Table, key: str, time_column: str | None) -> pa.Table:
    """The most recent row of each key."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    if time_column is None:
        table = table.sort_by(_ROW)
    else:  # rows without a time first: older than any
        timed = pc.is_valid(table.column(time_column))
        table = pa.concat_tables(
            [
                table.filter(pc.invert(timed)).sort_by(_ROW),
                table.filter(timed).sort_by([(time_column, "ascending"), (_ROW, "ascending")]),
            ]
        )
    table = table.append_column(_POS, pa.array(np.arange(table.num_rows)))
    last = table.group_by(key, use_threads=False).aggregate([(_POS, "max")])
    return table.take(last.column(f"{_POS}_max")).drop_columns([_POS])


def _dataset(path: Path) -> ds.Dataset:
    import pyarrow.csv as pcsv
    import pyarrow.dataset as ds

    from mmoe.service.items import ItemTableError

    if not path.exists():
        raise ItemTableError(f"{path}: no such file or folder")
    name = path.name.lower()
    if name.endswith((".csv", ".csv.gz", ".tsv", ".tsv.gz")):
        tab = ".tsv" in name
        fmt: ds.FileFormat | str = ds.CsvFileFormat(
            parse_options=pcsv.ParseOptions(delimiter="\t" if tab else ",")
        )
    elif name.endswith((".arrow", ".feather", ".ipc")):
        fmt = "ipc"
    else:
        fmt = "parquet"
    try:
        return ds.dataset(path, format=fmt)
    except (OSError, ValueError) as err:
        raise ItemTableError(f"{path}: cannot read it as {fmt} data ({err})") from None


def _write_atomically(table: pa.Table, out: Path) -> None:
    """Parquet, or Arrow IPC by suffix; written beside `out` and renamed over it, so a server
    polling the file never reads half of one."""
    import pyarrow.feather as feather
    import pyarrow.parquet as pq

    from mmoe.service.items import ItemTableError

    ipc = out.suffix.lower() in (".arrow", ".feather", ".ipc")
    if not ipc and out.suffix.lower() not in (".parquet", ".pq"):
        raise ItemTableError(f"{out}: name the output .parquet, or .arrow/.feather (Arrow IPC)")
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.partial")
    if ipc:  # uncompressed: the server memory-maps it
        feather.write_feather(table, str(partial), compression="uncompressed")
    else:
        pq.write_table(table, partial)
    os.replace(partial, out)


# ------------------------------------------------------------------------ command


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="training or log data: Parquet, CSV or Arrow")
    p.add_argument("--key", required=True, help="the item id column, e.g. item_id")
    p.add_argument("--out", required=True, help="the table to write: .parquet or .arrow")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="model.onnx: its candidate features are the columns")
    source.add_argument(
        "--config",
        metavar="RUN_DIR",
        help="a training run (its schema.json): its candidate features are the columns",
    )
    p.add_argument(
        "--time",
        metavar="COLUMN",
        help="most recent by this column (file order breaks ties); default: the last row",
    )
    p.add_argument(
        "--features",
        help="comma-separated item features to keep (default: every candidate feature)",
    )


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "build",
        help="an item table from training or log data: each item's most recent row",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mmoe.service.items import ItemTableError

    try:
        columns: dict[str, str] | None = None
        if args.model:
            features = model_features(args.model)
        else:
            features, columns = run_features(args.config)
        only = [n.strip() for n in args.features.split(",") if n.strip()] if args.features else None
        report = build_table(
            args.data,
            args.out,
            features,
            args.key,
            time_column=args.time,
            columns=columns,
            only=only,
        )
    except ItemTableError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    skipped = f"; {report.null_keys} rows without a key skipped" if report.null_keys else ""
    print(
        f"{args.out}: {report.items} items from {report.rows} rows in "
        f"{report.seconds:.1f} s{skipped}"
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="mmoe items build",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
