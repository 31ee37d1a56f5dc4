"""Item features held by the server: a request may send the candidates' ids alone and the service
fills in their other features (docs/items.md).

Two sources, one interface (ItemSource): `alookup(ids) -> ItemRows`, each held feature's graph
input for those ids, ready to feed.

- ItemTable: a Parquet or Arrow IPC file, loaded once. Its columns are checked against the
  model's features and converted at load, by the contract's rules (contract/values.py), into
  small integer codes per row, so a lookup costs one hash search per id and one `take` per
  column.
- RedisItemStore: one Redis string per item (the layout below, written by `mmoe items push`),
  read with one MGET per request for the ids not in a bounded in-process LRU cache. A Redis
  outage degrades to the cache, then to the features' defaults; lookups never raise.

An id missing from the source is no error: its features take the value a request leaving them
out would (the default; for a feature without one, what the graph reads as unknown: "" for
ids, no tags, NaN for numbers). Every id gets an outcome (OUTCOMES), for counting.

Redis layout (namespace `mmoe` by default, `NS` below):
- `NS:item:<id>`: a string per item, the JSON object a request would send as the item's row
  (`{"item_id": "i3", "category": "c3", "price": 12.5, "tags": ["b1", "b2"]}`, the
  `instances` form); a feature left out or null takes its default. One MGET reads the items of
  a request, one MSET writes a chunk of them, and an item is replaced whole.
- `NS:items`: the manifest, a hash: `key` (the key feature), `columns` (JSON object: column ->
  type: string, integer, float, list<string>, ...), `rows`, `source` (the file pushed),
  `pushed_at` (ISO 8601 UTC). The server checks it against the model as it checks a file.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from itertools import chain
from pathlib import Path
from typing import Any, Protocol, runtime_checkable
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mmoe.contract.metadata import FeatureInfo
from mmoe.contract.values import DEFAULT_SEPARATOR, column_input

log = logging.getLogger("mmoe.service")

# What a lookup found for each id: the item's features (hit); no such item, so defaults
# (miss); Redis failed and a cache entry older than its TTL answered (stale); Redis failed and
# nothing was cached, so defaults (error).
OUTCOMES = ("hit", "miss", "stale", "error")
HIT, MISS, STALE, ERROR = range(4)

DEFAULT_NAMESPACE = "mmoe"


class ItemTableError(ValueError):
    """An item table (a file, or the manifest of a Redis store) this model cannot serve from;
    the message names the column and the reason."""


class ItemStoreUnavailable(ConnectionError):
    """Redis could not be reached to read the manifest (RedisItemStore.open)."""


@dataclass(frozen=True)
class ItemRows:
    """The held features of N looked-up ids, as graph inputs."""

    columns: dict[str, np.ndarray]  # feature -> [N] (categorical, numeric) or [N, max_len]
    found: np.ndarray  # bool [N]: the features came from the item (fresh or stale)
    outcome: np.ndarray  # int8 [N]: index into OUTCOMES

    def counts(self) -> dict[str, int]:
        """Ids by outcome, every outcome named (zeros included)."""
        counted = np.bincount(self.outcome, minlength=len(OUTCOMES))
        return dict(zip(OUTCOMES, counted.tolist(), strict=True))


@runtime_checkable
class ItemSource(Protocol):
    """What the request decoder needs of an item source."""

    key: str  # the key feature: the candidates column that holds the ids
    features: list[FeatureInfo]  # the features it fills in (not the key)
    rows: int
    source: str  # file path or Redis URL (without password)
    loaded_at: datetime

    async def alookup(self, ids: np.ndarray) -> ItemRows:
        """The held features for `ids` (strings, as the contract makes them: integer ids as
        their decimal strings); never raises for an id it does not hold."""
        ...

    def describe(self) -> dict[str, Any]:
        """What /metadata shows of it."""
        ...


def described(source: ItemSource) -> dict[str, Any]:
    """What /metadata shows of any item source; each adds its own fields."""
    return {
        "source": source.source,
        "key": source.key,
        "features": [f.name for f in source.features],
        "rows": source.rows,
        "loaded_at": source.loaded_at.isoformat(),
    }


# ------------------------------------------------------------------------ checking columns

# Arrow types by what the contract makes of them.
_ACCEPTED = {
    "categorical": {"string", "integer", "float", "null"},  # float: integral values only
    "numeric": {"integer", "float", "null"},
    "tags": {"string", "list<string>", "list<integer>", "list<null>", "null"},
}
_EXPECTED = {
    "categorical": "strings or integers",
    "numeric": "numbers",
    "tags": "lists of ids or separated strings",
}


def type_class(t: pa.DataType) -> str:
    """What an Arrow type is, as far as the checks go: string, integer, float, bool, null,
    list<...> of one of those, or the type's own name."""
    if pa.types.is_dictionary(t):
        return type_class(t.value_type)
    if pa.types.is_null(t):
        return "null"
    if pa.types.is_boolean(t):
        return "bool"
    if pa.types.is_integer(t):
        return "integer"
    if pa.types.is_floating(t) or pa.types.is_decimal(t):
        return "float"
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return "string"
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        return f"list<{type_class(t.value_type)}>"
    return str(t)


