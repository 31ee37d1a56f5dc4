"""The training config: a typed contract for the YAML file (features, tasks, model, train).

Every section forbids unknown keys, so a typo fails when the file is read, and every error names
its key path (``tasks[1].kind``) so the user knows what to change.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A config file that cannot be used; the message names the key path and the reason."""


# Hidden-layer widths of an MLP.
Units = list[Annotated[int, Field(ge=1)]]
Name = Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")]


class _Strict(BaseModel):
    # Each field's description is the string under it: model/config_reference.py reads them
    # into docs/training.md. (pydantic's use_attribute_docstrings would read the source of
    # every class at import, 40-60 ms of every `mmoe train` and `mmoe export`.)
    model_config = ConfigDict(extra="forbid", frozen=True)


class VocabConfig(_Strict):
    """Vocabulary fitted from the training data; values outside it share one OOV bucket."""

    min_count: int = Field(1, ge=1)
    """Ids seen fewer times than this in the training rows are out of vocabulary."""
    max_size: int | None = Field(None, ge=1)
    """At most this many ids, the most frequent (default: no limit)."""


# Most integer ids `num_buckets` may declare: each is one vocabulary entry in the exported graph.
MAX_NUM_BUCKETS = 10_000_000


class _IdFeature(_Strict):
    """Shared options of features that are looked up in an embedding table.

    How ids map to rows, one of: `vocab` (fitted on the training data, the default),
    `hash_buckets`, `vocab_list` (a fixed vocabulary) or `num_buckets` (integer ids 0..N-1).
    """

    name: Name
    """The feature's name, an identifier: the served input's name."""
    column: str | None = None
    """The data column it reads (default: `name`); two features may read one column."""
    vocab: VocabConfig | None = None
    """A vocabulary fitted on the training rows (the default when no other mapping is set);
    unknown ids share the out-of-vocabulary row."""
    hash_buckets: int | None = Field(None, ge=1)
    """Instead of a vocabulary: row 1 + murmur3(id) % hash_buckets."""
    vocab_list: list[Annotated[str, Field(min_length=1)]] | None = Field(None, min_length=1)
    """A fixed vocabulary, in this order; any other value is out of vocabulary."""
    num_buckets: int | None = Field(None, ge=1, le=MAX_NUM_BUCKETS)
    """Integer ids 0..num_buckets-1 (as EasyRec's and DeepCTR's label-encoded ids): the fixed
    vocabulary "0", "1", ...; other values (out of range, not integers) are out of vocabulary."""
    embedding_dim: int = Field(16, ge=1)
    """Width of the feature's embedding."""
    embedding_name: Name | None = None
    """Features with the same embedding_name share one table (and one vocabulary)."""
    group: str = "all"
    """Its feature group (EasyRec's feature_groups); `model.groups` picks the groups the
    network reads."""
    context: bool = False
    """Request context: the same value for every candidate of a ranking request (the user, the
    placement). Training is unchanged; the exported graph takes it once per request and
    computes its share of the network once (docs/context.md)."""

    @field_validator("vocab_list")
    @classmethod
    def _unique(cls, v: list[str] | None) -> list[str] | None:
        if v is not None:
            seen: set[str] = set()
            for value in v:
                if value in seen:
                    raise ValueError(f"{value!r} is listed twice")
                seen.add(value)
        return v

    @model_validator(mode="after")
    def _one_id_mapping(self) -> _IdFeature:
        given = [
            key
            for key in ("vocab", "hash_buckets", "vocab_list", "num_buckets")
            if getattr(self, key) is not None
        ]
        if len(given) > 1:
            raise ValueError(
                f"set one of `vocab`, `hash_buckets`, `vocab_list`, `num_buckets`, "
                f"not {' and '.join(f'`{k}`' for k in given)}"
            )
        return self

    @property
    def uses_hashing(self) -> bool:
        return self.hash_buckets is not None

    @property
    def fixed_vocab(self) -> list[str] | None:
        """The vocabulary given by the config (`vocab_list`, or `num_buckets` as "0".."N-1"),
        or None when it is fitted on the data or ids are hashed."""
        if self.vocab_list is not None:
            return list(self.vocab_list)
        if self.num_buckets is not None:
            return [str(i) for i in range(self.num_buckets)]
        return None

    @property
    def vocab_config(self) -> VocabConfig:
        return self.vocab or VocabConfig()


