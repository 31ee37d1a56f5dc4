"""DeepCTR's (Keras) `MMOE` API on this project's trainer: a DeepCTR script changes only its
imports.

    from mmoe.model.deepctr import MMOE, SparseFeat, DenseFeat, VarLenSparseFeat, get_feature_names

`MMOE(...)` has the signature and defaults of `deepctr.models.multitask.mmoe.MMOE`, and the
model it returns behaves as a Keras multi-output model: `fit(x, [y_task1, y_task2, ...])` (one
label array per task, or a dict by task name), `predict(x)` returns one `[n, 1]` array per task
(`pred[0]` is the first task's), `history.history` has Keras' keys. `save(run_dir)` writes a
training run that `mmoe export` turns into the one-file ONNX model. DeepCTR-Torch's conventions
(`y` and `predict` as `[n, tasks]` arrays) are `mmoe.model.deepctr_torch`'s.

Underneath, `ArrayModel` turns the feature columns into a `RunConfig`, the arrays into a Parquet
file, and `mmoe.model.train.train` trains it: the network, the feature encoding and the exported
graph are the project's own. docs/deepctr.md has the mapping and what differs.
"""

from __future__ import annotations

import contextlib
import io
import re
import shutil
import tempfile
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mmoe.model.config import RunConfig, parse_config

DEFAULT_GROUP_NAME = "default_group"
_NAME_OK = "[A-Za-z_][A-Za-z0-9_]*"
# DeepCTR activation names -> the project's (Keras' leaky_relu slope is not PyTorch's: left out)
_ACTIVATIONS = {
    "relu": "relu",
    "gelu": "gelu",
    "tanh": "tanh",
    "sigmoid": "sigmoid",
    "swish": "silu",
    "silu": "silu",
}
_TASK_KINDS = {"binary": "binary", "regression": "regression"}
_LOSSES = {
    "binary": ("binary_crossentropy", "binary_cross_entropy", "bce", "logloss", "log_loss"),
    "regression": ("mse", "mean_squared_error"),
}
_METRICS = {
    "binary_crossentropy": "logloss",
    "logloss": "logloss",
    "log_loss": "logloss",
    "auc": "auc",
    "mse": "mse",
    "mean_squared_error": "mse",
    "mae": "mae",
    "mean_absolute_error": "mae",
    "accuracy": "accuracy",
    "acc": "accuracy",
}
_APPLIES = {"binary": ("auc", "logloss", "accuracy"), "regression": ("mse", "mae")}


# ------------------------------------------------------------------------- feature columns


@dataclass(frozen=True)
class SparseFeat:
    """A categorical id feature (DeepCTR's SparseFeat, same fields and defaults).

    Ids are integers 0..vocabulary_size-1 (label-encoded, as DeepCTR expects) or strings:
    integers index the table directly, strings get a vocabulary fitted on the training data
    (`use_hash=True`: hashed into vocabulary_size buckets)."""

    name: str
    vocabulary_size: int
    embedding_dim: int | str = 4
    use_hash: bool = False
    vocabulary_path: str | None = None
    dtype: str = "int32"
    embeddings_initializer: Any = None
    embedding_name: str | None = None
    group_name: str = DEFAULT_GROUP_NAME
    trainable: bool = True

    def __post_init__(self) -> None:
        if self.embedding_dim == "auto":  # DeepCTR's rule
            object.__setattr__(self, "embedding_dim", 6 * int(self.vocabulary_size**0.25))
        if self.embedding_name is None:
            object.__setattr__(self, "embedding_name", self.name)


@dataclass(frozen=True)
class DenseFeat:
    """A numeric feature (DeepCTR's DenseFeat); one value per row here (dimension 1)."""

    name: str
    dimension: int = 1
    dtype: str = "float32"
    transform_fn: Any = None


@dataclass(frozen=True)
class VarLenSparseFeat:
    """A list of ids per row (DeepCTR's VarLenSparseFeat): a padded [n, maxlen] array (0, or ""
    for string ids, is padding) or a list of lists; pooled by `combiner` (mean or sum)."""

    sparsefeat: SparseFeat
    maxlen: int
    combiner: str = "mean"
    length_name: str | None = None
    weight_name: str | None = None
    weight_norm: bool = True

    @property
    def name(self) -> str:
        return self.sparsefeat.name

    @property
    def vocabulary_size(self) -> int:
        return self.sparsefeat.vocabulary_size

    @property
    def embedding_dim(self) -> int:
        return int(self.sparsefeat.embedding_dim)

    @property
    def embedding_name(self) -> str | None:
        return self.sparsefeat.embedding_name

    @property
    def group_name(self) -> str:
        return self.sparsefeat.group_name