def check_columns(
    columns: Mapping[str, str], features: Sequence[FeatureInfo], key: str | None
) -> tuple[str | None, list[FeatureInfo]]:
    """A table's columns (name -> type_class) against the model's features: (the key column,
    or None where `key` is None and the data must tell; the features of the other columns).
    ItemTableError for a column the model does not take, a request-context feature, a column
    of the wrong type, a key column missing or not an id feature."""
    by_name = {f.name: f for f in features}
    items = [f.name for f in features if not f.context]
    for name, typ in columns.items():
        f = by_name.get(name)
        if f is None:
            raise ItemTableError(
                f"column {name!r}: the model has no feature {name!r} (its item features: "
                f"{', '.join(items)})"
            )
        if f.context:
            raise ItemTableError(
                f"column {name!r}: {name} is request context in this model (sent once per "
                "request), not an item feature"
            )
        if typ not in _ACCEPTED[f.kind]:
            raise ItemTableError(
                f"column {name!r} is {typ} but {name} is a {f.kind} feature: expected "
                f"{_EXPECTED[f.kind]}"
            )
    if key is not None:
        if key not in columns:
            raise ItemTableError(
                f"no key column {key!r} in the table (its columns: {', '.join(columns)})"
            )
        if by_name[key].kind != "categorical":
            raise ItemTableError(
                f"key column {key!r}: an item key must be a categorical (id) feature; {key} is "
                f"{by_name[key].kind}"
            )
    held = [by_name[name] for name in columns if name != key]
    return key, held