class CategoricalFeature(_IdFeature):
    """An id: one value per row (a string, or an integer read as its decimal string)."""

    kind: Literal["categorical"]
    """`categorical`."""
    default: str | None = None
    """Value used when a row or a request has none; without one the feature is required."""


class TagsFeature(_IdFeature):
    """Several ids per row: a list, or one string split on `separator`; their embeddings are
    pooled."""

    kind: Literal["tags"]
    """`tags`."""
    separator: str = Field("|", min_length=1)
    """Splits ids given as one string."""
    pooling: Literal["mean", "sum"] = "mean"
    """How the ids' embeddings are pooled (padding ignored)."""
    max_len: int = Field(20, ge=1)
    """The first max_len ids of a row are kept."""
    default: list[str] | None = None
    """Value used when a row or a request has none (e.g. []); without one it is required."""


class NumericFeature(_Strict):
    """A number (ints or floats), fed to the network as it is or transformed, or bucketised and
    embedded."""

    kind: Literal["numeric"]
    """`numeric`."""
    name: Name
    """The feature's name, an identifier: the served input's name."""
    column: str | None = None
    """The data column it reads (default: `name`)."""
    default: float | None = None
    """Used for missing values (null/NaN); without one a missing value is an error, in training
    and serving."""
    transform: Literal["none", "log1p", "standard"] = "none"
    """`log1p`: log(1 + max(x, 0)); `standard`: (x - mean) / std, both fitted on the training
    rows."""
    boundaries: list[float] | None = None
    """E.g. [10, 50, 200]: the value is bucketised (searchsorted, right) and embedded."""
    embedding_dim: int = Field(8, ge=1)
    """Width of the buckets' embedding (with `boundaries`)."""
    group: str = "all"
    """Its feature group, as for categorical features."""
    context: bool = False
    """Request context, as for categorical features."""

    @field_validator("boundaries")
    @classmethod
    def _sorted(cls, v: list[float] | None) -> list[float] | None:
        if v is not None and (len(v) == 0 or any(b >= a for a, b in zip(v[1:], v, strict=False))):
            raise ValueError("boundaries must be a non-empty, strictly increasing list")
        return v

    @model_validator(mode="after")
    def _transform_or_boundaries(self) -> NumericFeature:
        if self.boundaries is not None and self.transform != "none":
            raise ValueError("`boundaries` bucketise the raw value; leave `transform` as none")
        return self


FeatureConfig = Annotated[
    CategoricalFeature | NumericFeature | TagsFeature, Field(discriminator="kind")
]


class LossTerm(_Strict):
    """One term of a task's loss: `pointwise`, the loss of the task's kind (log loss, MSE,
    cross-entropy); `pairwise`, softplus(margin - (z_i - z_j)) averaged over the pairs of a
    batch's rows in the task whose labels differ, i the higher (EasyRec's PAIR_WISE_LOSS)."""

    kind: Literal["pointwise", "pairwise"]
    """`pointwise` or `pairwise`."""
    weight: float = Field(1.0, ge=0)
    """The term's weight in the task's loss."""
    margin: float = 0.0
    """pairwise only: the margin the higher-labelled row's logit should lead by."""

    @model_validator(mode="after")
    def _margin(self) -> LossTerm:
        if self.kind != "pairwise" and self.margin:
            raise ValueError("`margin` is only for pairwise terms")
        return self


