"""A DeepCTR-Torch MMOE script in the shape of the multi-task examples (census income: income
and marital status), on generated data: y as one [n, tasks] array, predictions indexed
`pred_ans[:, i]`. Only the import differs from DeepCTR-Torch's: `from deepctr_torch.models
import MMOE` / `from deepctr_torch.inputs import ...`.

    python mmoe_census.py OUT_DIR   # writes OUT_DIR/run (mmoe export takes it), test rows, scores
"""

import sys

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import LabelEncoder, MinMaxScaler

from mmoe.model.deepctr_torch import (
    MMOE,
    DenseFeat,
    SparseFeat,
    VarLenSparseFeat,
    get_feature_names,
)


def census_like(n, seed=2020):
    rng = np.random.default_rng(seed)
    education = rng.choice(["Bachelors", "HS-grad", "Masters", "Doctorate", "Some-college"], n)
    occupation = rng.choice([f"occ_{i}" for i in range(14)], n)
    age = rng.integers(17, 90, n)
    hours = rng.integers(1, 99, n)
    words = ["sport", "music", "travel", "tech", "art"]
    interests = [" ".join(rng.choice(words, rng.integers(0, 4))) for _ in range(n)]
    graduate = np.isin(education, ["Masters", "Doctorate"])
    z_income = -2 + 0.04 * (age - 40) + 0.03 * (hours - 40) + 1.5 * graduate
    z_marital = -1 + 0.06 * (age - 30) - 0.5 * (education == "HS-grad")
    return pd.DataFrame(
        {
            "education": education,
            "occupation": occupation,
            "age": age,
            "hours_per_week": hours,
            "interests": interests,
            "label_income": (rng.random(n) < 1 / (1 + np.exp(-z_income))).astype(int),
            "label_marital": (rng.random(n) < 1 / (1 + np.exp(-z_marital))).astype(int),
        }
    )


if __name__ == "__main__":
    out = sys.argv[1]
    data = census_like(6000)
    sparse_features = ["education", "occupation"]
    dense_features = ["age", "hours_per_week"]
    target = ["label_income", "label_marital"]

    # 1. label-encode the sparse features, scale the dense ones, pad the multi-valued one
    for feat in sparse_features:
        data[feat] = LabelEncoder().fit_transform(data[feat])
    data[dense_features] = MinMaxScaler(feature_range=(0, 1)).fit_transform(data[dense_features])
    vocab = {"": 0, "sport": 1, "music": 2, "travel": 3, "tech": 4, "art": 5}
    interests = np.zeros((len(data), 3), dtype=np.int64)
    for i, text in enumerate(data["interests"]):
        ids = [vocab[w] for w in text.split()][:3]
        interests[i, : len(ids)] = ids

    # 2. the feature columns
    fixlen_feature_columns = [
        SparseFeat(feat, vocabulary_size=data[feat].max() + 1, embedding_dim=4)
        for feat in sparse_features
    ] + [DenseFeat(feat, 1) for feat in dense_features]
    varlen_feature_columns = [
        VarLenSparseFeat(
            SparseFeat("interests", vocabulary_size=len(vocab), embedding_dim=4),
            maxlen=3,
            combiner="mean",
        )
    ]
    dnn_feature_columns = fixlen_feature_columns + varlen_feature_columns
    feature_names = get_feature_names(dnn_feature_columns)

    # 3. train, predict
    train_idx, test_idx = train_test_split(np.arange(len(data)), test_size=0.2, random_state=2020)
    train, test = data.iloc[train_idx], data.iloc[test_idx]
    train_model_input = {name: train[name] for name in feature_names if name != "interests"}
    train_model_input["interests"] = interests[train_idx]
    test_model_input = {name: test[name] for name in feature_names if name != "interests"}
    test_model_input["interests"] = interests[test_idx]

    model = MMOE(
        dnn_feature_columns,
        tower_dnn_hidden_units=[],
        task_types=["binary", "binary"],
        task_names=["label_income", "label_marital"],
    )
    model.compile(
        "adam", loss=["binary_crossentropy", "binary_crossentropy"], metrics=["binary_crossentropy"]
    )
    history = model.fit(
        train_model_input,
        train[target].values,
        batch_size=256,
        epochs=3,
        verbose=2,
        validation_split=0.1,
    )
    pred_ans = model.predict(test_model_input, batch_size=256)
    for i, target_name in enumerate(target):
        auc = roc_auc_score(test[target[i]].values, pred_ans[:, i])
        print(f"{target_name} test AUC", round(auc, 4))

    # 4. keep the model, the rows it scored and its scores (for export and serving)
    model.save(f"{out}/run")
    test.assign(interests=[row[row > 0].tolist() for row in interests[test_idx]]).to_json(
        f"{out}/test_rows.json", orient="records"
    )
    np.save(f"{out}/scores.npy", pred_ans)
