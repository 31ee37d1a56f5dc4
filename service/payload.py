"""Request bodies -> the ONNX graph's input arrays, in bulk.

The body types are generated from the model's metadata as msgspec Structs, so decoding and type
checking happen in one C pass (no per-item pydantic objects), and their JSON Schema documents the
request in OpenAPI. The request's shape (docs/api.md):

- columnar: `candidates` holds one list per feature, all of the same length N; `context` holds
  scalars shared by all N rows. A feature the model declares context (its graph input takes
  one row per request) is passed once, as a [1] array ([1, max_len] for tags), whether given
  in `context` or left to its default; any other feature's context value is broadcast to the
  N rows. A declared-context feature may also come as a candidates column (N values); the
  graph takes its context inputs all once or all per row, so then every context input is
  given N rows (`one_context_batch`). Row form: `instances`, a list of objects.
- categorical values are strings or integers; numeric values are numbers; tags are a list of ids
  or one string. What each value becomes (defaults, integer ids, tag splitting and padding) is
  the contract's rule, `contract/values.py`, shared with export and the warm-up.
- `model` and `version` (optional) name the model that scores the request; the registry reads
  them, and the routing key, with a `RequestHead` before the model's own decoder runs.
- null, or leaving a feature out, means "use the default"; features without one are required.
- unknown categorical values are fine (the out-of-vocabulary bucket); anything else wrong is a
  PayloadError naming the field. That includes a key given twice in one object (JSON parsers
  silently keep one of them) and ids longer than MAX_ID_CHARS.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Annotated, Any, Literal

import msgspec
import numpy as np

from mmoe.contract.metadata import FeatureInfo, ModelMetadata
from mmoe.contract.values import InvalidValue, broadcast_input, column_input, one_context_batch
from mmoe.service.errors import PayloadError

# No real id is longer; a longer one is a client bug, refused rather than scored as unknown.
MAX_ID_CHARS = 1024
_ID = Annotated[str, msgspec.Meta(max_length=MAX_ID_CHARS)] | int
_TOO_MANY_ROWS = re.compile(r"Expected array of length <= (\d+)")


def _tag_string(f: FeatureInfo) -> Any:
    return Annotated[str, msgspec.Meta(max_length=(MAX_ID_CHARS + 1) * (f.max_len or 1))]


def _column_type(f: FeatureInfo, max_rows: int) -> Any:
    column: Any = list[_ID | None]
    if f.kind == "numeric":
        column = list[float | None]
    elif f.kind == "tags":
        column = list[list[_ID] | _tag_string(f) | None]  # type: ignore[misc]
    # Declared in the type, so the decoder refuses a long column (413) before any other check.
    return Annotated[column, msgspec.Meta(max_length=max_rows)]


def _scalar_type(f: FeatureInfo) -> Any:
    if f.kind == "numeric":
        return float | None
    if f.kind == "tags":
        return list[_ID] | _tag_string(f) | None
    return _ID | None


def _struct(name: str, features: Sequence[FeatureInfo], typ: Any, forbid: bool) -> Any:
    fields = [(f"f{i}", typ(f) | msgspec.UnsetType, msgspec.UNSET) for i, f in enumerate(features)]
    rename = {f"f{i}": f.name for i, f in enumerate(features)}
    return msgspec.defstruct(name, fields, rename=rename, forbid_unknown_fields=forbid)


@dataclass(frozen=True)
class ItemFields:
    """What the server's item source holds (service/items.py): the key feature whose values
    are item ids, and the candidate features it fills in for a request that leaves them out."""

    key: str
    features: frozenset[str]


@dataclass
class Decoded:
    """A request's feeds. When it sends item ids and leaves item features out, `fill` names
    those features (each with the rows to fill, None for all) and `ids` holds the ids: the
    caller looks them up (ItemSource.alookup) and `fill_items` completes the feeds."""

    n: int
    feeds: dict[str, np.ndarray]
    tasks: list[str]
    ids: np.ndarray | None = None
    fill: dict[str, np.ndarray | None] = field(default_factory=dict)

    def fill_items(self, columns: dict[str, np.ndarray]) -> None:
        """Complete the feeds with the item source's columns for `ids`."""
        for name, rows in self.fill.items():
            if rows is None:
                self.feeds[name] = columns[name]
            else:
                self.feeds[name][rows] = columns[name][rows]
        self.fill = {}