FeatureColumn = SparseFeat | DenseFeat | VarLenSparseFeat


def get_feature_names(feature_columns: Sequence[FeatureColumn]) -> list[str]:
    """The input names the model reads from `x`, in column order."""
    return list(dict.fromkeys(c.name for c in feature_columns))


# ----------------------------------------------------------------------------------- model


@dataclass
class History:
    """What `fit` returns, like Keras' and DeepCTR-Torch's: `history.history[key]` per epoch;
    the keys are each library's (the model's `fit` says which)."""

    history: dict[str, list[float]] = field(default_factory=dict)
    epoch: list[int] = field(default_factory=list)
    params: dict[str, Any] = field(default_factory=dict)


def MMOE(
    dnn_feature_columns: Sequence[FeatureColumn],
    num_experts: int = 3,
    expert_dnn_hidden_units: Sequence[int] = (256, 128),
    tower_dnn_hidden_units: Sequence[int] = (64,),
    gate_dnn_hidden_units: Sequence[int] = (),
    l2_reg_embedding: float = 1e-05,
    l2_reg_dnn: float = 0,
    seed: int = 1024,
    dnn_dropout: float = 0,
    dnn_activation: str = "relu",
    dnn_use_bn: bool = False,
    task_types: Sequence[str] = ("binary", "binary"),
    task_names: Sequence[str] = ("ctr", "ctcvr"),
) -> MMOEModel:
    """Multi-gate Mixture-of-Experts over the feature columns (DeepCTR's signature): each task
    gets a softmax gate over the shared experts (after a gate DNN, if given) and a tower."""
    return MMOEModel(
        *mmoe_parts(
            dnn_feature_columns,
            num_experts,
            expert_dnn_hidden_units,
            tower_dnn_hidden_units,
            gate_dnn_hidden_units,
            l2_reg_embedding,
            l2_reg_dnn,
            dnn_dropout,
            dnn_activation,
            dnn_use_bn,
            task_types,
            task_names,
        ),
        seed,
    )


def mmoe_parts(
    dnn_feature_columns: Sequence[FeatureColumn],
    num_experts: int,
    expert_dnn_hidden_units: Sequence[int],
    tower_dnn_hidden_units: Sequence[int],
    gate_dnn_hidden_units: Sequence[int],
    l2_reg_embedding: float,
    l2_reg_dnn: float,
    dnn_dropout: float,
    dnn_activation: str,
    dnn_use_bn: bool,
    task_types: Sequence[str],
    task_names: Sequence[str],
) -> tuple[list[FeatureColumn], dict[str, Any], list[dict[str, Any]]]:
    """MMOE's arguments, checked: (feature columns, `model` config keys, tasks)."""
    if len(task_types) != len(task_names):
        raise ValueError("task_types and task_names must have the same length")
    if not task_names:
        raise ValueError("at least one task")
    for t in task_types:
        if t not in _TASK_KINDS:
            raise ValueError(f"task_types: {t!r}; binary or regression")
    if dnn_activation not in _ACTIVATIONS:
        raise ValueError(f"dnn_activation {dnn_activation!r}: one of {sorted(_ACTIVATIONS)}")
    columns = list(dnn_feature_columns)
    if not columns:
        raise ValueError("dnn_feature_columns is empty")
    for c in columns:
        _check_column(c)
    model = {
        "experts": num_experts,
        "expert_units": list(expert_dnn_hidden_units),
        "gate_units": list(gate_dnn_hidden_units),
        "activation": _ACTIVATIONS[dnn_activation],
        "dropout": float(dnn_dropout),
        "batch_norm": bool(dnn_use_bn),
        "l2": float(l2_reg_dnn),
        "embedding_l2": float(l2_reg_embedding),
    }
    tasks = [
        {"name": n, "kind": _TASK_KINDS[t], "tower": list(tower_dnn_hidden_units)}
        for n, t in zip(task_names, task_types, strict=True)
    ]
    return columns, model, tasks