def id_strings(col: pa.Array | pa.ChunkedArray, name: str) -> pa.Array:
    """An id column as strings, by the contract's rule (integers as decimal strings; integral
    floats, as pandas writes an integer column with missing values, as integers); nulls kept."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    if pa.types.is_dictionary(col.type):
        col = col.dictionary_decode()
    if pa.types.is_null(col.type):
        return pa.nulls(len(col), pa.string())
    if pa.types.is_floating(col.type):
        x = col.to_numpy(zero_copy_only=False).astype(np.float64)
        present = x[~np.isnan(x)]
        bad = ~(np.isfinite(present) & (present == np.round(present)))
        if bad.any():
            raise ItemTableError(
                f"column {name!r} holds {float(present[bad][0])!r}: ids given as numbers must "
                "be integers"
            )
        col = pa.array(np.nan_to_num(x).astype(np.int64), mask=np.isnan(x))
    if not pa.types.is_string(col.type):
        col = pc.cast(col, pa.string())
    return col


def unknown_value(f: FeatureInfo) -> FeatureInfo:
    """`f` as the lookups convert it: a null takes the default, or, for a feature without one
    (a request must send it), what the graph reads as unknown: "" for an id, no tags, NaN for
    a number (a numeric null is NaN either way; its stand-in default is never used)."""
    if f.default is not None:
        return f
    stand_in = {"categorical": "", "tags": [], "numeric": 0.0}[f.kind]
    return f.model_copy(update={"default": stand_in})


def _null_input(f: FeatureInfo) -> np.ndarray:
    """The graph input of one row whose value is null ([1] or [1, max_len])."""
    return column_input(unknown_value(f), [None])


# ------------------------------------------------------------------------ the file table


@dataclass(frozen=True)
class FileSignature:
    """What tells a new table file from the one loaded: path, modification time, size."""

    path: str
    mtime_ns: int
    size: int


def file_signature(path: str | os.PathLike[str]) -> FileSignature:
    st = os.stat(path)
    return FileSignature(str(path), st.st_mtime_ns, st.st_size)


class _Codes:
    """One feature's values for every row, as codes into its distinct graph-input values; the
    row after the last is the null row (what a missing id gets)."""

    def __init__(self, codes: np.ndarray, values: np.ndarray) -> None:
        # [rows + 1] or [rows + 1, max_len], in the smallest unsigned type that holds them:
        # a table of tags with a few thousand distinct ids takes 2 bytes per tag.
        self.codes = codes.astype(np.min_scalar_type(max(len(values) - 1, 0)))
        self.values = values  # object [distinct]

    def take(self, rows: np.ndarray) -> np.ndarray:
        return self.values[self.codes[rows]]


def _categorical(f: FeatureInfo, col: pa.ChunkedArray) -> _Codes:
    enc = id_strings(col, f.name).dictionary_encode()
    distinct = enc.dictionary.to_pylist()
    values = column_input(unknown_value(f), [*distinct, None])  # the null value last
    indices = enc.indices.fill_null(len(distinct)) if enc.indices.null_count else enc.indices
    codes = indices.to_numpy(zero_copy_only=False)
    return _Codes(np.append(codes, len(distinct)), values)


def _numeric(f: FeatureInfo, col: pa.ChunkedArray) -> np.ndarray:
    if pa.types.is_null(col.type):
        x = np.full(len(col), np.nan)
    else:
        x = pc.cast(col, pa.float64(), safe=False).to_numpy(zero_copy_only=False)
    with np.errstate(over="ignore"):
        out = np.append(x, np.nan).astype(np.float32)  # null -> NaN: the graph's default
    inf = np.isinf(out)
    if inf.any():
        row = int(inf.argmax())
        raise ItemTableError(
            f"column {f.name!r}, row {row}: {float(x[row])!r} is outside the float32 range"
        )
    return out


def _tags(f: FeatureInfo, col: pa.ChunkedArray) -> _Codes:
    """The contract's tag rule (contract.values.tag_tokens) over a whole column: a list of
    ids or one string split on the separator, empty tokens dropped (a null token too), the
    first max_len kept, padded with ""; a null row takes the default."""
    assert f.max_len is not None
    arr = col.combine_chunks()
    if pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_decode()
    n = len(arr)
    if pa.types.is_null(arr.type):
        arr = pa.nulls(n, pa.list_(pa.string()))
    elif pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type):
        arr = pc.split_pattern(arr, f.separator or DEFAULT_SEPARATOR)
    null_rows = arr.is_null().to_numpy(zero_copy_only=False)
    flat = pc.list_flatten(arr)
    rows = pc.list_parent_indices(arr).to_numpy(zero_copy_only=False)
    if not pa.types.is_string(flat.type):
        flat = pc.cast(flat, pa.string())
    if flat.null_count:
        flat = pc.fill_null(flat, "")
    keep = pc.not_equal(flat, "").to_numpy(zero_copy_only=False)
    tokens, rows = flat.filter(pa.array(keep)), rows[keep]
    starts = np.cumsum(np.bincount(rows, minlength=n)) - np.bincount(rows, minlength=n)
    pos = np.arange(len(rows)) - starts[rows]  # each token's place in its row
    first = pos < f.max_len
    enc = tokens.filter(pa.array(first)).dictionary_encode()
    vocab = ["", *enc.dictionary.to_pylist()]
    codes = np.zeros((n + 1, f.max_len), dtype=np.int32)
    codes[rows[first], pos[first]] = enc.indices.to_numpy(zero_copy_only=False) + 1
    null_row = _null_input(f)[0].tolist()
    index = {t: i for i, t in enumerate(vocab)}
    for t in null_row:
        index.setdefault(t, len(index))
    codes[np.append(null_rows, True)] = [index[t] for t in null_row]
    values = np.empty(len(index), dtype=object)
    values[:] = list(index)
    return _Codes(codes, values)


# The index pandas writes as a column (DataFrame.to_parquet): not the table's.
_PANDAS_INDEX = re.compile(r"__index_level_\d+__")


def table_columns(schema: pa.Schema) -> list[str]:
    """A table file's columns, but for an index pandas wrote as one."""
    return [name for name in schema.names if not _PANDAS_INDEX.fullmatch(name)]


def _read(path: Path) -> tuple[pa.Schema, Callable[[], pa.Table]]:
    """The file's schema, and a function that reads it whole. Arrow IPC (Feather v2) files are
    memory-mapped: the table's buffers are the file's pages, copied only by the conversion.
    The format is told by the file's first bytes."""
    with open(path, "rb") as fh:
        magic = fh.read(6)
    try:
        if magic[:4] == b"PAR1":
            return pq.read_schema(path), lambda: pq.read_table(path, memory_map=True)
        ipc = pa.ipc.open_file if magic == b"ARROW1" else pa.ipc.open_stream
        with pa.memory_map(str(path)) as src:
            schema = ipc(src).schema

        def read() -> pa.Table:
            with pa.memory_map(str(path)) as src:
                table: pa.Table = ipc(src).read_all()
                return table

        return schema, read
    except (pa.ArrowInvalid, OSError) as err:
        raise ItemTableError(
            f"{path}: not a Parquet or Arrow IPC (Feather v2) file ({err})"
        ) from None


