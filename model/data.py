"""Reading training data from CSV or Parquet in bounded chunks (files larger than memory train)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.dataset as ds

from mmoe.model.config import NumericFeature, RunConfig


def data_format(path: str | Path) -> str:
    p = Path(path)
    name = p.name.lower()
    if p.is_dir() or name.endswith((".parquet", ".pq")):
        return "parquet"
    if name.endswith((".csv", ".csv.gz", ".tsv")):
        return "csv"
    raise ValueError(f"{path}: unknown data format (expected .parquet, .pq, .csv or a directory)")


def needed_columns(config: RunConfig) -> tuple[list[str], list[str]]:
    """(columns read as strings: ids and tags; all other needed columns: numeric and labels)."""
    strings: list[str] = []
    numbers: list[str] = []
    for f in config.input_features:
        col = f.column or f.name
        (numbers if isinstance(f, NumericFeature) else strings).append(col)
    for t in config.tasks:
        numbers.append(t.label)
        if t.sample_weight:
            numbers.append(t.sample_weight)
        numbers.extend(t.only_where)
    strings = list(dict.fromkeys(strings))
    numbers = [c for c in dict.fromkeys(numbers) if c not in strings]
    return strings, numbers


class DataSource:
    """A CSV or Parquet file (or a directory of Parquet files) read in chunks of `rows`.

    CSV files are read as `config.data` says: its separator, and for files without a header
    line the names of their columns in order."""

    def __init__(self, path: str | Path, config: RunConfig) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f"data file not found: {self.path}")
        self.format = data_format(self.path)
        self.header_columns = config.data.columns
        tsv = self.path.name.lower().endswith(".tsv")
        self.separator = config.data.separator or ("\t" if tsv else ",")
        self.string_columns, self.numeric_columns = needed_columns(config)
        self.columns = self.string_columns + self.numeric_columns
        available = self.schema_names()
        missing = [c for c in self.columns if c not in available]
        if missing:
            raise ValueError(
                f"{self.path}: missing columns {missing} named by the config "
                f"(the file has {sorted(available)})"
            )

    def schema_names(self) -> list[str]:
        if self.format == "parquet":
            return list(ds.dataset(self.path, format="parquet").schema.names)
        try:
            with pcsv.open_csv(
                self.path,
                read_options=self._read_options(1 << 16),
                parse_options=pcsv.ParseOptions(delimiter=self.separator),
            ) as r:
                return list(r.schema.names)
        except pa.ArrowInvalid as err:
            raise ValueError(f"{self.path}: {err}{self._columns_hint()}") from None

    def _read_options(self, block_size: int) -> pcsv.ReadOptions:
        # Named columns: the first line is data, as in EasyRec's CSVInput.
        return pcsv.ReadOptions(block_size=block_size, column_names=self.header_columns)

    def count_rows(self) -> int:
        """Rows in the file (a Parquet file's metadata; a CSV file is read through)."""
        if self.format == "parquet":
            return int(ds.dataset(self.path, format="parquet").count_rows())
        return sum(t.num_rows for t in self.batches(1 << 20))

    def batches(self, rows: int) -> Iterator[pa.Table]:
        """Tables of up to `rows` rows with just the needed columns."""
        if self.format == "parquet":
            dataset = ds.dataset(self.path, format="parquet")
            scanner = dataset.scanner(columns=self.columns, batch_size=rows)
            yield from _rechunk((pa.Table.from_batches([b]) for b in scanner.to_batches()), rows)
            return
        types: dict[str, pa.DataType] = {c: pa.string() for c in self.string_columns}
        types.update({c: pa.float64() for c in self.numeric_columns})
        convert = pcsv.ConvertOptions(
            column_types=types, include_columns=self.columns, strings_can_be_null=True
        )
        read = self._read_options(1 << 24)
        parse = pcsv.ParseOptions(delimiter=self.separator)
        try:
            with pcsv.open_csv(
                self.path, read_options=read, parse_options=parse, convert_options=convert
            ) as reader:
                yield from _rechunk((pa.Table.from_batches([b]) for b in reader), rows)
        except pa.ArrowInvalid as err:
            raise ValueError(f"{self.path}: {err}{self._columns_hint()}") from None

    def _columns_hint(self) -> str:
        if self.header_columns is None:
            return ""
        return (
            f" (data.columns names {len(self.header_columns)} columns, separated by "
            f"{self.separator!r})"
        )


def _rechunk(tables: Iterator[pa.Table], rows: int) -> Iterator[pa.Table]:
    pending: list[pa.Table] = []
    n = 0
    for t in tables:
        pending.append(t)
        n += t.num_rows
        while n >= rows:
            whole = pa.concat_tables(pending)
            yield whole.slice(0, rows).combine_chunks()
            rest = whole.slice(rows)
            pending, n = [rest], rest.num_rows
    if n:
        yield pa.concat_tables(pending).combine_chunks()


def write_table(table: pa.Table, path: str | Path) -> None:
    """Write a table as Parquet or CSV (by suffix); list columns become `|`-joined in CSV."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if data_format(path) == "parquet":
        pq.write_table(table, path)
        return
    cols = []
    for col in table.columns:
        if pa.types.is_list(col.type):
            col = pc.binary_join(col, "|")
        cols.append(col)
    pcsv.write_csv(pa.table(cols, names=table.column_names), path)