def _check_column(c: FeatureColumn) -> None:
    if not isinstance(c, SparseFeat | DenseFeat | VarLenSparseFeat):
        raise ValueError(f"{c!r} is not a SparseFeat, DenseFeat or VarLenSparseFeat")
    if not re.fullmatch(_NAME_OK, c.name):
        raise ValueError(f"feature {c.name!r}: names here are {_NAME_OK} (they name the inputs)")
    if isinstance(c, DenseFeat):
        if c.dimension != 1:
            raise ValueError(f"DenseFeat {c.name!r}: dimension {c.dimension}; only 1 here")
        if c.transform_fn is not None:
            raise ValueError(f"DenseFeat {c.name!r}: transform_fn is not supported")
        return
    sparse = c.sparsefeat if isinstance(c, VarLenSparseFeat) else c
    for key, unsupported in (
        ("vocabulary_path", sparse.vocabulary_path is not None),
        ("embeddings_initializer", sparse.embeddings_initializer is not None),
        ("trainable", not sparse.trainable),
    ):
        if unsupported:
            raise ValueError(f"feature {c.name!r}: {key} is not supported")
    if sparse.vocabulary_size < 1 or int(sparse.embedding_dim) < 1:
        raise ValueError(f"feature {c.name!r}: vocabulary_size and embedding_dim must be >= 1")
    if isinstance(c, VarLenSparseFeat):
        if c.combiner not in ("mean", "sum"):
            raise ValueError(f"VarLenSparseFeat {c.name!r}: combiner {c.combiner!r}; mean or sum")
        if c.length_name is not None or c.weight_name is not None:
            raise ValueError(
                f"VarLenSparseFeat {c.name!r}: length_name and weight_name are not supported "
                "(padding, 0 or '', marks the end of a list)"
            )
        if c.maxlen < 1:
            raise ValueError(f"VarLenSparseFeat {c.name!r}: maxlen must be >= 1")