def _read_all(path: Path, read: Callable[[], pa.Table]) -> pa.Table:
    try:
        return read()
    except (pa.ArrowInvalid, OSError) as err:
        raise ItemTableError(f"{path}: cannot read the table: {err}") from None


def read_table(path: str | os.PathLike[str]) -> pa.Table:
    """A table file (Parquet or Arrow IPC) whole, as ItemTable.load reads it."""
    path = Path(path)
    if not path.is_file():
        raise ItemTableError(f"{path}: no such file")
    return _read_all(path, _read(path)[1])


class _HashIndex:
    """Row of each key, by the key's 64-bit hash, in an open-addressing table (linear probing,
    at most half full): a lookup reads an id's home cell, and the few after it for the ids
    whose home cell another key holds, whatever the table's size. Equal hashes are not
    indexed twice (`clashes`: the table sorts them out). A probe runs on past the last cell
    into spare ones rather than wrapping around."""

    WINDOW = 8  # cells read at once past the home cell: nearly every probe ends within them
    FREE = -1  # the hash of a free cell: Python never hashes a string to -1

    def __init__(self, hashes: np.ndarray) -> None:
        n = len(hashes)
        size = 1 << max(1, (2 * n - 1).bit_length())
        self.mask = size - 1
        self.hashes = np.full(size + 4 * self.WINDOW, self.FREE, dtype=np.int64)
        self.rows = np.zeros(len(self.hashes), dtype=np.int32 if n < 2**31 else np.int64)
        # (row, the row holding its hash) for each hash already held.
        self.clashes: list[tuple[int, int]] = []
        pending = np.arange(n)
        cell = hashes & self.mask
        while len(pending):
            at = cell[pending]
            if at.max() + self.WINDOW >= len(self.hashes):  # spare cells for a lookup to read
                self._extend(len(self.hashes))
            held = self.hashes[at]
            free = held == self.FREE
            clash = held == hashes[pending]
            self.clashes += zip(pending[clash].tolist(), self.rows[at[clash]].tolist(), strict=True)
            # The first of the rows wanting one free cell takes it; the others try it again.
            taken, first = np.unique(at[free], return_index=True)
            winners = pending[free][first]
            self.hashes[taken] = hashes[winners]
            self.rows[taken] = winners
            placed = np.zeros(n, dtype=bool)
            placed[winners] = True
            on = ~free & ~clash
            cell[pending[on]] = at[on] + 1
            pending = pending[~placed[pending] & ~clash]

    def _extend(self, by: int) -> None:
        self.hashes = np.concatenate([self.hashes, np.full(by, self.FREE, dtype=np.int64)])
        self.rows = np.concatenate([self.rows, np.zeros(by, dtype=self.rows.dtype)])

    def find(self, h: np.ndarray) -> np.ndarray:
        """The row of each hash, -1 where no key has it."""
        out = np.full(len(h), -1, dtype=np.int64)
        home = h & self.mask
        held = self.hashes[home]
        hit = held == h
        out[hit] = self.rows[home[hit]]
        active = np.flatnonzero(~hit & (held != self.FREE))  # another key's home: read on
        start = home[active] + 1
        window = np.arange(self.WINDOW)
        while len(active):
            cells = start[:, None] + window
            held = self.hashes[cells]
            match = held == h[active, None]
            found = match.any(axis=1)
            out[active[found]] = self.rows[cells[found, match[found].argmax(axis=1)]]
            on = ~found & ~(held == self.FREE).any(axis=1)  # neither found nor ended
            active, start = active[on], start[on] + self.WINDOW
        return out