class TaskConfig(_Strict):
    """One task: a label column, a tower on the mixed experts, a loss and its metrics."""

    name: Name
    """The task's name, an identifier: its outputs are probs_<name> and logits_<name> (binary,
    multiclass) or y_<name> (regression); its metrics <metric>_<name>."""
    label: str = Field(min_length=1)
    """The label column; an empty or NaN label leaves the row out of this task."""
    kind: Literal["binary", "regression", "multiclass"] = "binary"
    """binary (labels 0/1), regression, or multiclass (class ids 0..num_class-1)."""
    num_class: int | None = Field(None, ge=2)
    """Classes of a multiclass task (multiclass only)."""
    weight: float = Field(1.0, ge=0)
    """This task's weight in the total loss."""
    tower: Units = Field(default_factory=lambda: [64])
    """The task tower's hidden units."""
    metrics: list[Literal["auc", "logloss", "mse", "mae", "accuracy"]] = Field(default_factory=list)
    """Validation metrics; none listed: auc and logloss (binary), mse (regression), accuracy
    (multiclass)."""
    sample_weight: str | None = None
    """Column with a per-row loss weight for this task."""
    only_where: dict[str, float] = Field(default_factory=dict)
    """A task space: only rows where every listed column equals its value count, e.g.
    {clk: 1} for a conversion task trained on clicked rows (loss and metrics)."""
    # ESMM on the entire space (Ma et al., SIGIR 2018): `multiply: ctr` makes this tower's
    # output pCVR and trains pCTCVR = pCTR x pCVR against this task's label over all rows;
    # the product is also served, as `probs_<product>` (default `ctcvr` for cvr x ctr, else
    # `<multiply>_<name>`).
    multiply: Name | None = None
    """ESMM: the binary task this one's probability is multiplied by (e.g. ctr): this tower
    gives pCVR, and the loss is on the product pCTR x pCVR over every row."""
    product: Name | None = None
    """The name of the served product, `probs_<product>`; unset, `ctcvr` for cvr x ctr, else
    `<multiply>_<name>` (see ESMM below)."""
    losses: list[LossTerm] = Field(default_factory=list)
    """The loss as a weighted sum of terms (EasyRec's `losses`), e.g. [{kind: pointwise},
    {kind: pairwise, weight: 0.5}]; default: the pointwise loss alone."""

    @model_validator(mode="after")
    def _check(self) -> TaskConfig:
        if self.kind == "multiclass" and self.num_class is None:
            raise ValueError("multiclass tasks need `num_class`")
        if self.kind != "multiclass" and self.num_class is not None:
            raise ValueError("`num_class` is only for multiclass tasks")
        bad = {
            "binary": {"mse", "mae"},
            "regression": {"auc", "logloss", "accuracy"},
            "multiclass": {"auc", "mse", "mae"},
        }[self.kind] & set(self.metrics)
        if bad:
            raise ValueError(f"metrics {sorted(bad)} do not apply to a {self.kind} task")
        if self.product is not None and self.multiply is None:
            raise ValueError("`product` names the output of `multiply`; set `multiply` too")
        if any(term.kind == "pairwise" for term in self.losses):
            if self.kind == "multiclass":
                raise ValueError("pairwise loss terms rank binary or regression labels")
            if self.multiply is not None:
                raise ValueError("pairwise loss terms are not for a product task (`multiply`)")
        if self.multiply is not None:
            if self.kind != "binary":
                raise ValueError("`multiply` is for binary tasks (a probability times another)")
            if self.only_where:
                raise ValueError(
                    "`multiply` trains on every row (the entire space); drop `only_where`"
                )
        return self

    @property
    def product_name(self) -> str | None:
        """The served product's name, or None: `product`, else `ctcvr` for `cvr` x `ctr` (the
        name EasyRec and DeepCTR give it), else `<multiply>_<name>`."""
        if self.multiply is None:
            return None
        if self.product:
            return self.product
        if (self.multiply, self.name) == ("ctr", "cvr"):
            return "ctcvr"
        return f"{self.multiply}_{self.name}"

    @property
    def default_metrics(self) -> list[str]:
        if self.metrics:
            return list(self.metrics)
        return {"binary": ["auc", "logloss"], "regression": ["mse"], "multiclass": ["accuracy"]}[
            self.kind
        ]


class SENetConfig(_Strict):
    """SENet (FiBiNET): each field's vector reweighted by a squeeze-and-excitation of all
    fields, in front of the experts."""

    reduction_ratio: int = Field(4, ge=1)
    """The excitation's hidden width is the number of fields divided by this."""