class ArrayModel:
    """A multi-task model trained from arrays by this project's trainer: compile, fit, predict,
    save. Subclasses give a library's conventions for labels, predictions and history."""

    # optimizer name -> (train.optimizer, the library's default learning rate)
    OPTIMIZERS: ClassVar[dict[str, tuple[str, float]]] = {"adam": ("adam", 0.001)}
    BATCH_SIZE = 256  # fit's default batch size

    def __init__(
        self,
        columns: list[FeatureColumn],
        model: dict[str, Any],
        tasks: list[dict[str, Any]],
        seed: int,
    ) -> None:
        self.feature_columns = columns
        self._model = model
        self._tasks = tasks
        self._seed = seed
        self._optimizer = self.OPTIMIZERS["adam"]
        self._metrics: list[str] = []
        self._metric_names: list[str] = []  # as compile() was given them
        self._run: Any = None  # the checkpoint.Run of the last fit
        self._config: RunConfig | None = None
        self._workdir = tempfile.mkdtemp(prefix="mmoe-deepctr-")
        weakref.finalize(self, shutil.rmtree, self._workdir, ignore_errors=True)

    @property
    def config(self) -> RunConfig:
        """The training config the last `fit` used (what `save` writes as config.yaml)."""
        if self._config is None:
            raise RuntimeError("call fit() first")
        return self._config

    def compile(
        self,
        optimizer: str = "adam",
        loss: str | Sequence[str] | None = None,
        metrics: Sequence[str] | None = None,
    ) -> None:
        """optimizer: a name of OPTIMIZERS (at the library's default learning rate); loss: per
        task (or one for all) "binary_crossentropy" for binary tasks, "mse" for regression (the
        losses this project trains); metrics: auc, binary_crossentropy/logloss, mse, mae,
        accuracy."""
        if not isinstance(optimizer, str) or optimizer.lower() not in self.OPTIMIZERS:
            names = " or ".join(repr(o) for o in self.OPTIMIZERS)
            raise ValueError(f"optimizer {optimizer!r}: {names} here")
        self._optimizer = self.OPTIMIZERS[optimizer.lower()]
        if loss is not None:
            losses = [loss] * len(self._tasks) if isinstance(loss, str) else list(loss)
            if len(losses) != len(self._tasks):
                raise ValueError(f"{len(losses)} losses for {len(self._tasks)} tasks")
            for task, name in zip(self._tasks, losses, strict=True):
                if not isinstance(name, str) or name not in _LOSSES[task["kind"]]:
                    raise ValueError(
                        f"task {task['name']!r} ({task['kind']}): loss {name!r}; this project "
                        f"trains {_LOSSES[task['kind']][0]!r}"
                    )
        self._metrics, self._metric_names = [], []
        for m in metrics or []:
            if m not in _METRICS:
                raise ValueError(f"metric {m!r}: one of {sorted(_METRICS)}")
            self._metrics.append(_METRICS[m])
            self._metric_names.append(m)

    def fit(
        self,
        x: Mapping[str, Any] | Sequence[Any] | None = None,
        y: Any = None,
        batch_size: int | None = None,
        epochs: int = 1,
        verbose: int = 1,
        initial_epoch: int = 0,
        validation_split: float = 0.0,
        validation_data: tuple[Any, Any] | None = None,
        shuffle: bool = True,
        callbacks: Sequence[Any] | None = None,
    ) -> History:
        """Trains a new model on `x` (a dict of arrays by feature name, or a list in column
        order) and `y` (labels in the library's convention). `validation_split` holds out the
        last fraction of the rows; the epoch with the best validation metric is kept (the first
        task's first metric), else the last."""
        from mmoe.model.checkpoint import load_run
        from mmoe.model.train import train

        if x is None or y is None:
            raise ValueError("fit needs x and y")
        if callbacks:
            raise ValueError("callbacks are not supported")
        if initial_epoch:
            raise ValueError("initial_epoch is not supported: each fit trains from the start")
        if not 0 <= validation_split < 1:
            raise ValueError("validation_split must be in [0, 1)")
        table = self._table(x, y)
        valid: pa.Table | None = None
        if validation_data is not None:
            valid = self._table(*validation_data)
        elif validation_split:
            split_at = int(table.num_rows * (1 - validation_split))  # Keras: the last rows
            table, valid = table.slice(0, split_at), table.slice(split_at)
        work = Path(self._workdir)
        train_path = work / "train.parquet"
        pq.write_table(table, train_path)
        valid_path = None
        if valid is not None and valid.num_rows:
            valid_path = work / "valid.parquet"
            pq.write_table(valid, valid_path)
        config = self._build_config(table, batch_size or self.BATCH_SIZE, epochs, verbose, shuffle)
        run_dir = work / "run"
        shutil.rmtree(run_dir, ignore_errors=True)
        quiet = contextlib.redirect_stdout(io.StringIO()) if verbose == 0 else None
        with quiet or contextlib.nullcontext():
            result = train(config, train_path, run_dir, valid_path)
        self._config = config
        self._run = load_run(run_dir)
        history = History(params={"batch_size": config.train.batch_size, "epochs": epochs})
        for record in result.epochs:
            history.epoch.append(int(record["epoch"]) - 1)
            for k, v in self._history_values(record).items():
                history.history.setdefault(k, []).append(float(v))
        return history

    def _history_values(self, record: dict[str, Any]) -> dict[str, float]:
        """One epoch's history entries from the trainer's record of it."""
        raise NotImplementedError

    def _labels(self, y: Any, rows: int) -> np.ndarray:
        """`y` in the library's convention -> [rows, tasks]."""
        raise NotImplementedError

    def _scores(self, x: Mapping[str, Any] | Sequence[Any], batch_size: int) -> np.ndarray:
        """Scores [n, tasks] (float64): probabilities of binary tasks, values of regressions."""
        from mmoe.contract.outputs import output_names
        from mmoe.model.batches import encode_table
        from mmoe.model.evaluation import predict

        if self._run is None:
            raise RuntimeError("call fit() first")
        table = self._table(x)
        names = [output_names(t["name"], t["kind"]).score for t in self._tasks]
        parts = []
        for start in range(0, table.num_rows, max(1, batch_size)):
            rows = table.slice(start, batch_size)
            out = predict(
                self._run.model, encode_table(rows, self._run.schema, [], with_labels=False)
            )
            parts.append(np.stack([out[n] for n in names], axis=1))
        if not parts:
            return np.zeros((0, len(names)))
        return np.concatenate(parts).astype(np.float64)

    def save(self, run_dir: str | Path) -> Path:
        """Writes the trained model as a run directory (config.yaml, schema.json, weights.pt,
        metrics.json): `mmoe export RUN_DIR --out model.onnx` serves it."""
        if self._run is None:
            raise RuntimeError("call fit() first")
        out = Path(run_dir)
        shutil.copytree(self._run.path, out, dirs_exist_ok=True)
        return out

    # ------------------------------------------------------------------------- internals

    def _label_column(self, task: str) -> str:
        names = {c.name for c in self.feature_columns}
        column = task
        while column in names:
            column = f"{column}_label"
        return column

    def _table(self, x: Mapping[str, Any] | Sequence[Any], y: Any = None) -> pa.Table:
        """The columns as Arrow: ids as int64 or strings, lists with padding dropped."""
        if not isinstance(x, Mapping):
            x = dict(zip(get_feature_names(self.feature_columns), x, strict=True))
        arrays: dict[str, pa.Array] = {}
        rows: int | None = None
        for c in self.feature_columns:
            if c.name in arrays:
                continue
            if c.name not in x:
                raise ValueError(f"x has no {c.name!r} (the feature columns name it)")
            if isinstance(c, VarLenSparseFeat):
                arrays[c.name] = _lists(c.name, x[c.name])
            else:
                values = np.asarray(x[c.name])
                if values.ndim == 2 and values.shape[1] == 1:
                    values = values[:, 0]
                if values.ndim != 1:
                    raise ValueError(f"x[{c.name!r}]: one value per row, got shape {values.shape}")
                arrays[c.name] = (
                    pa.array(values.astype(np.float64))
                    if isinstance(c, DenseFeat)
                    else _ids(c.name, values)
                )
            n = len(arrays[c.name])
            if rows is not None and n != rows:
                raise ValueError(f"x[{c.name!r}] has {n} rows, the other columns {rows}")
            rows = n
        if y is not None:
            labels = self._labels(y, rows or 0)
            for i, t in enumerate(self._tasks):
                arrays[self._label_column(t["name"])] = pa.array(labels[:, i])
        return pa.table(arrays)

    def _build_config(
        self, table: pa.Table, batch_size: int, epochs: int, verbose: int, shuffle: bool
    ) -> RunConfig:
        features = []
        for c in self.feature_columns:
            if isinstance(c, DenseFeat):
                features.append({"name": c.name, "kind": "numeric"})
                continue
            sparse = c.sparsefeat if isinstance(c, VarLenSparseFeat) else c
            feature: dict[str, Any] = {
                "name": c.name,
                "kind": "tags" if isinstance(c, VarLenSparseFeat) else "categorical",
                "embedding_dim": int(sparse.embedding_dim),
            }
            col_type = table.column(c.name).type
            value_type = col_type.value_type if pa.types.is_list(col_type) else col_type
            if sparse.use_hash:
                feature["hash_buckets"] = sparse.vocabulary_size
            elif pa.types.is_integer(value_type):
                feature["num_buckets"] = sparse.vocabulary_size
            else:  # string ids: a vocabulary fitted on the training rows
                feature["vocab"] = {"max_size": sparse.vocabulary_size}
            if sparse.embedding_name and sparse.embedding_name != c.name:
                feature["embedding_name"] = sparse.embedding_name
            if isinstance(c, VarLenSparseFeat):
                feature.update(max_len=c.maxlen, pooling=c.combiner, default=[])
            features.append(feature)
        tasks = []
        for t in self._tasks:
            metrics = [m for m in self._metrics if m in _APPLIES[t["kind"]]]
            tasks.append({**t, "label": self._label_column(t["name"]), "metrics": metrics})
        return parse_config(
            {
                "name": "deepctr_mmoe",
                "features": features,
                "tasks": tasks,
                "model": self._model,
                "train": {
                    "batch_size": batch_size,
                    "epochs": epochs,
                    "lr": self._optimizer[1],
                    "optimizer": self._optimizer[0],
                    "seed": self._seed,
                    "shuffle": shuffle,
                    "valid_fraction": 0.0,
                    "progress": verbose == 1,
                },
            }
        )