def _msgspec_error(err: msgspec.ValidationError) -> PayloadError:
    text = str(err)
    reason, _, path = text.partition(" - at `")
    field = path.rstrip("`").removeprefix("$").lstrip(".") or None
    reason = reason.replace("`", "")
    too_many = _TOO_MANY_ROWS.fullmatch(reason)
    if too_many:
        return PayloadError(
            field,
            f"more than the limit of {too_many.group(1)} rows per request",
            413,
            "too_many_rows",
        )
    unknown = re.fullmatch(r"Object contains unknown field (.+)", reason)
    if unknown:
        name = unknown.group(1)
        field = f"{field}.{name}" if field else name
        return PayloadError(
            field, "unknown field (the model's features are listed at GET /metadata)"
        )
    return PayloadError(field, reason)


def duplicate_key(body: bytes, keys: Sequence[str] | None = None) -> str | None:
    """A key that some object in `body` (valid JSON, already decoded once) gives twice, or None.

    With `keys` (every key the decoder reads), the common case costs a few substring counts: if
    no key can be written with an escape (no backslash in the body) and each appears at most once,
    no object repeats one. Otherwise, or without `keys`, the objects are walked exactly.
    """
    if (
        keys is not None
        and b"\\" not in body
        and all(body.count(b'"%s"' % k.encode()) <= 1 for k in keys)
    ):
        return None
    found: list[str] = []

    def check(pairs: list[tuple[str, Any]]) -> None:
        if not found:
            seen: set[str] = set()
            for k, _ in pairs:
                if k in seen:
                    found.append(k)
                    break
                seen.add(k)

    try:  # numbers are left as None: only the keys matter
        json.loads(body, object_pairs_hook=check, parse_int=_skip, parse_float=_skip)
    except (ValueError, RecursionError):
        return None  # not for this check to report: the decoder has accepted the body
    return found[0] if found else None


def _skip(_: str) -> None:
    return None


def _each_key_once(req: Any, body: bytes) -> bool:
    """Whether no object of a columnar body gives a key twice, decided at the cost of counting
    one byte: outside strings every key is followed by a colon, and each field the decoder
    filled was given at least once, so a body with no more colons than filled fields gives
    each key once. False means "not known": the body gets the exact check."""
    if req.instances is not None:
        return False
    filled = sum(
        v is not None for v in (req.candidates, req.context, req.tasks, req.model, req.version)
    )
    for part in (req.candidates, req.context):
        if part is not None:
            filled += sum(
                getattr(part, name) is not msgspec.UNSET for name in part.__struct_fields__
            )
    return body.count(b":") <= filled