class ModelConfig(_Strict):
    """The network."""

    kind: Literal["mmoe", "ple"] = "mmoe"
    """mmoe: one gate per task over shared experts; ple: CGC/PLE layers with task-specific and
    shared experts."""
    experts: int = Field(4, ge=1)
    """mmoe: the experts (1 = Shared-Bottom); ple: the shared experts per layer."""
    expert_units: Units = Field(default_factory=lambda: [128, 64], min_length=1)
    """Hidden units of every expert."""
    gate_units: Units = Field(default_factory=list)
    """An MLP before each softmax gate (DeepCTR's gate_dnn_hidden_units)."""
    gate: Literal["per_task", "shared"] = "per_task"
    """per_task: MMoE. shared: one gate for all tasks (OMoE). With experts: 1 either is the
    Shared-Bottom baseline (mmoe only)."""
    activation: Literal["relu", "gelu", "silu", "tanh", "sigmoid", "leaky_relu"] = "relu"
    """In experts, gates' MLPs and towers."""
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """In experts and towers."""
    batch_norm: bool = False
    """In experts and towers."""
    l2: float = Field(0.0, ge=0.0)
    """L2 on the dense weight matrices (not biases or embeddings)."""
    embedding_l2: float = Field(0.0, ge=0.0)
    """L2 on the embeddings looked up in each batch."""
    senet: SENetConfig | None = None
    """E.g. {reduction_ratio: 4}: SENet field reweighting before the experts."""
    task_experts: int = Field(1, ge=1)
    """ple only: task-specific experts per task and layer."""
    ple_layers: int = Field(1, ge=1)
    """ple only: extraction layers (1 = CGC)."""
    ple_expert_units: list[Annotated[Units, Field(min_length=1)]] | None = None
    """ple only: each extraction layer's expert units, one list per layer (default:
    expert_units in every layer)."""
    groups: list[str] | None = None
    """Feature groups (each feature's `group`) that feed the network; default: all of them."""


# Metrics where larger is better; every other metric (and `loss`) is minimised.
HIGHER_IS_BETTER = ("auc", "accuracy")


def higher_is_better(metric: str) -> bool:
    """`auc_ctr` -> True, `logloss_ctr` / `mse_y1` / `loss` -> False."""
    return metric.split("_", 1)[0] in HIGHER_IS_BETTER


class EarlyStoppingConfig(_Strict):
    """Stop when a metric has not improved for `patience` epochs; the best epoch's weights are
    kept either way."""

    metric: str
    """A validation metric (`auc_ctr`, `logloss_cvr`) or `loss` (the weighted sum of task
    losses on validation rows; the training loss when there is no validation data)."""
    patience: int = Field(2, ge=1)
    """Epochs without improvement before stopping."""
    mode: Literal["max", "min"] | None = None
    """Default: max for auc/accuracy, min for everything else."""

    @property
    def maximise(self) -> bool:
        return self.mode == "max" if self.mode else higher_is_better(self.metric)


class LossWeightingConfig(_Strict):
    """How the task losses are combined. `fixed`: sum of tasks[i].weight * loss_i.
    `uncertainty` (Kendall et al., 2018): a learned log-variance s_i per task, loss
    exp(-s_i) * L_i + s_i / 2 for classification and exp(-s_i) / 2 * L_i + s_i / 2 for
    regression. `gradnorm` (Chen et al., 2018): learned weights whose gradient norms on the last
    shared layer are pulled towards the mean norm times (relative inverse training rate)^alpha.
    In both, tasks[i].weight stays a constant factor on its task's term."""

    kind: Literal["fixed", "uncertainty", "gradnorm"] = "fixed"
    """The method; `loss_weighting: uncertainty` is short for {kind: uncertainty}."""
    alpha: float | None = Field(None, ge=0.0)
    """gradnorm only: the restoring force's strength (the paper's alpha; default 1.5)."""
    lr: float | None = Field(None, gt=0.0)
    """uncertainty and gradnorm: the Adam learning rate of the learned weights (both learn in
    log space, so 0.025, the default, moves a weight by about 2.5% a step)."""

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        return {"kind": data} if isinstance(data, str) else data