class ItemTable:
    """Item features from a file, loaded once (docs/items.md). Build it with `load`."""

    def __init__(
        self,
        key: str,
        features: list[FeatureInfo],
        keys: pa.Array,
        columns: dict[str, _Codes | np.ndarray],
        signature: FileSignature,
    ) -> None:
        self.key = key
        self.features = features
        self.rows = len(keys)
        self.source = signature.path
        self.loaded_at = datetime.now(UTC)
        self.load_seconds = 0.0
        self._signature = signature
        self._columns = columns  # each feature's rows, then the null row (a missing id's)
        # Ids are matched by their 64-bit hash (Python's, keyed per process): an id not in
        # the table takes a row's features with a chance of rows / 2**64, far below the
        # model's own hash buckets. Keys that share a hash (about one table in 10**7 of a
        # million rows) are matched exactly.
        hashes = np.empty(len(keys), dtype=np.int64)
        for start in range(0, len(keys), 1 << 16):  # a few Python strings at a time
            chunk = keys.slice(start, 1 << 16).to_pylist()
            hashes[start : start + len(chunk)] = np.fromiter(map(hash, chunk), np.int64)
        self._index = _HashIndex(hashes)
        self._shared: dict[str, int] = {}  # keys of a shared hash -> row
        sharing: dict[int, list[int]] = {}  # the row in the index -> the rows of its hash
        for row, earlier in sorted(self._index.clashes):
            sharing.setdefault(earlier, [earlier]).append(row)
        for rows in sharing.values():
            for row in rows:
                name = keys[row].as_py()
                earlier = self._shared.setdefault(name, row)
                if earlier != row:
                    raise ItemTableError(
                        f"key column {key!r}: duplicate key {name!r} (rows {earlier} and "
                        f"{row}): one row per item"
                    )
        self._shared_hashes = np.array([hash(k) for k in self._shared], dtype=np.int64)

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        features: Sequence[FeatureInfo],
        key: str | None = None,
    ) -> ItemTable:
        """The table in `path` (Parquet or Arrow IPC) for a model of `features`.

        `key`: the column of item ids, one of the model's categorical candidate features;
        None: the one such column with unique values. Every other column must be a candidate
        feature of the model, of a type its kind takes. ItemTableError says which column is
        wrong and why (also for duplicate or null keys)."""
        t0 = time.perf_counter()
        path = Path(path)
        if not path.is_file():
            raise ItemTableError(f"{path}: no such file")
        signature = file_signature(path)
        schema, read = _read(path)
        if len(set(schema.names)) != len(schema.names):
            twice = next(n for n in schema.names if schema.names.count(n) > 1)
            raise ItemTableError(f"{path}: column {twice!r} is there twice")
        types = {name: type_class(schema.field(name).type) for name in table_columns(schema)}
        key, held = check_columns(types, features, key)
        table = _read_all(path, read)
        if key is None:
            key = _find_key(table, types, {f.name: f for f in features})
            held = [f for f in held if f.name != key]
        keys = id_strings(table.column(key), key)
        if keys.null_count:
            row = int(np.argmax(keys.is_null().to_numpy(zero_copy_only=False)))
            raise ItemTableError(f"key column {key!r}, row {row}: null (every item needs an id)")
        columns: dict[str, _Codes | np.ndarray] = {}
        for f in held:
            col = table.column(f.name)
            if f.kind == "numeric":
                columns[f.name] = _numeric(f, col)
            else:
                columns[f.name] = _tags(f, col) if f.kind == "tags" else _categorical(f, col)
        del table
        out = cls(key, held, keys, columns, signature)
        out.load_seconds = time.perf_counter() - t0
        return out

    def signature(self) -> FileSignature:
        """The file as it was when loaded: compare with file_signature(path) to tell a new one."""
        return self._signature

    def describe(self) -> dict[str, Any]:
        return described(self)

    def lookup(self, ids: np.ndarray) -> ItemRows:
        """The held features for `ids` (strings): a hash lookup per id, a take per column."""
        rows, found = self._rows(ids)
        columns = {
            name: c.take(rows) if isinstance(c, _Codes) else c[rows]
            for name, c in self._columns.items()
        }
        outcome = np.where(found, HIT, MISS).astype(np.int8)
        return ItemRows(columns, found, outcome)

    async def alookup(self, ids: np.ndarray) -> ItemRows:
        return self.lookup(ids)

    def _rows(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Each id's row (the null row where absent) and whether it was found."""
        listed = ids.tolist()
        h = np.fromiter(map(hash, listed), np.int64, len(listed))
        rows = self._index.find(h)
        if len(self._shared_hashes):
            for j in np.flatnonzero(np.isin(h, self._shared_hashes)).tolist():
                rows[j] = self._shared.get(listed[j], -1)
        found = rows >= 0
        return np.where(found, rows, self.rows), found


def _find_key(table: pa.Table, types: Mapping[str, str], by_name: dict[str, FeatureInfo]) -> str:
    """The key column of a table that names none: the one id column, or the one id column with
    unique values."""
    ids = [
        name
        for name, typ in types.items()
        if by_name[name].kind == "categorical" and typ in ("string", "integer")
    ]
    if len(ids) == 1:
        return ids[0]
    unique = [
        name
        for name in ids
        if table.column(name).null_count == 0
        and pc.count_distinct(table.column(name)).as_py() == table.num_rows
    ]
    if len(unique) == 1:
        return unique[0]
    if not unique:
        raise ItemTableError(
            "no key column: no id column has a unique value in every row "
            f"({', '.join(ids) or 'the table has no id column'}); name the key column"
        )
    raise ItemTableError(
        f"several columns could be the key ({', '.join(unique)}): name the key column"
    )


# ------------------------------------------------------------------------ Redis


def item_key(namespace: str, item: str) -> str:
    """The Redis key of an item's row."""
    return f"{namespace}:item:{item}"


def manifest_key(namespace: str) -> str:
    """The Redis key of the manifest hash."""
    return f"{namespace}:items"


def redacted(url: str) -> str:
    """A Redis URL without its password."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        user, _, host = netloc.rpartition("@")
        name = user.partition(":")[0]
        netloc = f"{name}:***@{host}" if ":" in user else f"{user}@{host}"
    return urlunsplit(parts._replace(netloc=netloc))


def split_namespace(url: str) -> tuple[str, str | None]:
    """(the URL for redis-py, the `namespace` query parameter of `url` or None)."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    namespace = next((v for k, v in query if k == "namespace"), None)
    rest = urlencode([(k, v) for k, v in query if k != "namespace"])
    return urlunsplit(parts._replace(query=rest)), namespace


def _item(text: str | None) -> dict[str, Any] | None:
    """An item's stored text -> its row (None: no such item). Text that is not a JSON object
    is logged and read as a row of nulls."""
    if text is None:
        return None
    try:
        row = json.loads(text)
    except ValueError:
        row = None
    if isinstance(row, dict):
        return row
    _invalid("", text)
    return {}


def _checked(f: FeatureInfo, v: Any) -> Any:
    """A stored value as a request would send it, or None (null; a value of the wrong type,
    which is logged, counts as null too)."""
    if v is None:
        return None
    if f.kind == "numeric":
        if isinstance(v, bool) or not isinstance(v, int | float):
            return _invalid(f.name, v)
        if isinstance(v, float) and math.isnan(v):
            return None
        return v if _fits_float32(v) else _invalid(f.name, v)
    if f.kind == "tags":
        if isinstance(v, str):
            return v
        if not isinstance(v, list):
            return _invalid(f.name, v)
        tokens = [_id(t) for t in v if t is not None]
        return tokens if all(t is not None for t in tokens) else _invalid(f.name, v)
    out = _id(v)
    return out if out is not None else _invalid(f.name, v)


# The smallest magnitude float32 rounds to infinity: the contract refuses a number from here on.
_FLOAT32_OVERFLOW = 3.4028235677973366e38


def _fits_float32(v: float) -> bool:
    try:
        return abs(float(v)) < _FLOAT32_OVERFLOW
    except OverflowError:  # an integer past any float
        return False


# Values of the types a request sends for each kind, which need no check of their own (the
# tokens of tag lists apart).
_PLAIN: dict[str, set[type]] = {
    "categorical": {str, int, type(None)},
    "numeric": {int, float, type(None)},
    "tags": {str, list, type(None)},
}


def _checked_column(f: FeatureInfo, raw: list[Any]) -> list[Any]:
    """_checked for each value; the common case in bulk."""
    if set(map(type, raw)) <= _PLAIN[f.kind]:
        if f.kind == "categorical":
            return raw
        if f.kind == "tags":
            lists = (v for v in raw if v.__class__ is list)
            if set(map(type, chain.from_iterable(lists))) <= {str, int}:
                return raw
        else:
            try:
                x = np.array(raw, dtype=np.float64)
            except OverflowError:  # an integer past any float
                x = None
            if x is not None and not (np.abs(x) >= _FLOAT32_OVERFLOW).any():
                return raw
    return [_checked(f, v) for v in raw]


def _id(v: Any) -> str | int | None:
    if isinstance(v, str) or (isinstance(v, int) and not isinstance(v, bool)):
        return v
    if isinstance(v, float) and v.is_integer():
        return int(v)
    return None


_warned: set[str] = set()


def _invalid(feature: str, value: Any) -> None:
    if feature not in _warned:  # once per feature: the store is wrong, not each request
        _warned.add(feature)
        what = f"{feature} holds" if feature else "an item is"
        log.warning(
            "item store: %s %.80r, not what a request may send: read as null",
            what,
            value,
            extra={"event": "item_value_invalid", "feature": feature},
        )
    return None


class RedisItemStore:
    """Item features in Redis (the layout at the top of this module), behind an LRU cache.

    A lookup answers the ids cached less than `ttl_s` ago from the cache and fetches the
    others with one MGET, bounded by `timeout_s`. When Redis
    fails, ids with an older cache entry are answered from it (outcome stale), the others get
    defaults (error), and Redis is left alone for `retry_s` before the next try; the client
    reconnects by itself once it answers again. Misses are cached as misses. The cache holds
    at most `cache_items` items, least recently used out first.

    `open()` must run first (it reads the manifest); `open()` again re-reads it."""

    def __init__(
        self,
        url: str,
        features: Sequence[FeatureInfo],
        *,
        namespace: str | None = None,
        cache_items: int = 100_000,
        ttl_s: float = 60.0,
        timeout_s: float = 0.25,
        retry_s: float = 1.0,
    ) -> None:
        from redis.asyncio import Redis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        if cache_items < 1:
            raise ValueError("cache_items must be at least 1")
        client_url, in_url = split_namespace(url)
        self.namespace = namespace or in_url or DEFAULT_NAMESPACE
        self.source = redacted(url)
        self.model_features = list(features)
        self.cache_items = cache_items
        self.ttl_s = ttl_s
        self.timeout_s = timeout_s
        self.retry_s = retry_s
        # One try per call: a lookup waits on Redis once, then falls back (retry_s paces it).
        self._client = Redis.from_url(
            client_url,
            decode_responses=True,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 0),
        )
        self._prefix = item_key(self.namespace, "")
        self.key = ""
        self.features: list[FeatureInfo] = []
        self.rows = 0
        self.loaded_at = datetime.now(UTC)
        self.pushed_at = ""
        self.calls = 0  # round trips to Redis for items
        self.failures = 0  # of those, failed
        self._retry_at = 0.0
        self._cache = _Cache([], cache_items)

    @classmethod
    async def connect(
        cls, url: str, features: Sequence[FeatureInfo], **options: Any
    ) -> RedisItemStore:
        """A store for `url`, opened (see open)."""
        store = cls(url, features, **options)
        await store.open()
        return store

    async def open(self) -> None:
        """Reads the manifest and checks its columns against the model's features, as a file's
        are checked (ItemTableError); ItemStoreUnavailable if Redis cannot be reached. The
        cache starts empty."""
        from redis.exceptions import RedisError

        name = manifest_key(self.namespace)
        try:
            async with asyncio.timeout(self.timeout_s * 4):
                got: Any = await self._client.hgetall(name)  # decode_responses: str
        except (RedisError, OSError, TimeoutError) as err:
            raise ItemStoreUnavailable(
                f"{self.source}: cannot read the item manifest {name}: {err or type(err)}"
            ) from None
        manifest: dict[str, str] = got
        if not manifest:
            raise ItemTableError(
                f"{self.source}: no item table (no manifest {name}): push one with "
                "`mmoe items push`"
            )
        try:
            columns = json.loads(manifest["columns"])
            key = manifest["key"]
            rows = int(manifest.get("rows", 0))
            if not isinstance(columns, dict) or not all(
                isinstance(t, str) for t in columns.values()
            ):
                raise ValueError("`columns` is not an object of column types")
        except (KeyError, ValueError) as err:
            raise ItemTableError(f"{self.source}: malformed manifest {name}: {err}") from None
        found, held = check_columns(columns, self.model_features, key)
        assert found is not None
        self.key, self.features, self.rows = found, held, rows
        self.pushed_at = manifest.get("pushed_at", "")
        self.loaded_at = datetime.now(UTC)
        self._cache = _Cache(held, self.cache_items)

    async def aclose(self) -> None:
        await self._client.aclose()

    def describe(self) -> dict[str, Any]:
        return described(self) | {
            "pushed_at": self.pushed_at,
            "cache_items": self.cache_items,
            "ttl_s": self.ttl_s,
        }

    async def alookup(self, ids: np.ndarray) -> ItemRows:
        """The held features for `ids` (strings); never raises (see the class)."""
        listed = ids.tolist()
        now = time.monotonic()
        # Everything the cache answers is read before the one await: another lookup may
        # change the cache meanwhile, and open() replace it.
        cache = self._cache
        at = cache.slots_of(listed)
        cached = at < cache.size
        columns = {name: values[at] for name, values in cache.columns.items()}
        found = cache.found[at]
        outcome = np.where(found, HIT, MISS).astype(np.int8)
        cache.touch(listed, cached)
        expired = np.flatnonzero(~cached | (now - cache.fetched[at] >= self.ttl_s))
        if not len(expired):
            return ItemRows(columns, found, outcome)
        need = list(dict.fromkeys([listed[j] for j in expired.tolist()]))
        fetched = await self._fetch(need) if now >= self._retry_at else None
        if fetched is None:  # Redis failed: older entries answer, the rest get defaults
            outcome[expired] = np.where(cached[expired], STALE, ERROR)
            return ItemRows(columns, found, outcome)
        values, hit = _convert(cache.features, fetched)
        index = {i: k for k, i in enumerate(need)}
        k = np.fromiter((index[listed[j]] for j in expired.tolist()), np.intp, len(expired))
        for name, v in values.items():
            columns[name][expired] = v[k]
        found[expired] = hit[k]
        outcome[expired] = np.where(hit[k], HIT, MISS)
        cache.store(need, values, hit, time.monotonic())
        return ItemRows(columns, found, outcome)

    async def _fetch(self, ids: list[str]) -> list[str | None] | None:
        """The stored text of each id (None where there is no such item); None when Redis
        failed."""
        from redis.exceptions import RedisError

        self.calls += 1
        prefix = self._prefix
        try:
            async with asyncio.timeout(self.timeout_s):
                texts: Any = await self._client.mget([prefix + i for i in ids])  # str: decoded
        except (RedisError, OSError, TimeoutError) as err:
            self.failures += 1
            self._retry_at = time.monotonic() + self.retry_s
            log.warning(
                "item store %s unavailable (%s): answering from the cache and defaults for %.1f s",
                self.source,
                err or type(err).__name__,
                self.retry_s,
                extra={"event": "item_store_unavailable", "source": self.source},
            )
            return None
        return texts