class RequestDecoder:
    """Decodes /predict bodies for one model."""

    def __init__(
        self,
        meta: ModelMetadata,
        max_rows: int,
        unknown_features: Literal["error", "ignore"] = "error",
    ) -> None:
        self.meta = meta
        self.features = list(meta.features)
        self.context = [f.name for f in self.features if f.context]
        self.max_rows = max_rows
        forbid = unknown_features == "error"
        column_type = partial(_column_type, max_rows=max_rows)
        self.candidates_type = _struct("Candidates", self.features, column_type, forbid)
        self.context_type = _struct("Context", self.features, _scalar_type, forbid)
        self.row_type = _struct("Instance", self.features, _scalar_type, forbid)
        task_names = tuple(t.name for t in meta.tasks)
        self.request_type = msgspec.defstruct(
            "PredictRequest",
            [
                ("candidates", self.candidates_type | None, None),
                ("context", self.context_type | None, None),
                (
                    "instances",
                    Annotated[
                        list[self.row_type],  # type: ignore[name-defined]
                        msgspec.Meta(max_length=max_rows),
                    ]
                    | None,
                    None,
                ),
                ("tasks", list[Literal[task_names]] | None, None),  # type: ignore[valid-type]
                # Read by the registry (RequestHead) to pick the model; documented here.
                ("model", str | None, None),
                ("version", str | int | None, None),
            ],
            forbid_unknown_fields=True,
        )
        self._decoder = msgspec.json.Decoder(self.request_type)
        self._keys = [
            "candidates",
            "context",
            "instances",
            "tasks",
            "model",
            "version",
            *(f.name for f in self.features),
        ]

    def json_schema(self) -> dict[str, Any]:
        """JSON Schema of the request body (for OpenAPI); definitions under $defs."""
        return msgspec.json.schema(self.request_type)

    # ------------------------------------------------------------------------------ decode

    def decode(self, body: bytes, items: ItemFields | None = None) -> Decoded:
        """The request in `body` as feeds; with `items`, item features a request that sends
        the key leaves out are to be filled from the item source (Decoded.fill)."""
        try:
            req: Any = self._decoder.decode(body)
        except msgspec.ValidationError as err:
            error = _msgspec_error(err)
            if (error.field or "").startswith("tasks["):
                error.reason += f"; the model's tasks are {[t.name for t in self.meta.tasks]}"
            raise error from None
        except msgspec.DecodeError as err:
            raise PayloadError(None, f"malformed JSON: {err}", 400, "malformed_json") from None
        except UnicodeDecodeError as err:  # msgspec raises it for invalid UTF-8 inside strings
            raise PayloadError(
                None,
                f"malformed JSON: a string is not valid UTF-8 ({err.reason})",
                400,
                "malformed_json",
            ) from None
        except RecursionError:  # nesting under an ignored unknown feature
            raise PayloadError(
                None, "malformed JSON: nested too deeply", 400, "malformed_json"
            ) from None
        key = None if _each_key_once(req, body) else duplicate_key(body, self._keys)
        if key is not None:
            raise PayloadError(
                key, "given twice in one object: give each key once", 422, "duplicate_key"
            )
        tasks = list(req.tasks) if req.tasks else [t.name for t in self.meta.tasks]
        if req.instances is not None:
            if req.candidates is not None or req.context is not None:
                raise PayloadError(
                    "instances",
                    "give `instances`, or `candidates` (with optional `context`), not both",
                )
            return self._from_rows(req.instances, tasks, items)
        if req.candidates is None:
            raise PayloadError("candidates", "required: one list per feature (or use `instances`)")
        return self._from_columns(req.candidates, req.context, tasks, items)

    def _check_rows(self, n: int, field: str) -> None:
        if n == 0:
            raise PayloadError(field, "empty batch: send at least one candidate")
        if n > self.max_rows:
            raise PayloadError(
                field,
                f"{n} rows is more than the limit of {self.max_rows} per request",
                413,
                "too_many_rows",
            )

    def _from_columns(
        self, cands: Any, ctx: Any, tasks: list[str], items: ItemFields | None
    ) -> Decoded:
        columns: dict[str, tuple[FeatureInfo, list[Any]]] = {}
        n = -1
        first = ""
        for i, f in enumerate(self.features):
            values = getattr(cands, f"f{i}")
            if values is msgspec.UNSET:
                continue
            if n < 0:
                n, first = len(values), f.name
            elif len(values) != n:
                raise PayloadError(
                    f"candidates.{f.name}",
                    f"has {len(values)} values but candidates.{first} has {n}: "
                    "every candidate column must have one value per candidate",
                )
            columns[f.name] = (f, values)
        if n < 0:
            raise PayloadError("candidates", "no feature columns given")
        self._check_rows(n, "candidates")
        feeds: dict[str, np.ndarray] = {}
        held = items.features if items is not None and items.key in columns else frozenset()
        fill: dict[str, np.ndarray | None] = {}
        for i, f in enumerate(self.features):
            scalar = getattr(ctx, f"f{i}") if ctx is not None else msgspec.UNSET
            rows = 1 if f.context else n  # the graph broadcasts a context input itself
            if f.name in columns:
                if scalar is not msgspec.UNSET:
                    raise PayloadError(
                        f"context.{f.name}", "also given in candidates: give a feature once"
                    )
                feeds[f.name] = column_array(f, columns[f.name][1], f"candidates.{f.name}")
            elif scalar is not msgspec.UNSET:
                feeds[f.name] = broadcast_array(f, scalar, rows, f"context.{f.name}")
            elif f.name in held:
                fill[f.name] = None
            else:
                feeds[f.name] = default_array(f, rows, f"candidates.{f.name}")
        ids = feeds[items.key] if fill and items is not None else None
        return Decoded(n, one_context_batch(self.context, feeds, n), tasks, ids, fill)

    def _from_rows(self, rows: list[Any], tasks: list[str], items: ItemFields | None) -> Decoded:
        n = len(rows)
        self._check_rows(n, "instances")
        feeds: dict[str, np.ndarray] = {}
        key = self._key_rows(rows, items)
        fill: dict[str, np.ndarray | None] = {}
        for i, f in enumerate(self.features):
            attr = f"f{i}"
            values = [getattr(r, attr) for r in rows]
            unset = [j for j, v in enumerate(values) if v is msgspec.UNSET]
            if unset and key is not None and items is not None and f.name in items.features:
                # Rows that send their id and leave this feature out take the table's value;
                # a placeholder holds their place until then.
                from_table = np.zeros(n, dtype=bool)
                from_table[[j for j in unset if key[j]]] = True
                if from_table.any():
                    fill[f.name] = from_table
                    stand_in = _stand_in(f)
                    values = [stand_in if from_table[j] else v for j, v in enumerate(values)]
                    unset = [j for j in unset if not from_table[j]]
            if unset:
                if f.required:
                    raise PayloadError(
                        f"instances[{unset[0]}].{f.name}", "required feature missing (no default)"
                    )
                values = [None if v is msgspec.UNSET else v for v in values]
            feeds[f.name] = _rows_array(f, values)
        ids = feeds[items.key] if fill and items is not None else None
        return Decoded(n, feeds, tasks, ids, fill)

    def _key_rows(self, rows: list[Any], items: ItemFields | None) -> list[bool] | None:
        """Which rows give the item key (None: no item source, or no row gives it)."""
        if items is None:
            return None
        index = next((i for i, f in enumerate(self.features) if f.name == items.key), None)
        if index is None:
            return None
        given = [getattr(r, f"f{index}") not in (msgspec.UNSET, None) for r in rows]
        return given if any(given) else None


