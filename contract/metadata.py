"""The contract inside model.onnx: what a server needs to know beyond the graph's inputs/outputs.

Stored as JSON in the ONNX `metadata_props` under METADATA_KEY. `export/` writes it; `service/`
reads it (this module imports neither torch nor onnx, so the serving install can use it).
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

METADATA_KEY = "mmoe"
FORMAT_VERSION = 1


class FeatureInfo(BaseModel):
    """One raw input of the graph."""

    model_config = ConfigDict(extra="forbid")

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


class TaskInfo(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    kind: Literal["binary", "regression", "multiclass"]
    output: str  # probs_<task> or y_<task>
    logits: str | None = None
    num_class: int | None = None


class ModelMetadata(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format_version: int = FORMAT_VERSION
    name: str
    version: str
    config_hash: str = ""
    exported_at: str = ""
    features: list[FeatureInfo]
    tasks: list[TaskInfo]
    metrics: dict[str, float] = Field(default_factory=dict)
    producer: dict[str, str] = Field(default_factory=dict)

    def to_props(self) -> dict[str, str]:
        return {METADATA_KEY: self.model_dump_json()}


class MetadataError(ValueError):
    """model.onnx lacks the metadata this project writes, or it is malformed."""


def read_metadata(props: dict[str, str]) -> ModelMetadata:
    raw = props.get(METADATA_KEY)
    if raw is None:
        raise MetadataError(
            f"the ONNX file has no '{METADATA_KEY}' metadata; export it with `mmoe export`"
        )
    try:
        data: Any = json.loads(raw)
        meta = ModelMetadata.model_validate(data)
    except (json.JSONDecodeError, ValidationError) as err:
        raise MetadataError(f"malformed '{METADATA_KEY}' metadata: {err}") from None
    if meta.format_version > FORMAT_VERSION:
        raise MetadataError(
            f"metadata format {meta.format_version} is newer than this server understands "
            f"({FORMAT_VERSION}); upgrade the server"
        )
    return meta