class MMOEModel(ArrayModel):
    """The model DeepCTR's `MMOE(...)` returns, with Keras' conventions: labels one array per
    task, predictions one `[n, 1]` array per task, history keys `loss`, `<task>_loss`,
    `val_loss`, `val_<task>_<metric>` (the metric as compile() named it)."""

    OPTIMIZERS: ClassVar[dict[str, tuple[str, float]]] = {
        "adam": ("adam", 0.001),
        "adamw": ("adamw", 0.001),
        "adagrad": ("adagrad", 0.001),
    }
    BATCH_SIZE = 32  # Keras' fit

    def _labels(self, y: Any, rows: int) -> np.ndarray:
        names = [t["name"] for t in self._tasks]
        if isinstance(y, Mapping):
            missing = [n for n in names if n not in y]
            if missing:
                raise ValueError(f"y has no labels for {missing} (a dict of labels by task name)")
            y = [y[n] for n in names]
        elif len(names) == 1 and not isinstance(y, list | tuple):
            y = [y]
        if not isinstance(y, list | tuple):
            raise ValueError(
                f"y: {len(names)} tasks take a list of {len(names)} label arrays, one per task "
                "(Keras' multi-output fit); an [n, tasks] array is DeepCTR-Torch's convention "
                "(mmoe.model.deepctr_torch)"
            )
        if len(y) != len(names):
            raise ValueError(f"y has {len(y)} label arrays for {len(names)} tasks")
        arrays = [np.asarray(v, dtype=np.float64).reshape(-1) for v in y]
        for name, a in zip(names, arrays, strict=True):
            if len(a) != rows:
                raise ValueError(f"y for {name!r} has {len(a)} rows, x has {rows}")
        return np.stack(arrays, axis=1)

    def predict(self, x: Mapping[str, Any] | Sequence[Any], batch_size: int = 256) -> Any:
        """One `[n, 1]` float32 array per task, in task order (`pred[0]` is the first task's);
        one array when there is one task, as Keras' predict returns."""
        scores = self._scores(x, batch_size).astype(np.float32)
        outputs = [scores[:, i : i + 1] for i in range(scores.shape[1])]
        return outputs[0] if len(outputs) == 1 else outputs

    def _history_values(self, record: dict[str, Any]) -> dict[str, float]:
        values = {"loss": record["train_loss"]["total"]}
        values |= {f"{t['name']}_loss": record["train_loss"][t["name"]] for t in self._tasks}
        valid = record.get("valid", {})
        if "loss" in valid:
            values["val_loss"] = valid["loss"]
        for t in self._tasks:
            for given, metric in zip(self._metric_names, self._metrics, strict=True):
                if f"{metric}_{t['name']}" in valid:
                    values[f"val_{t['name']}_{given}"] = valid[f"{metric}_{t['name']}"]
        return values