def _stand_in(f: FeatureInfo) -> Any:
    """A valid value of `f`'s kind, for a row whose value the item source gives."""
    return 0.0 if f.kind == "numeric" else [] if f.kind == "tags" else ""


# ----------------------------------------------------------------------------- the head


@dataclass(frozen=True)
class Head:
    """What routing needs of a /predict body: the model and version it names (or None), and
    the value it gives each routing key feature (in `context`, else the first candidate's)."""

    model: str | None
    version: str | None
    keys: dict[str, str]


class RequestHead:
    """Reads a Head from a /predict body, skipping everything else (the candidates' columns
    are scanned, not built)."""

    def __init__(self, key_features: Sequence[str]) -> None:
        self.features = sorted(set(key_features))
        one = _struct("Keys", self._infos(), lambda f: Any, forbid=False)
        column = _struct("KeyColumns", self._infos(), lambda f: list[Any], forbid=False)
        self._type = msgspec.defstruct(
            "Head",
            [
                ("model", str | None, None),
                ("version", str | int | None, None),
                ("context", one | None, None),
                ("candidates", column | None, None),
                ("instances", list[one] | None, None),  # type: ignore[valid-type]
            ],
        )
        self._decoder = msgspec.json.Decoder(self._type)

    def _infos(self) -> list[FeatureInfo]:
        return [FeatureInfo(name=f, kind="categorical", dtype="string") for f in self.features]

    def decode(self, body: bytes) -> Head:
        try:
            head: Any = self._decoder.decode(body)
        except msgspec.ValidationError as err:
            raise _msgspec_error(err) from None
        except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as err:
            raise PayloadError(None, f"malformed JSON: {err}", 400, "malformed_json") from None
        keys: dict[str, str] = {}
        for i, name in enumerate(self.features):
            attr = f"f{i}"
            value = getattr(head.context, attr, msgspec.UNSET) if head.context else msgspec.UNSET
            if value is msgspec.UNSET and head.candidates is not None:
                column = getattr(head.candidates, attr)
                value = column[0] if column is not msgspec.UNSET and column else msgspec.UNSET
            if value is msgspec.UNSET and head.instances:
                value = getattr(head.instances[0], attr)
            if value is not msgspec.UNSET and value is not None:
                keys[name] = str(value)
        version = None if head.version is None else str(head.version)
        return Head(head.model, version, keys)


# ------------------------------------------------------------------------ values -> arrays


def column_array(f: FeatureInfo, values: list[Any], field: str) -> np.ndarray:
    """One feature's values for N rows -> the graph input, by the contract's rules; an error
    names `field[row]`."""
    try:
        return column_input(f, values)
    except InvalidValue as err:
        raise PayloadError(f"{field}[{err.row}]", err.reason) from None


def _rows_array(f: FeatureInfo, values: list[Any]) -> np.ndarray:
    """column_array for the row form: an error names `instances[row].feature`."""
    try:
        return column_input(f, values)
    except InvalidValue as err:
        raise PayloadError(f"instances[{err.row}].{f.name}", err.reason) from None


def broadcast_array(f: FeatureInfo, value: Any, n: int, field: str) -> np.ndarray:
    """One value (a context feature) for all N rows."""
    try:
        return broadcast_input(f, value, n)
    except InvalidValue as err:
        raise PayloadError(field, err.reason) from None


def default_array(f: FeatureInfo, n: int, field: str) -> np.ndarray:
    """Input for a feature the request left out: its default, or an error if it has none."""
    if f.default is None:
        raise PayloadError(
            field, "required feature missing: give it in candidates or context (it has no default)"
        )
    return broadcast_array(f, None, n, field)
