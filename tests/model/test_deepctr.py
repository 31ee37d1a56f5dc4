"""DeepCTR's MMOE API in both libraries' conventions: the seed document's (Keras) signature and
DeepCTR-Torch's; compile/fit/predict on dicts of arrays (integer and string ids, padded sequences,
dense values); Keras' labels and predictions one array per task, DeepCTR-Torch's [n, tasks]; and
each library's own multi-task example script on census-income rows, run as a user would with
only its import line changed."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from mmoe.model import deepctr, deepctr_torch
from mmoe.model.deepctr_torch import (
    MMOE,
    DenseFeat,
    SparseFeat,
    VarLenSparseFeat,
    get_feature_names,
)
from tests.cli import mmoe
from tests.server import ServerProcess

DATA = Path(__file__).resolve().parents[1] / "data" / "deepctr"
SCRIPT = DATA / "mmoe_census.py"
CENSUS = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "census-income"

# deepctr.models.multitask.mmoe.MMOE, as the seed document gives it
SEED_SIGNATURE = (
    "(dnn_feature_columns, num_experts=3, expert_dnn_hidden_units=(256, 128), "
    "tower_dnn_hidden_units=(64,), gate_dnn_hidden_units=(), l2_reg_embedding=1e-05, "
    "l2_reg_dnn=0, seed=1024, dnn_dropout=0, dnn_activation='relu', dnn_use_bn=False, "
    "task_types=('binary', 'binary'), task_names=('ctr', 'ctcvr'))"
)


# deepctr_torch.models.multitask.mmoe.MMOE
TORCH_SIGNATURE = (
    "(dnn_feature_columns, num_experts=3, expert_dnn_hidden_units=(256, 128), "
    "gate_dnn_hidden_units=(64,), tower_dnn_hidden_units=(64,), l2_reg_linear=1e-05, "
    "l2_reg_embedding=1e-05, l2_reg_dnn=0, init_std=0.0001, seed=1024, dnn_dropout=0, "
    "dnn_activation='relu', dnn_use_bn=False, task_types=('binary', 'binary'), "
    "task_names=('ctr', 'ctcvr'), device='cpu', gpus=None)"
)


def signature(function: Any) -> str:
    params = inspect.signature(function).parameters.values()
    text = ", ".join(
        p.name if p.default is inspect.Parameter.empty else f"{p.name}={p.default!r}"
        for p in params
    )
    return f"({text})"


def test_signature_and_defaults_are_each_librarys() -> None:
    assert signature(deepctr.MMOE) == SEED_SIGNATURE
    assert signature(deepctr_torch.MMOE) == TORCH_SIGNATURE
    # the feature columns too: DeepCTR-Torch's SparseFeat has no vocabulary_path (its 5th
    # positional argument is dtype), its VarLenSparseFeat no weight_name
    assert list(inspect.signature(deepctr_torch.SparseFeat).parameters)[4] == "dtype"
    assert list(inspect.signature(deepctr.SparseFeat).parameters)[4] == "vocabulary_path"
    assert "weight_name" not in inspect.signature(deepctr_torch.VarLenSparseFeat).parameters
    # "auto" embedding_dim is 6 * int(vocabulary_size ** 0.25) in both
    assert deepctr.SparseFeat("a", 10, "auto").embedding_dim == 6
    assert deepctr_torch.SparseFeat("a", 100, "auto").embedding_dim == 18


def conventions_data(n: int) -> tuple[dict[str, Any], np.ndarray]:
    rng = np.random.default_rng(5)
    x = {"user": rng.integers(0, 30, n), "price": rng.random(n)}
    z = (x["user"] % 3 == 0) * 2.0 + x["price"] - 1
    y = np.stack([rng.random(n) < 1 / (1 + np.exp(-z)), rng.random(n) < 0.3], axis=1)
    return x, y.astype(int)


def twin(module: Any) -> Any:
    model = module.MMOE(
        [module.SparseFeat("user", 30), module.DenseFeat("price", 1)],
        num_experts=2,
        expert_dnn_hidden_units=(8,),
        gate_dnn_hidden_units=(),
        tower_dnn_hidden_units=(4,),
        task_names=("ctr", "cvr"),
    )
    model.compile("adam", loss="binary_crossentropy", metrics=["auc"])
    return model


def test_keras_and_torch_conventions_for_labels_predictions_and_history() -> None:
    """The same model and rows through both: Keras takes one label array per task and predicts
    one [n, 1] array per task (pred[0] is ctr); DeepCTR-Torch takes and predicts [n, tasks]."""
    x, y = conventions_data(600)
    keras, torch_style = twin(deepctr), twin(deepctr_torch)
    kh = keras.fit(x, [y[:, 0], y[:, 1]], batch_size=64, epochs=2, verbose=0, validation_split=0.2)
    th = torch_style.fit(x, y, batch_size=64, epochs=2, verbose=0, validation_split=0.2)
    k_pred, t_pred = keras.predict(x), torch_style.predict(x)
    assert isinstance(k_pred, list) and [p.shape for p in k_pred] == [(600, 1), (600, 1)]
    assert k_pred[0].dtype == np.float32
    assert (
        isinstance(t_pred, np.ndarray) and t_pred.shape == (600, 2) and t_pred.dtype == np.float64
    )
    # one engine underneath: the same weights, so the same scores
    np.testing.assert_allclose(k_pred[0][:, 0], t_pred[:, 0], atol=1e-6)
    np.testing.assert_allclose(k_pred[1][:, 0], t_pred[:, 1], atol=1e-6)
    assert set(kh.history) == {
        "loss",
        "ctr_loss",
        "cvr_loss",
        "val_loss",
        "val_ctr_auc",
        "val_cvr_auc",
    }
    assert {"loss", "val_auc", "val_auc_ctr", "val_auc_cvr"} <= set(th.history)
    mean = (th.history["val_auc_ctr"][-1] + th.history["val_auc_cvr"][-1]) / 2
    assert th.history["val_auc"][-1] == pytest.approx(mean)
    # Keras also takes the labels as a dict by task (output) name
    keras.fit(x, {"ctr": y[:, 0], "cvr": y[:, 1]}, batch_size=64, epochs=1, verbose=0)


def test_each_library_refuses_the_others_labels() -> None:
    x, y = conventions_data(50)
    keras_says = (
        r"an \[n, tasks\] array is DeepCTR-Torch's convention \(mmoe\.model\.deepctr_torch\)"
    )
    with pytest.raises(
        ValueError, match=r"one per task \(Keras' multi-output fit\); " + keras_says
    ):
        twin(deepctr).fit(x, y, verbose=0)
    torch_says = r"a list of arrays per task is DeepCTR's \(Keras\) convention"
    with pytest.raises(ValueError, match=torch_says + r" \(mmoe\.model\.deepctr\)"):
        twin(deepctr_torch).fit(x, [y[:, 0], y[:, 1]], verbose=0)


def test_torch_mmoe_checks_what_deepctr_torch_checks() -> None:
    columns = [deepctr_torch.SparseFeat("user", 30)]
    with pytest.raises(ValueError, match="num_tasks must be greater than 1"):
        deepctr_torch.MMOE(columns, task_types=("binary",), task_names=("ctr",))
    with pytest.raises(ValueError, match="num_experts must be greater than 1"):
        deepctr_torch.MMOE(columns, num_experts=1)
    with pytest.raises(ValueError, match="device 'cuda:0'"):
        deepctr_torch.MMOE(columns, device="cuda:0")
    model = deepctr_torch.MMOE(columns)
    assert model._model["gate_units"] == [64]  # DeepCTR-Torch's default gate DNN
    model.compile("adagrad", loss="binary_crossentropy")
    x, y = conventions_data(40)
    model.fit({"user": x["user"]}, y, batch_size=20, verbose=0)
    assert (model.config.train.optimizer, model.config.train.lr) == ("adagrad", 0.01)


def write_census_sample(folder: Path, rows: int) -> None:
    """`census-income.sample` as DeepCTR's example reads it: census-income rows, no header."""
    import gzip

    with gzip.open(CENSUS / "census-income.test.gz", "rt") as f:
        lines = [next(f) for _ in range(rows)]
    (folder / "census-income.sample").write_text("".join(lines))