def _ids(name: str, values: np.ndarray) -> pa.Array:
    if values.dtype.kind in "iu":
        return pa.array(values.astype(np.int64))
    if values.dtype.kind == "f":
        if not np.all(np.isfinite(values) & (values == np.round(values))):
            raise ValueError(f"x[{name!r}]: ids must be integers or strings")
        return pa.array(values.astype(np.int64))
    if values.dtype.kind in "USO":
        return pa.array([None if v is None else str(v) for v in values.tolist()], pa.string())
    raise ValueError(f"x[{name!r}]: ids must be integers or strings, got {values.dtype}")


def _lists(name: str, values: Any) -> pa.Array:
    """Padded sequences -> lists without the padding (0 for integer ids, "" or None for
    strings)."""
    rows = values.tolist() if isinstance(values, np.ndarray) else [list(r) for r in values]
    flat = [v for r in rows for v in r]
    kinds = {type(v) for v in flat if v is not None}
    if kinds and all(issubclass(k, int | np.integer) for k in kinds):
        return pa.array([[int(v) for v in r if v] for r in rows], pa.list_(pa.int64()))
    if kinds and all(issubclass(k, str) for k in kinds):
        return pa.array([[v for v in r if v] for r in rows], pa.list_(pa.string()))
    if not kinds:
        return pa.array([[] for _ in rows], pa.list_(pa.int64()))
    raise ValueError(
        f"x[{name!r}]: lists of integer ids or of strings, got {sorted(map(str, kinds))}"
    )