class DataConfig(_Strict):
    """How CSV files are read (Parquet files carry their own column names)."""

    separator: str | None = Field(None, min_length=1, max_length=1)
    """One character; default "," (tab for .tsv files). EasyRec's CSVInput separator."""
    columns: list[Annotated[str, Field(min_length=1)]] | None = Field(None, min_length=1)
    """The files have no header line: these name their columns, in file order (EasyRec's
    data_config.input_fields). Unset: the first line is the header."""

    @field_validator("columns")
    @classmethod
    def _unique(cls, v: list[str] | None) -> list[str] | None:
        if v is not None:
            for i, c in enumerate(v):
                if c in v[:i]:
                    raise ValueError(f"column {c!r} is named twice")
        return v


class TrainConfig(_Strict):
    """The training loop."""

    batch_size: int = Field(1024, ge=1)
    """Rows per optimiser step, the global batch: with N processes (torchrun) each takes its
    share of them."""
    epochs: int = Field(3, ge=1)
    """Passes over the training rows."""
    num_steps: int | None = Field(None, ge=1)
    """Stop after this many optimiser steps, or after `epochs`, whichever comes first (EasyRec's
    train_config.num_steps); the epoch it stops in is validated like any other, and the
    schedule spans these steps."""
    lr: float = Field(1e-3, gt=0)
    """The learning rate (before the schedule)."""
    optimizer: Literal["adam", "adamw", "adagrad"] = "adam"
    """The optimiser."""
    weight_decay: float = Field(0.0, ge=0.0)
    """The optimiser's weight decay."""
    lr_schedule: Literal["constant", "cosine", "step", "exponential"] = "constant"
    """constant; cosine (to 0 over the run); step (x step_gamma per epoch); exponential (the
    decay_* keys below)."""
    warmup_steps: int = Field(0, ge=0)
    """A linear warm-up over this many steps before the schedule."""
    step_gamma: float = Field(0.5, gt=0, le=1)
    """The lr multiplier per epoch of `step`."""
    decay_steps: int = Field(1000, ge=1)
    """`exponential` (EasyRec's exponential_decay_learning_rate) only: lr * decay_factor **
    (s / decay_steps) after s steps past the warm-up."""
    decay_factor: float = Field(0.5, gt=0, le=1)
    """`exponential` only: the factor per decay_steps."""
    staircase: bool = True
    """`exponential` only: s / decay_steps rounded down (the rate falls in steps)."""
    min_lr: float = Field(0.0, ge=0.0)
    """`exponential` only: the rate never goes below this."""
    seed: int = 1024
    """The same seed and data give the same weights."""
    read_rows: int = Field(262144, ge=1)
    """Rows read from the file at a time: memory stays bounded whatever the file size."""
    shuffle: bool = True
    """Shuffle rows within each chunk of read_rows (false: batches follow the file order)."""
    valid_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    """Fraction of the training file held out for validation when no --valid file is given
    (picked by a hash of the row number and the seed; held in memory)."""
    early_stopping: EarlyStoppingConfig | None = None
    """E.g. {metric: auc_ctr, patience: 2}; unset: every epoch runs."""
    loss_weighting: LossWeightingConfig = Field(default_factory=LossWeightingConfig)
    """How the task losses are balanced: fixed, uncertainty or gradnorm."""
    cache_mb: float = Field(2048, ge=0)
    """Encoded training rows are kept in memory after the first epoch while they take at most
    this many MiB (later epochs then skip reading and encoding); past it every epoch streams
    from the file. 0: always stream."""
    progress: bool = True
    """A progress bar on stderr with the running loss per task, when stderr is a terminal
    (else the line per epoch on stdout only)."""
    threads: int | None = Field(None, ge=1)
    """torch intra-op threads while training (default: torch's choice, one per core). Small
    models train fastest with 1, and far faster when other processes share the cores."""