def run_example(script: str, folder: Path) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1")  # a small model: one thread is fastest
    proc = subprocess.run(
        [sys.executable, str(DATA / script)],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=folder,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow
@pytest.mark.parametrize(
    ("script", "income", "marital"),
    [
        ("run_mtl.py", "test income AUC", "test marital AUC"),
        ("run_mtl_torch.py", "label_income test AUC", "label_marital test AUC"),
    ],
)
def test_each_librarys_multitask_example_runs_to_its_last_line(
    tmp_path: Path, script: str, income: str, marital: str
) -> None:
    """DeepCTR's run_mtl.py (`pred_ans[0]`, labels a list per task) and DeepCTR-Torch's
    multi-task example (`pred_ans[:, i]`, labels `train[target].values`) on 2,000 census rows."""
    text = (DATA / script).read_text()
    module = "deepctr_torch" if "torch" in script else "deepctr"
    imports = [line for line in text.splitlines() if line.startswith(("import ", "from "))]
    assert [line for line in imports if "mmoe" in line] == [
        f"from mmoe.model.{module} import MMOE, DenseFeat, SparseFeat, get_feature_names"
    ]
    write_census_sample(tmp_path, 2000)
    out = run_example(script, tmp_path)
    aucs = [float(out.split(f"{name} ")[1].split()[0]) for name in (income, marital)]
    assert aucs[0] > 0.8 and aucs[1] > 0.9, out[-2000:]


def test_one_name_for_the_module_even_from_a_checkout() -> None:
    """The checkout's root is on sys.path in tests, but `model` is not a second copy of
    mmoe.model (its classes and registries would differ): importing it fails, saying so."""
    with pytest.raises(ImportError, match=r"import mmoe\.model"):
        import model.deepctr  # noqa: F401


def columns() -> list[Any]:
    return [
        SparseFeat("user", vocabulary_size=40, embedding_dim=4),
        SparseFeat("city", vocabulary_size=10, embedding_dim="auto"),
        DenseFeat("price", 1),
        VarLenSparseFeat(SparseFeat("tags", vocabulary_size=6, embedding_dim=3), maxlen=4),
        VarLenSparseFeat(
            SparseFeat("words", vocabulary_size=20, embedding_dim=3), maxlen=2, combiner="sum"
        ),
    ]


def data(n: int, seed: int = 0) -> tuple[dict[str, Any], np.ndarray]:
    rng = np.random.default_rng(seed)
    user = rng.integers(0, 40, n)
    city = rng.choice(["paris", "oslo", "rome", "lima"], n)  # string ids
    price = rng.random(n)
    tags = rng.integers(0, 6, (n, 4))  # 0 pads
    words = np.where(rng.random((n, 2)) < 0.3, "", rng.choice(["a", "b", "c"], (n, 2)))
    z = (user % 3 == 0) * 1.5 + (city == "oslo") + price - 1.5
    y = np.stack([rng.random(n) < 1 / (1 + np.exp(-z)), rng.random(n) < 0.3], axis=1)
    x = {"user": user, "city": city, "price": price, "tags": tags, "words": words}
    return x, y.astype(int)


def small_model() -> Any:
    return MMOE(
        columns(),
        num_experts=2,
        expert_dnn_hidden_units=(8,),
        tower_dnn_hidden_units=(4,),
        gate_dnn_hidden_units=(4,),
        dnn_use_bn=True,
        task_names=("ctr", "cvr"),
    )


def test_compile_fit_predict_save(tmp_path: Path) -> None:
    from mmoe.export.parity import torch_outputs
    from mmoe.model.checkpoint import load_run

    model = small_model()
    assert get_feature_names(model.feature_columns) == ["user", "city", "price", "tags", "words"]
    model.compile("adam", loss=["binary_crossentropy", "binary_crossentropy"], metrics=["auc"])
    x, y = data(800)
    history = model.fit(x, y, batch_size=64, epochs=2, verbose=0, validation_split=0.25)
    assert history.epoch == [0, 1]
    assert {
        "loss", "ctr_loss", "cvr_loss", "val_auc_ctr", "val_auc_cvr", "val_loss", "val_auc"
    } == set(history.history)  # fmt: skip
    assert all(len(v) == 2 for v in history.history.values())
    config = model.config
    assert [f.kind for f in config.features] == [
        "categorical",
        "categorical",
        "numeric",
        "tags",
        "tags",
    ]
    assert config.features[0].num_buckets == 40  # integer ids index the table
    assert config.features[1].vocab is not None  # string ids: a fitted vocabulary
    assert config.features[1].embedding_dim == 6 * int(10**0.25)  # "auto", DeepCTR's rule
    assert config.model.gate_units == [4] and config.model.batch_norm
    assert config.model.embedding_l2 == 1e-5 and config.train.batch_size == 64

    test_x, _ = data(50, seed=1)
    scores = model.predict(test_x, batch_size=16)
    assert scores.shape == (50, 2) and scores.dtype == np.float64
    assert ((scores > 0) & (scores < 1)).all()
    run = load_run(model.save(tmp_path / "run"))
    raw = {
        "user": [str(v) for v in test_x["user"]],
        "city": list(test_x["city"]),
        "price": list(test_x["price"]),
        "tags": [[str(v) for v in row if v] for row in test_x["tags"]],
        "words": [[v for v in row if v] for row in test_x["words"]],
    }
    expected = torch_outputs(run.model, run.schema, raw)
    np.testing.assert_allclose(scores[:, 0], expected["probs_ctr"], atol=1e-6)
    np.testing.assert_allclose(scores[:, 1], expected["probs_cvr"], atol=1e-6)


def test_regression_task_and_validation_data() -> None:
    model = MMOE(
        columns()[:3],
        expert_dnn_hidden_units=(8,),
        tower_dnn_hidden_units=(),
        task_types=("binary", "regression"),
        task_names=("click", "dwell"),
    )
    model.compile("adam", loss=["binary_crossentropy", "mse"], metrics=["auc", "mse"])
    x, y = data(400)
    x = {k: x[k] for k in ("user", "city", "price")}
    labels = np.stack([y[:, 0], x["price"] * 3], axis=1)
    valid = ({k: v[:100] for k, v in x.items()}, labels[:100])
    history = model.fit(x, labels, batch_size=50, epochs=1, verbose=0, validation_data=valid)
    assert {"val_auc_click", "val_mse_dwell"} <= set(history.history)
    assert model.config.tasks[1].kind == "regression"
    scores = model.predict({k: v[:5] for k, v in x.items()})
    assert scores.shape == (5, 2)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: MMOE([DenseFeat("p", 2)]), "dimension 2"),
        (lambda: MMOE([SparseFeat("a-b", 3)]), "names here are"),
        (lambda: MMOE(columns(), task_types=("binary", "tweedie")), "binary or regression"),
        (lambda: MMOE(columns(), dnn_activation="dice"), "dnn_activation 'dice'"),
        (
            lambda: MMOE([VarLenSparseFeat(SparseFeat("t", 3), 2, length_name="n")]),
            "length_name and weight_name are not supported",
        ),
        (lambda: MMOE([VarLenSparseFeat(SparseFeat("t", 3), 2, combiner="max")]), "mean or sum"),
        (lambda: small_model().compile("sgd"), "'adam' or 'adagrad' here"),
        (lambda: small_model().compile("adam", loss="mse"), "trains 'binary_crossentropy'"),
        (lambda: small_model().compile("adam", metrics=["ndcg"]), "metric 'ndcg'"),
        (lambda: small_model().predict(data(3)[0]), "call fit"),
        (lambda: small_model().fit(data(3)[0], np.zeros((3, 3))), r"expected \(3, 2\)"),
        (lambda: small_model().fit({"user": [1]}, [[0, 1]]), "x has no 'city'"),
    ],
)
def test_what_is_not_supported_is_refused(call: Any, message: str) -> None:
    with pytest.raises((ValueError, RuntimeError), match=message):
        call()


