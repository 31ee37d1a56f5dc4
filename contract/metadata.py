"""The contract inside model.onnx: what a server needs to know beyond the graph's inputs/outputs.

Stored as JSON in the ONNX `metadata_props` under METADATA_KEY. `export/` writes it; `service/`
reads it (this module imports neither torch nor onnx, so the serving install can use it).

Versioning: `format_version` is "MAJOR.MINOR" (files before 1.1 wrote the integer 1, read as
1.0). It is checked before anything else in the file.

- MINOR grows when fields are added, each optional (older files keep loading) and safe for an
  older reader to ignore: a reader accepts a file of a newer minor and ignores the fields it
  does not know. In a file of its own minor or an older one an unknown field is an error (a
  typo or a hand edit, not a newer exporter).
- MAJOR grows when a reader that ignores the new fields would serve wrong answers (a changed
  meaning, a required field). A reader refuses a newer major: "upgrade the server".

History: 1.0 features, tasks, metrics, producer. 1.1 adds `golden` (rows and the outputs
PyTorch gave for them, checked when a server loads the file).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

METADATA_KEY = "mmoe"
FORMAT_VERSION = (1, 1)  # (major, minor) this code writes and reads


def format_text(version: tuple[int, int]) -> str:
    return f"{version[0]}.{version[1]}"


class _Contract(BaseModel):
    # Unknown fields are kept here, then refused or ignored by read_metadata according to the
    # file's format version.
    model_config = ConfigDict(extra="allow")


class FeatureInfo(_Contract):
    """One raw input of the graph."""

    name: str
    kind: Literal["categorical", "numeric", "tags"]
    dtype: Literal["string", "float32"]
    # Value used when a request omits the feature; null means the feature is required.
    default: float | str | list[str] | None = None
    separator: str | None = None  # tags given as one string are split on this
    max_len: int | None = None  # tags: width of the [batch, max_len] input, padded with ""
    # Informational: how the graph encodes it.
    encoding: str = ""
    # Request context: the graph takes this input once per request, batch 1 (or N, one value
    # per row, like any other input) while the other inputs have N rows. Files exported before
    # the flag existed have none.
    context: bool = False

    @property
    def required(self) -> bool:
        return self.default is None


class TaskInfo(_Contract):
    name: str
    kind: Literal["binary", "regression", "multiclass"]
    output: str  # probs_<task> or y_<task>
    logits: str | None = None
    num_class: int | None = None


@dataclass(frozen=True)
class GoldenMismatch:
    """One golden value a runtime did not reproduce."""

    output: str
    row: int
    index: tuple[int, ...]  # within the row: () for [N] outputs, (class,) for [N, k]
    got: float
    want: float
    allowed: float

    @property
    def difference(self) -> float:
        return abs(self.got - self.want)

    def __str__(self) -> str:
        at = f"[{', '.join(map(str, self.index))}]" if self.index else ""
        return (
            f"{self.output}{at} of golden row {self.row} is {self.got:.7g} where the exported "
            f"model gave {self.want:.7g} (difference {self.difference:.3g} > allowed "
            f"{self.allowed:.3g})"
        )


class GoldenRows(_Contract):
    """Raw input rows as a caller sends them (the `instances` form of POST /predict) and what
    PyTorch computed for them at export: each output's values and the largest difference a
    correct float32 runtime may show for each (see export/parity.py for the rule)."""

    rows: list[dict[str, Any]]
    outputs: dict[str, list[Any]]  # output name -> [N] or [N, k] values
    allowed: dict[str, list[Any]]  # the same shapes

    def mismatches(self, got: dict[str, np.ndarray]) -> list[GoldenMismatch]:
        """Every value of `got` (the runtime's outputs for `rows`) that differs from the
        exported one by more than allowed; a missing output or a wrong shape raises
        ValueError. NaN never matches."""
        found: list[GoldenMismatch] = []
        for name, want_values in self.outputs.items():
            want = np.asarray(want_values, dtype=np.float64)
            allowed = np.asarray(self.allowed[name], dtype=np.float64)
            if name not in got:
                raise ValueError(f"the graph has no output {name!r} (the golden rows have one)")
            have = np.asarray(got[name], dtype=np.float64)
            if have.shape != want.shape:
                raise ValueError(
                    f"{name}: shape {list(have.shape)} for the golden rows, exported "
                    f"{list(want.shape)}"
                )
            diff = np.abs(have - want)
            bad = ~(diff <= allowed)  # NaN compares False: a mismatch
            for pos in zip(*np.nonzero(bad), strict=True):
                at = tuple(int(p) for p in pos)
                found.append(
                    GoldenMismatch(
                        name, at[0], at[1:], float(have[at]), float(want[at]), float(allowed[at])
                    )
                )
        return found


class ModelMetadata(_Contract):
    format_version: str = format_text(FORMAT_VERSION)
    name: str
    version: str
    config_hash: str = ""
    exported_at: str = ""
    features: list[FeatureInfo]
    tasks: list[TaskInfo]
    metrics: dict[str, float] = Field(default_factory=dict)
    producer: dict[str, str] = Field(default_factory=dict)
    golden: GoldenRows | None = None  # since 1.1

    def to_props(self) -> dict[str, str]:
        return {METADATA_KEY: self.model_dump_json()}


class MetadataError(ValueError):
    """model.onnx lacks the metadata this project writes, or it is malformed."""


class NewerFormatError(MetadataError):
    """The file was written by an exporter of a newer major format than this reader knows."""


def parse_format(value: object) -> tuple[int, int]:
    """`format_version` as (major, minor): "1.1" -> (1, 1); the integer 1 (before 1.1) -> (1, 0).
    ValueError if it is neither."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value, 0
    if isinstance(value, str):
        major, dot, minor = value.partition(".")
        if major.isdigit() and (not dot or minor.isdigit()):
            return int(major), int(minor or 0)
    raise ValueError(f"format_version must be 'MAJOR.MINOR', got {value!r}")


def read_metadata(props: dict[str, str]) -> ModelMetadata:
    """The metadata of a file's `metadata_props`; MetadataError (NewerFormatError for a newer
    major format) if it cannot be served by this code."""
    raw = props.get(METADATA_KEY)
    if raw is None:
        raise MetadataError(
            f"the ONNX file has no '{METADATA_KEY}' metadata; export it with `mmoe export`"
        )
    try:
        data: Any = json.loads(raw)
    except json.JSONDecodeError as err:
        raise MetadataError(f"malformed '{METADATA_KEY}' metadata: {err}") from None
    if not isinstance(data, dict):
        raise MetadataError(f"malformed '{METADATA_KEY}' metadata: not a JSON object")
    try:
        version = parse_format(data.get("format_version", 1))
    except ValueError as err:
        raise MetadataError(f"malformed '{METADATA_KEY}' metadata: {err}") from None
    if version[0] > FORMAT_VERSION[0]:
        raise NewerFormatError(
            f"written by a newer exporter (format {format_text(version)}); this server reads "
            f"{format_text(FORMAT_VERSION)}; upgrade the server"
        )
    try:
        meta = ModelMetadata.model_validate(data | {"format_version": format_text(version)})
    except ValidationError as err:
        raise MetadataError(f"malformed '{METADATA_KEY}' metadata: {err}") from None
    if version <= FORMAT_VERSION:
        unknown = next(_unknown_fields(meta, ""), None)
        if unknown is not None:
            raise MetadataError(
                f"malformed '{METADATA_KEY}' metadata: unknown field {unknown} (format "
                f"{format_text(version)} has no such field)"
            )
    return meta


def _unknown_fields(model: BaseModel, path: str) -> Iterator[str]:
    """Key paths of the fields `model` (and the models in it) kept without knowing them."""
    for key in model.model_extra or {}:
        yield f"{path}{key}"
    for name in type(model).model_fields:
        value = getattr(model, name)
        items = enumerate(value) if isinstance(value, list) else [(None, value)]
        for i, item in items:
            if isinstance(item, BaseModel):
                at = f"{path}{name}" + ("" if i is None else f"[{i}]")
                yield from _unknown_fields(item, at + ".")