def _convert(
    features: list[FeatureInfo], fetched: list[str | None]
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Fetched items -> each feature's graph inputs (contract rules) and which ids exist."""
    rows = [_item(text) for text in fetched]
    hit = np.fromiter((r is not None for r in rows), dtype=bool, count=len(rows))
    found = [r or {} for r in rows]
    values = {}
    for f in features:
        raw = _checked_column(f, [r.get(f.name) for r in found])
        values[f.name] = column_input(unknown_value(f), raw)
    return values, hit


class _Cache:
    """Items read from Redis: at most `size`, the least recently used out first. Each item has
    a slot: its row in one array of graph inputs per feature; slot `size` is the null row (what
    an id without an item gets)."""

    def __init__(self, features: list[FeatureInfo], size: int) -> None:
        self.features = features
        self.size = size
        self.slots: OrderedDict[str, int] = OrderedDict()  # id -> slot, least recent first
        self.free = list(range(size - 1, -1, -1))
        self.fetched = np.zeros(size + 1)  # when each slot was read (time.monotonic)
        self.found = np.zeros(size + 1, dtype=bool)
        self.columns = {f.name: np.repeat(_null_input(f), size + 1, axis=0) for f in features}

    def slots_of(self, ids: list[str]) -> np.ndarray:
        """Each id's slot; `size` for one not cached."""
        get, size = self.slots.get, self.size
        return np.fromiter((get(i, size) for i in ids), dtype=np.intp, count=len(ids))

    def touch(self, ids: list[str], cached: np.ndarray) -> None:
        """Marks the cached ones of `ids` used now."""
        move = self.slots.move_to_end
        for j in np.flatnonzero(cached).tolist():
            move(ids[j])

    def store(
        self, ids: list[str], values: dict[str, np.ndarray], hit: np.ndarray, now: float
    ) -> None:
        """Puts items read at `now` in the cache, evicting the least recently used when full."""
        slots = self.slots
        keep = ids[-self.size :]  # more ids than the cache holds: the last ones
        start = len(ids) - len(keep)
        at = np.empty(len(keep), dtype=np.intp)
        for j, i in enumerate(keep):
            s = slots.get(i)
            if s is None:
                s = self.free.pop() if self.free else slots.popitem(last=False)[1]
                slots[i] = s
            else:
                slots.move_to_end(i)
            at[j] = s
        self.fetched[at] = now
        self.found[at] = hit[start:]
        for name, v in values.items():
            self.columns[name][at] = v[start:]