class RunConfig(_Strict):
    """The whole YAML file."""

    name: str = "mmoe"
    """The model's name: in the ONNX metadata and /predict replies."""
    version: str = "1"
    """The model's version, beside its name."""
    features: list[FeatureConfig] = Field(min_length=1)
    """The network's inputs, in this order; each is categorical, numeric or tags (`kind`)."""
    tasks: list[TaskConfig] = Field(min_length=1)
    """The tasks, each with its tower and outputs."""
    model: ModelConfig = Field(default_factory=ModelConfig)
    """The network."""
    train: TrainConfig = Field(default_factory=TrainConfig)
    """The training loop."""
    data: DataConfig = Field(default_factory=DataConfig)
    """How CSV files are read."""

    @model_validator(mode="after")
    def _cross_checks(self) -> RunConfig:
        # Errors here name their own key path (pydantic reports them at the root).
        for what, names in (
            ("features", [f.name for f in self.features]),
            ("tasks", [t.name for t in self.tasks]),
        ):
            for i, n in enumerate(names):
                if n in names[:i]:
                    raise ValueError(f"{what}[{i}].name: duplicate name {n!r}")
        self._check_shared_tables()
        m = self.model
        inputs = self.input_features
        if inputs and all(f.context for f in inputs):
            raise ValueError(
                "features: every feature the network reads is `context: true`; a ranking "
                "request scores candidates, so at least one feature must be per candidate"
            )
        if m.groups is not None:
            known = {f.group for f in self.features}
            unknown = sorted(set(m.groups) - known)
            if unknown:
                raise ValueError(
                    f"model.groups: unknown groups {unknown}; the features' groups are "
                    f"{sorted(known)}"
                )
        # Options of the other kind are refused rather than ignored (the saved config spells out
        # every default, so compare with the defaults).
        if m.kind == "ple" and m.gate != "per_task":
            raise ValueError("model.gate: only for kind: mmoe (PLE has its own gates)")
        if m.kind == "mmoe":
            for key in ("task_experts", "ple_layers"):
                if getattr(m, key) != 1:
                    raise ValueError(f"model.{key}: only for kind: ple")
            if m.ple_expert_units is not None:
                raise ValueError("model.ple_expert_units: only for kind: ple")
        if m.ple_expert_units is not None and len(m.ple_expert_units) != m.ple_layers:
            raise ValueError(
                f"model.ple_expert_units: {len(m.ple_expert_units)} layers' units for "
                f"ple_layers {m.ple_layers}"
            )
        if m.batch_norm and self.train.batch_size < 2:
            raise ValueError(
                "model.batch_norm: batch norm trains on batches of 2 rows or more; "
                "train.batch_size is 1"
            )
        self._check_products()
        lw = self.train.loss_weighting
        if lw.kind != "gradnorm" and lw.alpha is not None:
            raise ValueError("train.loss_weighting.alpha: only for kind: gradnorm")
        if lw.kind == "fixed" and lw.lr is not None:
            raise ValueError("train.loss_weighting.lr: only for learned weights")
        if lw.kind != "fixed" and len(self.tasks) < 2:
            raise ValueError(
                f"train.loss_weighting.kind: {lw.kind} balances two or more tasks; "
                "this config has one"
            )
        t = self.train
        if t.lr_schedule != "exponential":
            for key in ("decay_steps", "decay_factor", "staircase", "min_lr"):
                if getattr(t, key) != TrainConfig.model_fields[key].default:
                    raise ValueError(f"train.{key}: only for lr_schedule: exponential")
        es = self.train.early_stopping
        if es is not None and es.metric not in self.metric_names:
            raise ValueError(
                f"train.early_stopping.metric: {es.metric!r} is not computed; "
                f"choose one of {self.metric_names}"
            )
        return self

    def _check_products(self) -> None:
        by_name = {t.name: t for t in self.tasks}
        products = [t.product_name for t in self.tasks]
        for i, t in enumerate(self.tasks):
            if t.multiply is None:
                continue
            other = by_name.get(t.multiply)
            if other is None or other is t:
                raise ValueError(
                    f"tasks[{i}].multiply: {t.multiply!r} is not another task; "
                    f"choose one of {sorted(set(by_name) - {t.name})}"
                )
            if other.kind != "binary" or other.multiply is not None:
                raise ValueError(
                    f"tasks[{i}].multiply: {t.multiply!r} must be a binary task that is not "
                    "itself a product"
                )
            if t.product_name in by_name or products.count(t.product_name) > 1:
                raise ValueError(
                    f"tasks[{i}].product: {t.product_name!r} is already the name of a task "
                    "or product; set another `product`"
                )

    def _check_shared_tables(self) -> None:
        """Features that share an embedding table (`embedding_name`) must agree on its shape and
        on how ids map to rows (one vocabulary, or the same hash buckets)."""
        owners: dict[str, tuple[int, tuple[object, ...]]] = {}
        for i, f in enumerate(self.features):
            key: tuple[object, ...]
            if isinstance(f, NumericFeature):
                if f.boundaries is None:
                    continue
                table, key = f.name, ("boundaries", f.embedding_dim, tuple(f.boundaries))
            else:
                table = f.embedding_name or f.name
                vocab: object = None
                if f.vocab_list is not None:
                    vocab = ("vocab_list", tuple(f.vocab_list))
                elif f.num_buckets is not None:
                    vocab = ("num_buckets", f.num_buckets)
                elif not f.uses_hashing:
                    vocab = f.vocab_config.model_dump_json()
                key = ("ids", f.embedding_dim, f.hash_buckets, vocab)
            if table not in owners:
                owners[table] = (i, key)
                continue
            first, first_key = owners[table]
            # Blame the feature that named the table, not the one that owns it by its name.
            culprit, other = (first, i) if key[0] == "boundaries" else (i, first)
            if first_key[0] == "boundaries" or key[0] == "boundaries":
                raise ValueError(
                    f"features[{culprit}].embedding_name: table {table!r} belongs to the "
                    f"bucketised numeric feature features[{other}]; choose another name"
                )
            if key != first_key:
                raise ValueError(
                    f"features[{i}].embedding_name: features sharing table {table!r} must have "
                    f"the same embedding_dim, hash_buckets, vocab, vocab_list and num_buckets as "
                    f"features[{first}]"
                )

    @property
    def metric_names(self) -> list[str]:
        """What validation computes: `<metric>_<task>` for each task's metrics (and, for a
        product task, `<metric>_<product>`), and `loss`."""
        names = []
        for t in self.tasks:
            names += [f"{m}_{t.name}" for m in t.default_metrics]
            if t.product_name:
                names += [f"{m}_{t.product_name}" for m in t.default_metrics]
        return [*names, "loss"]

    @property
    def input_features(self) -> list[CategoricalFeature | NumericFeature | TagsFeature]:
        """Features that feed the network (all, or those in `model.groups`)."""
        if self.model.groups is None:
            return list(self.features)
        return [f for f in self.features if f.group in self.model.groups]


