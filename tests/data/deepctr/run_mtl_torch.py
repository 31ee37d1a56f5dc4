"""DeepCTR-Torch's multi-task example (examples/run_multitask_learning.py: label-encoded ids,
scaled numbers, `fit` on `train[target].values`, `predict` indexed `pred_ans[:, i]`, adagrad),
run on census-income's two tasks as in DeepCTR's run_mtl.py. Only the import line differs
from DeepCTR-Torch's (`from deepctr_torch.inputs import ...`, `from deepctr_torch.models import
MMOE`). Run in a folder holding `census-income.sample` (census-income rows, no header)."""

import pandas as pd
from sklearn.metrics import log_loss, roc_auc_score
from sklearn.preprocessing import LabelEncoder, MinMaxScaler

from mmoe.model.deepctr_torch import MMOE, DenseFeat, SparseFeat, get_feature_names

if __name__ == "__main__":
    column_names = [
        "age", "class_worker", "det_ind_code", "det_occ_code", "education", "wage_per_hour",
        "hs_college", "marital_stat", "major_ind_code", "major_occ_code", "race", "hisp_origin",
        "sex", "union_member", "unemp_reason", "full_or_part_emp", "capital_gains",
        "capital_losses", "stock_dividends", "tax_filer_stat", "region_prev_res",
        "state_prev_res", "det_hh_fam_stat", "det_hh_summ", "instance_weight", "mig_chg_msa",
        "mig_chg_reg", "mig_move_reg", "mig_same", "mig_prev_sunbelt", "num_emp", "fam_under_18",
        "country_father", "country_mother", "country_self", "citizenship", "own_or_self",
        "vet_question", "vet_benefits", "weeks_worked", "year", "income_50k",
    ]  # fmt: skip
    data = pd.read_csv("./census-income.sample", header=None, names=column_names)
    data["label_income"] = (data["income_50k"] == " 50000+.").astype(int)
    data["label_marital"] = (data["marital_stat"] == " Never married").astype(int)
    data = data.drop(columns=["income_50k", "marital_stat"])

    target = ["label_income", "label_marital"]
    sparse_features = [
        "class_worker", "det_ind_code", "det_occ_code", "education", "hs_college",
        "major_ind_code", "major_occ_code", "race", "hisp_origin", "sex", "union_member",
        "unemp_reason", "full_or_part_emp", "tax_filer_stat", "region_prev_res", "state_prev_res",
        "det_hh_fam_stat", "det_hh_summ", "mig_chg_msa", "mig_chg_reg", "mig_move_reg",
        "mig_same", "mig_prev_sunbelt", "fam_under_18", "country_father", "country_mother",
        "country_self", "citizenship", "vet_question",
    ]  # fmt: skip
    dense_features = [c for c in data.columns if c not in sparse_features + target]

    # 1. label encoding for the sparse features, a simple transformation for the dense ones
    for feat in sparse_features:
        lbe = LabelEncoder()
        data[feat] = lbe.fit_transform(data[feat])
    mms = MinMaxScaler(feature_range=(0, 1))
    data[dense_features] = mms.fit_transform(data[dense_features])

    # 2. each sparse field's number of values, and the dense fields
    fixlen_feature_columns = [
        SparseFeat(feat, vocabulary_size=data[feat].max() + 1, embedding_dim=4)
        for feat in sparse_features
    ] + [DenseFeat(feat, 1) for feat in dense_features]
    dnn_feature_columns = fixlen_feature_columns
    linear_feature_columns = fixlen_feature_columns
    feature_names = get_feature_names(linear_feature_columns + dnn_feature_columns)

    # 3. the model's input
    split_boundary = int(data.shape[0] * 0.8)
    train, test = data[:split_boundary], data[split_boundary:]
    train_model_input = {name: train[name] for name in feature_names}
    test_model_input = {name: test[name] for name in feature_names}

    # 4. define the model, train, predict and evaluate
    device = "cpu"
    model = MMOE(
        dnn_feature_columns,
        task_types=["binary", "binary"],
        l2_reg_embedding=1e-5,
        task_names=target,
        device=device,
    )
    model.compile("adagrad", loss="binary_crossentropy", metrics=["binary_crossentropy"])
    history = model.fit(
        train_model_input, train[target].values, batch_size=256, epochs=10, verbose=2
    )
    pred_ans = model.predict(test_model_input, 256)
    print("")
    for i, target_name in enumerate(target):
        print(
            f"{target_name} test LogLoss",
            round(log_loss(test[target[i]].values, pred_ans[:, i]), 4),
        )
        print(
            f"{target_name} test AUC",
            round(roc_auc_score(test[target[i]].values, pred_ans[:, i]), 4),
        )