@pytest.mark.slow
def test_deepctr_script_runs_exports_and_serves_its_scores(tmp_path: Path) -> None:
    """The script changes only its imports from DeepCTR's; its saved model, exported, serves
    the scores predict() returned."""
    text = SCRIPT.read_text()
    assert "from mmoe.model.deepctr_torch import" in text
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "label_income test AUC" in proc.stdout
    auc = float(proc.stdout.split("label_income test AUC")[1].split()[0])
    assert auc > 0.6  # it learned from the generated labels
    model = tmp_path / "model.onnx"
    assert "parity" in mmoe("export", str(tmp_path / "run"), "--out", str(model))
    rows = json.loads((tmp_path / "test_rows.json").read_text())
    scores = np.load(tmp_path / "scores.npy")
    names = ["education", "occupation", "age", "hours_per_week", "interests"]
    candidates = {n: [r[n] for r in rows] for n in names}
    with ServerProcess(model, log_path=tmp_path / "server.log") as server:
        r = httpx.post(f"{server.url}/predict", json={"candidates": candidates}, timeout=30)
    assert r.status_code == 200, r.text
    served = r.json()["scores"]
    np.testing.assert_allclose(served["label_income"], scores[:, 0], atol=1e-5, rtol=0)
    np.testing.assert_allclose(served["label_marital"], scores[:, 1], atol=1e-5, rtol=0)