_UNION_TAGS = {"categorical", "numeric", "tags"}


def _key_path(loc: tuple[int | str, ...]) -> str:
    out = ""
    for i, part in enumerate(loc):
        if isinstance(part, int):
            out += f"[{part}]"
        elif i > 0 and isinstance(loc[i - 1], int) and part in _UNION_TAGS:
            continue  # the discriminator pydantic inserts for tagged unions
        else:
            out += f".{part}" if out else str(part)
    return out or "<root>"


def format_validation_error(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        msg = e["msg"].removeprefix("Value error, ")
        loc = tuple(e["loc"])
        # Whole-file checks carry their key path in the message.
        lines.append(f"{_key_path(loc)}: {msg}" if loc else msg)
    return "; ".join(lines)


def parse_config(data: dict[str, Any]) -> RunConfig:
    try:
        return RunConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err)) from None


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A YAML config file as a mapping, not yet validated; raises ConfigError."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping with features, tasks, model, train")
    return data


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> RunConfig:
    """Read and validate a YAML config, with `key.path=value` overrides applied first (see
    `model/overrides.py`); raises ConfigError naming the key path on any problem."""
    from mmoe.model.overrides import apply_overrides

    data = apply_overrides(read_config_file(path), overrides)
    try:
        return parse_config(data)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
