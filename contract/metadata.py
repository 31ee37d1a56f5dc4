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


# The columns of the feature-values monitoring output, in order.
OUTCOMES = ("known", "oov", "default")


class FeatureRates(BaseModel):
    """One feature's values by outcome, as shares of all its values (they add up to 1).

    A value is one id of a categorical feature, each id of a tags row (plus one `default` for a
    row without ids) and one number of a numeric feature. `default`: missing, empty or equal to
    the feature's default; `oov`: not in the vocabulary, None where the feature has none (hash
    buckets, numeric). export/graph.py counts live values by this rule, model/evaluation.py the
    validation rows."""

    model_config = ConfigDict(extra="forbid")

    known: float
    oov: float | None = None
    default: float


class MonitorReference(BaseModel):
    """What the monitoring outputs measured on the validation rows at training time."""

    model_config = ConfigDict(extra="forbid")

    rows: int  # validation rows these come from
    features: dict[str, FeatureRates] = Field(default_factory=dict)
    # Mean score per task: one per score column ([N] outputs: one; multiclass: one per class).
    scores: dict[str, list[float]] = Field(default_factory=dict)
    # Mean gate weight per task, over MonitorInfo.experts.
    gates: dict[str, list[float]] = Field(default_factory=dict)


class MonitorInfo(BaseModel):
    """The graph's monitoring outputs (never scores: a server need not ask for them) and the
    training-time reference to compare them with. Files exported before these existed have
    none, and are served without monitoring."""

    model_config = ConfigDict(extra="forbid")

    # int64 [len(features), 3]: each feature's values in one run, by OUTCOMES. A context input
    # given once for the request counts once (the server weights it by the rows).
    feature_values: str | None = None
    features: list[str] = Field(default_factory=list)
    # Features with a vocabulary: the others never count `oov`.
    vocabulary: list[str] = Field(default_factory=list)
    # float32 [tasks, len(experts)]: each task's gate weights summed over the rows of one run
    # (tasks in metadata order); each row adds 1 over a task's experts.
    gate_weights: str | None = None
    experts: list[str] = Field(default_factory=list)
    reference: MonitorReference | None = None

    @property
    def outputs(self) -> list[str]:
        return [o for o in (self.feature_values, self.gate_weights) if o is not None]


def score_labels(task: TaskInfo) -> list[str]:
    """How each score column of a task is named when watched: the task, or `<task>/<class>`
    for each class of a multiclass task."""
    if task.kind == "multiclass" and task.num_class:
        return [f"{task.name}/{k}" for k in range(task.num_class)]
    return [task.name]


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
    monitor: MonitorInfo | None = None

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
