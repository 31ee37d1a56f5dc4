"""`mmoe items push`: an item table file into Redis, in the layout RedisItemStore reads
(service/items.py, docs/items.md): a string per item, the JSON object a request would send as
its row, then the manifest.

With `--model` the file first goes through every check a server makes of a table file (so a
table the model cannot serve never reaches the store); without it, `--key` names the key column
and the columns need only be of a type some feature kind takes. Items are written in chunks of
`--chunk-rows`, one MSET each (atomic: a reader sees an item's old row or its new one). Items of
an earlier push that are not in this file stay, unless `--prune` deletes them. The manifest is
written last, once the items are there.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from mmoe.contract.metadata import FeatureInfo

# The types some feature kind takes (items.check_columns has the rule for each kind).
_VALUE_TYPES = {"string", "integer", "float", "null", "list<string>", "list<integer>", "list<null>"}


@dataclass(frozen=True)
class PushReport:
    items: int
    pruned: int  # items of an earlier push deleted (--prune)
    seconds: float


def push_table(
    data: str | os.PathLike[str],
    url: str,
    *,
    features: Sequence[FeatureInfo] | None = None,
    key: str | None = None,
    namespace: str | None = None,
    chunk_rows: int = 1000,
    prune: bool = False,
) -> PushReport:
    """Writes the table file `data` to the Redis at `url` (see the module). `features`: the
    model's, to check the table against as a server would; `key`: the key column (found from
    the data when `features` are given). ItemTableError for a table that cannot be pushed,
    ItemStoreUnavailable when Redis cannot be reached."""
    import json
    from datetime import UTC, datetime
    from pathlib import Path

    import redis
    from redis.exceptions import RedisError

    from mmoe.contract.values import json_value
    from mmoe.service.items import (
        DEFAULT_NAMESPACE,
        ItemStoreUnavailable,
        ItemTable,
        ItemTableError,
        id_strings,
        item_key,
        manifest_key,
        read_table,
        redacted,
        split_namespace,
        table_columns,
        type_class,
    )

    t0 = time.perf_counter()
    if features is not None:
        key = ItemTable.load(data, features, key).key
    if key is None:
        raise ItemTableError("name the key column (--key), or give the model (--model)")
    table = read_table(data)
    table = table.select(table_columns(table.schema))
    types = {name: type_class(table.schema.field(name).type) for name in table.column_names}
    if key not in types:
        raise ItemTableError(f"no key column {key!r} in {data} (its columns: {', '.join(types)})")
    for name, typ in types.items():
        if typ not in _VALUE_TYPES:
            raise ItemTableError(
                f"column {name!r} is {typ}: item features are strings, integers, numbers, or "
                "lists of ids"
            )
    ids = id_strings(table.column(key), key)
    if ids.null_count:
        raise ItemTableError(f"key column {key!r}: null (every item needs an id)")
    if len(set(ids.to_pylist())) != len(ids):
        raise ItemTableError(f"key column {key!r}: duplicate keys: one row per item")
    client_url, in_url = split_namespace(url)
    ns = namespace or in_url or DEFAULT_NAMESPACE
    client: Any = redis.Redis.from_url(client_url, decode_responses=True)
    pushed: set[str] = set()
    pruned = 0
    try:
        for offset in range(0, table.num_rows, chunk_rows):
            chunk = table.slice(offset, chunk_rows)
            keys = id_strings(chunk.column(key), key).to_pylist()
            names = chunk.column_names
            rows = zip(*(chunk.column(n).to_pylist() for n in names), strict=True)
            items = {}
            for item, row in zip(keys, rows, strict=True):
                values = zip(names, map(json_value, row), strict=True)
                present = {n: v for n, v in values if v is not None}
                items[item_key(ns, item)] = json.dumps(present, default=float)  # float: decimals
            client.mset(items)
            pushed.update(keys)
        if prune:
            pruned = _prune(client, ns, pushed)
        manifest = {
            "key": key,
            "columns": json.dumps(types),
            "rows": str(table.num_rows),
            "source": Path(data).name,
            "pushed_at": datetime.now(UTC).isoformat(),
        }
        pipe = client.pipeline(transaction=True)
        pipe.delete(manifest_key(ns))
        pipe.hset(manifest_key(ns), mapping=manifest)
        pipe.execute()
    except (RedisError, OSError) as err:
        raise ItemStoreUnavailable(f"{redacted(url)}: {err}") from None
    finally:
        client.close()
    return PushReport(table.num_rows, pruned, time.perf_counter() - t0)


def _prune(client: Any, namespace: str, keep: set[str]) -> int:
    """Deletes the items under `namespace` whose id is not in `keep`."""
    from mmoe.service.items import item_key

    prefix = item_key(namespace, "")
    pattern = "".join("\\" + c if c in "*?[]\\" else c for c in prefix) + "*"
    stale = [k for k in client.scan_iter(match=pattern, count=1000) if k[len(prefix) :] not in keep]
    for start in range(0, len(stale), 1000):
        client.delete(*stale[start : start + 1000])
    return len(stale)


# ------------------------------------------------------------------------ command


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="the item table: Parquet or Arrow IPC")
    p.add_argument("--redis", required=True, metavar="URL", help="redis://host:port/db")
    p.add_argument(
        "--model",
        help="model.onnx: check the table against it first, as the server does (recommended)",
    )
    p.add_argument("--key", help="the key column (found from the data when --model is given)")
    p.add_argument(
        "--namespace",
        help="key prefix: items under NAMESPACE:item:<id> (default: the URL's ?namespace=, or "
        "mmoe)",
    )
    p.add_argument("--chunk-rows", type=int, default=1000, help="items per MSET (default 1000)")
    p.add_argument(
        "--prune", action="store_true", help="delete the items of earlier pushes not in this file"
    )


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "push",
        help="write an item table to Redis, for servers with MMOE_ITEMS=redis://...",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mmoe.service.item_build import model_features
    from mmoe.service.items import ItemStoreUnavailable, ItemTableError, redacted

    try:
        features = model_features(args.model) if args.model else None
        report = push_table(
            args.data,
            args.redis,
            features=features,
            key=args.key,
            namespace=args.namespace,
            chunk_rows=args.chunk_rows,
            prune=args.prune,
        )
    except (ItemTableError, ItemStoreUnavailable) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    pruned = f", {report.pruned} pruned" if args.prune else ""
    print(f"{redacted(args.redis)}: {report.items} items pushed{pruned} in {report.seconds:.1f} s")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="mmoe items push",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
