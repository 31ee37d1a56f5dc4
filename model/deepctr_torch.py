"""DeepCTR-Torch's `MMOE` API on this project's trainer: a DeepCTR-Torch script changes only its
imports.

    from mmoe.model.deepctr_torch import MMOE
    from mmoe.model.deepctr_torch import SparseFeat, DenseFeat, VarLenSparseFeat, get_feature_names

The names are DeepCTR's (`mmoe.model.deepctr`), each as DeepCTR-Torch has it: `MMOE` with
DeepCTR-Torch's signature and defaults (a gate DNN of 64 units, `init_std`, `device`), feature
columns with its fields, and a model whose `fit(x, y)` takes `y` as one `[n, tasks]` array
(`train[target].values`) and whose `predict(x)` returns one `[n, tasks]` float64 array
(`pred[:, i]` is task i's), as `deepctr_torch.models.MMOE` does. The engine underneath is
`mmoe.model.deepctr.ArrayModel`: the same training, saving and export as there.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from mmoe.model import deepctr
from mmoe.model.deepctr import DEFAULT_GROUP_NAME, ArrayModel, History, mmoe_parts

__all__ = [
    "MMOE",
    "DenseFeat",
    "History",
    "MMOEModel",
    "SparseFeat",
    "VarLenSparseFeat",
    "get_feature_names",
]


@dataclass(frozen=True, init=False)
class SparseFeat(deepctr.SparseFeat):
    """DeepCTR-Torch's SparseFeat: (name, vocabulary_size, embedding_dim=4, use_hash=False,
    dtype="int32", embedding_name=None, group_name)."""

    def __init__(
        self,
        name: str,
        vocabulary_size: int,
        embedding_dim: int | str = 4,
        use_hash: bool = False,
        dtype: str = "int32",
        embedding_name: str | None = None,
        group_name: str = DEFAULT_GROUP_NAME,
    ) -> None:
        super().__init__(
            name=name,
            vocabulary_size=vocabulary_size,
            embedding_dim=embedding_dim,
            use_hash=use_hash,
            dtype=dtype,
            embedding_name=embedding_name,
            group_name=group_name,
        )


@dataclass(frozen=True, init=False)
class DenseFeat(deepctr.DenseFeat):
    """DeepCTR-Torch's DenseFeat: (name, dimension=1, dtype="float32")."""

    def __init__(self, name: str, dimension: int = 1, dtype: str = "float32") -> None:
        super().__init__(name=name, dimension=dimension, dtype=dtype)


@dataclass(frozen=True, init=False)
class VarLenSparseFeat(deepctr.VarLenSparseFeat):
    """DeepCTR-Torch's VarLenSparseFeat: (sparsefeat, maxlen, combiner="mean",
    length_name=None)."""

    def __init__(
        self,
        sparsefeat: deepctr.SparseFeat,
        maxlen: int,
        combiner: str = "mean",
        length_name: str | None = None,
    ) -> None:
        super().__init__(
            sparsefeat=sparsefeat, maxlen=maxlen, combiner=combiner, length_name=length_name
        )


get_feature_names = deepctr.get_feature_names


def MMOE(
    dnn_feature_columns: Sequence[deepctr.FeatureColumn],
    num_experts: int = 3,
    expert_dnn_hidden_units: Sequence[int] = (256, 128),
    gate_dnn_hidden_units: Sequence[int] = (64,),
    tower_dnn_hidden_units: Sequence[int] = (64,),
    l2_reg_linear: float = 0.00001,
    l2_reg_embedding: float = 0.00001,
    l2_reg_dnn: float = 0,
    init_std: float = 0.0001,
    seed: int = 1024,
    dnn_dropout: float = 0,
    dnn_activation: str = "relu",
    dnn_use_bn: bool = False,
    task_types: Sequence[str] = ("binary", "binary"),
    task_names: Sequence[str] = ("ctr", "ctcvr"),
    device: str = "cpu",
    gpus: Sequence[Any] | None = None,
) -> MMOEModel:
    """DeepCTR-Torch's MMOE: its signature and defaults, and its checks (two tasks or more, two
    experts or more). `l2_reg_linear` has no effect (MMOE has no linear part, in DeepCTR-Torch
    too); weights start from PyTorch's initialisation, not `init_std`, which is refused unless
    it is the default; training runs on the CPU (`device="cpu"`, no `gpus`)."""
    if len(task_names) <= 1:
        raise ValueError("num_tasks must be greater than 1")
    if num_experts <= 1:
        raise ValueError("num_experts must be greater than 1")
    if init_std != 0.0001:
        raise ValueError("init_std is not supported: weights start from PyTorch's defaults")
    if device != "cpu" or gpus:
        raise ValueError(f"device {device!r} / gpus: training here runs on the CPU")
    del l2_reg_linear  # no linear part in MMOE
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


class MMOEModel(ArrayModel):
    """The model DeepCTR-Torch's `MMOE(...)` returns: labels and predictions as `[n, tasks]`
    arrays; history keys `loss`, `<task>_loss`, `val_<metric>_<task>` and, as DeepCTR-Torch
    reports them, `val_<metric>` (the mean over the tasks, the metric as compile() named it)."""

    # DeepCTR-Torch's optimizers at torch's default learning rates
    OPTIMIZERS: ClassVar[dict[str, tuple[str, float]]] = {
        "adam": ("adam", 0.001),
        "adagrad": ("adagrad", 0.01),
    }

    def _labels(self, y: Any, rows: int) -> np.ndarray:
        tasks = len(self._tasks)
        if isinstance(y, list | tuple | Mapping):
            raise ValueError(
                f"y: one [n, {tasks}] array (e.g. train[target].values), as DeepCTR-Torch's fit "
                "takes it; a list of arrays per task is DeepCTR's (Keras) convention "
                "(mmoe.model.deepctr)"
            )
        labels = np.asarray(y, dtype=np.float64)
        if labels.ndim == 1 and tasks == 1:
            labels = labels[:, None]
        if labels.shape != (rows, tasks):
            raise ValueError(
                f"y has shape {labels.shape}; expected ({rows}, {tasks}): a column per task"
            )
        return labels

    def predict(self, x: Mapping[str, Any] | Sequence[Any], batch_size: int = 256) -> np.ndarray:
        """Scores [n, tasks] (float64): probabilities of binary tasks, values of regressions."""
        return self._scores(x, batch_size)

    def _history_values(self, record: dict[str, Any]) -> dict[str, float]:
        values = {"loss": record["train_loss"]["total"]}
        values |= {f"{t['name']}_loss": record["train_loss"][t["name"]] for t in self._tasks}
        valid = record.get("valid", {})
        values |= {f"val_{k}": v for k, v in valid.items()}
        for given, metric in zip(self._metric_names, self._metrics, strict=True):
            per_task = [
                valid[f"{metric}_{t['name']}"]
                for t in self._tasks
                if f"{metric}_{t['name']}" in valid
            ]
            if per_task:
                values[f"val_{given}"] = float(np.mean(per_task))
        return values
