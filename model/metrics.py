"""Per-task evaluation metrics, named `<metric>_<task>` (auc_ctr, logloss_cvr, mse_y1)."""

from __future__ import annotations

import numpy as np


def task_metrics(
    names: list[str], kind: str, labels: np.ndarray, scores: np.ndarray, task: str
) -> dict[str, float]:
    """`scores`: probabilities (binary [N], multiclass [N, C]) or predictions (regression [N]).

    Rows whose label is NaN are left out. A metric that is undefined on this data (AUC with a
    single class) is reported as NaN rather than failing the run.
    """
    # Imported here: scikit-learn takes about a second to import, which `mmoe train` would
    # otherwise spend before its first step and `mmoe export` for nothing.
    from sklearn import metrics as skm

    keep = ~np.isnan(labels)
    y, s = labels[keep], scores[keep]
    out: dict[str, float] = {}
    for name in names:
        value = float("nan")
        if len(y):
            if name == "auc":
                if len(np.unique(y)) == 2:
                    value = skm.roc_auc_score(y, s)
            elif name == "logloss":
                if kind == "multiclass":
                    value = skm.log_loss(y.astype(int), s, labels=np.arange(s.shape[1]))
                else:
                    value = skm.log_loss(y, np.clip(s, 1e-7, 1 - 1e-7), labels=[0, 1])
            elif name == "mse":
                value = skm.mean_squared_error(y, s)
            elif name == "mae":
                value = skm.mean_absolute_error(y, s)
            elif name == "accuracy":
                pred = s.argmax(1) if s.ndim == 2 else (s >= 0.5).astype(float)
                value = skm.accuracy_score(y.astype(int), pred.astype(int))
        out[f"{name}_{task}"] = float(value)
    return out
