"""Request bodies for the benchmark, cut from a data file: one ranking request is one user (the
context features, taken from one row) and N candidates (the other features, from N rows).

Every part of the benchmark (floor, service, baseline, JSON decode) uses these same bodies.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from mmoe.contract.values import json_value
from mmoe.model.data import data_format


def read_sample(path: Path, features: list[str], rows: int = 50_000) -> pa.Table:
    """The first `rows` rows of the feature columns of a CSV or Parquet file."""
    if data_format(path) == "parquet":
        pf = pq.ParquetFile(path)
        batches = pf.iter_batches(batch_size=rows, columns=features)
        return pa.Table.from_batches([next(batches)])
    import pyarrow.csv as pcsv

    table = pcsv.read_csv(path, convert_options=pcsv.ConvertOptions(include_columns=features))
    return table.slice(0, rows)


def _column(table: pa.Table, name: str, rows: np.ndarray) -> list[Any]:
    return [json_value(v) for v in table.column(name).take(pa.array(rows)).to_pylist()]


def make_bodies(
    table: pa.Table,
    features: list[str],
    context: list[str],
    n: int,
    count: int,
    seed: int = 0,
) -> list[bytes]:
    """`count` different /predict bodies with `n` candidates each (columnar form)."""
    rng = np.random.default_rng(seed + n)
    bodies = []
    ctx_names = [f for f in features if f in context]
    cand_names = [f for f in features if f not in context]
    for _ in range(count):
        user = int(rng.integers(table.num_rows))
        rows = rng.integers(0, table.num_rows, n)
        body: dict[str, Any] = {}
        if ctx_names:
            body["context"] = {f: _column(table, f, np.array([user]))[0] for f in ctx_names}
        body["candidates"] = {f: _column(table, f, rows) for f in cand_names}
        bodies.append(orjson.dumps(body))
    return bodies


def flatten(body: bytes) -> bytes:
    """The same request without `context`: each context value repeated as a candidate column,
    as a caller that knows nothing of context sends it."""
    data = orjson.loads(body)
    context = data.pop("context", {})
    n = len(next(iter(data["candidates"].values())))
    data["candidates"] |= {name: [value] * n for name, value in context.items()}
    return orjson.dumps(data)
