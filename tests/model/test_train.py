"""Training end to end on small real data: every task, loss, regularisation, optimiser and
data option, through `model.train.train` and the run directory it writes."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
from sklearn.metrics import roc_auc_score

from mmoe.model.batches import encode_table, held_out
from mmoe.model.checkpoint import build_model, config_hash, load_run
from mmoe.model.config import ConfigError, TaskConfig, parse_config
from mmoe.model.data import DataSource, write_table
from mmoe.model.evaluation import evaluate, predict
from mmoe.model.losses import task_loss
from mmoe.model.schema import FeatureSchema, SchemaFitter
from mmoe.model.synthetic import synthetic_ranking
from mmoe.model.train import Trainer, train


def run(config: dict[str, Any], data: Path, out: Path, **kw: Any) -> dict[str, Any]:
    """Train; returns metrics.json."""
    train(parse_config(config), data, out, **kw)
    return json.loads((out / "metrics.json").read_text())


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "weights.pt", weights_only=True)


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = weights(a), weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.fixture(scope="module")
def rich_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Synthetic ranking rows plus a regression label, a 3-class label, a sample-weight column
    and a label with missing values."""
    table = synthetic_ranking(3000, seed=5)
    rng = np.random.default_rng(0)
    price = np.nan_to_num(table.column("price").to_numpy(zero_copy_only=False), nan=20.0)
    hour = table.column("hour").to_numpy()
    dwell = np.log1p(price) + 0.1 * rng.normal(size=len(price))
    rating = np.digitize(hour, [12, 18]).astype(np.int64)  # 0, 1, 2 by time of day
    partial = table.column("clk").to_numpy().astype(np.float64)
    partial[rng.random(len(partial)) < 0.3] = np.nan
    table = table.append_column("dwell", pa.array(dwell))
    table = table.append_column("rating", pa.array(rating))
    table = table.append_column("w", pa.array(rng.uniform(0.5, 2.0, len(price))))
    table = table.append_column("clk_partial", pa.array(partial, from_pandas=True))
    path = tmp_path_factory.mktemp("rich") / "rich.parquet"
    write_table(table, path)
    return path


# ------------------------------------------------------------------------------- the run dir


def test_run_dir_has_config_schema_best_weights_and_metrics(tiny_run: Path) -> None:
    for name in ("config.yaml", "schema.json", "weights.pt", "metrics.json"):
        assert (tiny_run / name).exists()
    metrics = json.loads((tiny_run / "metrics.json").read_text())
    assert metrics["world_size"] == 1 and metrics["best_epoch"] == 1
    assert metrics["train_rows"] + metrics["valid_rows"] == 6000
    (epoch,) = metrics["epochs"]
    assert set(epoch["train_loss"]) == {"ctr", "cvr", "total"}
    assert set(epoch["valid"]) == {"auc_ctr", "logloss_ctr", "auc_cvr", "loss"}
    assert metrics["best"] == epoch["valid"]
    assert metrics["gate_experts"] == ["e0", "e1", "e2"]
    for task in ("ctr", "cvr"):
        assert sum(metrics["gates"][task]) == pytest.approx(1.0, abs=1e-5)
    loaded = load_run(tiny_run)
    assert not loaded.model.training and loaded.metrics == metrics


def valid_rows(data: Path, seed: int, fraction: float = 0.1) -> pa.Table:
    table = pq.read_table(data)
    return table.filter(pa.array(held_out(seed, 0, table.num_rows, fraction)))


def test_best_checkpoint_reproduces_the_best_metrics(
    tiny_dict: dict[str, Any], tiny_data: Path, tmp_path: Path
) -> None:
    # auc_ctr "min": the best epoch is the worst one, so the kept weights are not the last.
    tiny_dict["train"] |= {
        "epochs": 3,
        "early_stopping": {"metric": "loss", "mode": "max", "patience": 1},
    }
    metrics = run(tiny_dict, tiny_data, tmp_path / "run")
    assert metrics["stopped_early"] and len(metrics["epochs"]) == 2
    assert metrics["best_epoch"] == 1
    assert metrics["epochs"][1]["valid"]["loss"] < metrics["epochs"][0]["valid"]["loss"]
    loaded = load_run(tmp_path / "run")
    valid = encode_table(valid_rows(tiny_data, 3), loaded.schema, loaded.config.tasks)
    again = evaluate(loaded.model, loaded.config, valid)
    for name, value in metrics["best"].items():
        assert again[name] == pytest.approx(value, rel=1e-5), name


def test_early_stopping_waits_patience_epochs(
    tiny_dict: dict[str, Any], tiny_data: Path, tmp_path: Path
) -> None:
    tiny_dict["train"] |= {
        "epochs": 4,
        "early_stopping": {"metric": "loss", "mode": "max", "patience": 2},
    }
    metrics = run(tiny_dict, tiny_data, tmp_path / "run")
    assert [e["epoch"] for e in metrics["epochs"]] == [1, 2, 3]
    assert metrics["stopped_early"] and metrics["best_epoch"] == 1


# ------------------------------------------------------------------------ determinism, data


def test_same_seed_and_data_give_the_same_weights(
    tiny_dict: dict[str, Any], tiny_data: Path, tmp_path: Path
) -> None:
    tiny_dict["model"] |= {"dropout": 0.2}  # dropout draws from the seeded generator too
    run(tiny_dict, tiny_data, tmp_path / "a")
    run(tiny_dict, tiny_data, tmp_path / "b")
    assert same_weights(tmp_path / "a", tmp_path / "b")
    tiny_dict["train"]["seed"] = 4
    run(tiny_dict, tiny_data, tmp_path / "c")
    assert not same_weights(tmp_path / "a", tmp_path / "c")


def test_chunked_reading_trains_the_same_model(
    tiny_dict: dict[str, Any], tiny_data: Path, tmp_path: Path
) -> None:
    """A file read in chunks smaller than itself (and not a multiple of the batch size), or as
    CSV, gives the same batches, the same validation rows and the same weights."""
    tiny_dict["train"] |= {"shuffle": False, "read_rows": 100_000}
    whole = run(tiny_dict, tiny_data, tmp_path / "whole")
    tiny_dict["train"]["read_rows"] = 777
    chunked = run(tiny_dict, tiny_data, tmp_path / "chunked")
    assert same_weights(tmp_path / "whole", tmp_path / "chunked")
    assert chunked["best"] == whole["best"]
    csv = tmp_path / "train.csv"
    write_table(pq.read_table(tiny_data), csv)
    from_csv = run(tiny_dict, csv, tmp_path / "csv")
    assert same_weights(tmp_path / "whole", tmp_path / "csv")
    assert from_csv["best"] == whole["best"]


@pytest.mark.parametrize("cache_mb", [0, 0.01])
def test_epochs_from_memory_train_the_same_model(
    tiny_dict: dict[str, Any], tiny_data: Path, tmp_path: Path, cache_mb: float
) -> None:
    """Encoded rows kept in memory after epoch 1 (the default bound) give the same batches as
    streaming every epoch (cache_mb 0) and as a bound the rows do not fit in (0.01 MiB)."""
    tiny_dict["train"] |= {"epochs": 3, "read_rows": 700}
    run(tiny_dict, tiny_data, tmp_path / "memory")
    tiny_dict["train"]["cache_mb"] = cache_mb
    run(tiny_dict, tiny_data, tmp_path / "stream")
    assert same_weights(tmp_path / "memory", tmp_path / "stream")


def test_the_cache_bound_decides_between_memory_and_the_file(
    tiny_dict: dict[str, Any], tiny_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tiny_dict["train"] |= {"read_rows": 700}
    for mb, cached in ((64, True), (0.01, False)):
        tiny_dict["train"]["cache_mb"] = mb
        trainer = Trainer(parse_config(tiny_dict), tiny_data, tmp_path / "run")
        schema, rows = trainer.fit_schema()
        first = [len(b) for b in trainer.batches.epoch(schema, 1, rows)]
        assert trainer.batches.cached is cached and trainer.batches.cache_overflowed is not cached
        assert [len(b) for b in trainer.batches.epoch(schema, 2, rows)] == first
    tiny_dict["train"] |= {"epochs": 2, "cache_mb": 64}
    run(tiny_dict, tiny_data, tmp_path / "logged")
    assert "encoded training rows kept in memory" in capsys.readouterr().out


def test_chunk_size_changes_neither_split_nor_row_count_when_shuffling(
    tiny_dict: dict[str, Any], tiny_data: Path, tmp_path: Path
) -> None:
    a = run(tiny_dict, tiny_data, tmp_path / "a")
    tiny_dict["train"]["read_rows"] = 500
    b = run(tiny_dict, tiny_data, tmp_path / "b")
    assert (a["train_rows"], a["valid_rows"]) == (b["train_rows"], b["valid_rows"])
    assert a["steps_per_epoch"] == b["steps_per_epoch"] == -(-a["train_rows"] // 256)


@pytest.mark.parametrize("suffix", [".parquet", ".csv", "/"])
def test_data_source_reads_bounded_chunks(tiny_data: Path, tmp_path: Path, suffix: str) -> None:
    """A Parquet or CSV file, or a directory of Parquet files, in chunks of the rows asked for
    (across the files of a directory), with only the columns the config reads."""
    from mmoe.model.config import load_config
    from tests.conftest import TINY_CONFIG

    table = pq.read_table(tiny_data)
    path = tmp_path / f"data{suffix}"
    if suffix == "/":
        for i, start in enumerate(range(0, table.num_rows, 2500)):
            write_table(table.slice(start, 2500), path / f"part-{i}.parquet")
    else:
        write_table(table, path)
    source = DataSource(path, load_config(TINY_CONFIG))
    chunks = list(source.batches(1000))
    assert [t.num_rows for t in chunks] == [1000] * 6 and source.count_rows() == 6000
    assert "clk" in source.columns and "gender" not in source.columns  # only what is needed
    assert chunks[0].column_names == source.columns
    read = pa.concat_tables(chunks)
    assert read.column("user_id").to_pylist() == table.column("user_id").to_pylist()


def test_held_out_rows_do_not_depend_on_chunking() -> None:
    whole = held_out(7, 0, 10_000, 0.2)
    parts = np.concatenate([held_out(7, s, 1000, 0.2) for s in range(0, 10_000, 1000)])
    np.testing.assert_array_equal(whole, parts)
    assert 0.18 < whole.mean() < 0.22
    assert not np.array_equal(whole, held_out(8, 0, 10_000, 0.2))


def test_a_validation_file_replaces_the_held_out_rows(
    tiny_dict: dict[str, Any], tiny_data: Path, tmp_path: Path
) -> None:
    valid = tmp_path / "valid.csv"
    write_table(synthetic_ranking(800, seed=99), valid)
    metrics = run(tiny_dict, tiny_data, tmp_path / "run", valid_path=valid)
    assert (metrics["train_rows"], metrics["valid_rows"]) == (6000, 800)


def test_without_validation_rows_the_training_loss_picks_the_epoch(
    tiny_dict: dict[str, Any], tiny_data: Path, tmp_path: Path
) -> None:
    tiny_dict["train"] |= {"valid_fraction": 0.0, "epochs": 2}
    metrics = run(tiny_dict, tiny_data, tmp_path / "run")
    assert metrics["valid_rows"] == 0 and metrics["gates"] is None
    losses = [e["train_loss"]["total"] for e in metrics["epochs"]]
    assert metrics["best_epoch"] == 1 + int(np.argmin(losses))


# ------------------------------------------------------------------------------------ tasks


def test_regression_and_multiclass_tasks_end_to_end(
    tiny_dict: dict[str, Any], rich_data: Path, tmp_path: Path
) -> None:
    tiny_dict["tasks"] = [
        {"name": "ctr", "label": "clk", "tower": [8]},
        {"name": "dwell", "label": "dwell", "kind": "regression", "metrics": ["mse", "mae"]},
        {
            "name": "rating",
            "label": "rating",
            "kind": "multiclass",
            "num_class": 3,
            "metrics": ["accuracy", "logloss"],
        },
    ]
    tiny_dict["train"] |= {"epochs": 3, "lr": 0.01, "batch_size": 32}
    metrics = run(tiny_dict, rich_data, tmp_path / "run")
    best = metrics["best"]
    assert set(best) == {
        "auc_ctr",
        "logloss_ctr",
        "mse_dwell",
        "mae_dwell",
        "accuracy_rating",
        "logloss_rating",
        "loss",
    }
    valid = valid_rows(rich_data, 3)
    dwell = valid.column("dwell").to_numpy()
    assert best["mse_dwell"] < 0.5 * dwell.var()  # far better than predicting the mean
    rating = valid.column("rating").to_numpy()
    majority = np.bincount(rating).max() / len(rating)
    assert best["accuracy_rating"] > majority + 0.1  # the hour feature gives the class
    loaded = load_run(tmp_path / "run")
    out = predict(loaded.model, encode_table(valid, loaded.schema, loaded.config.tasks))
    assert set(out) == {"probs_ctr", "logits_ctr", "y_dwell", "probs_rating", "logits_rating"}
    assert out["probs_rating"].shape == (valid.num_rows, 3)
    np.testing.assert_allclose(out["probs_rating"].sum(1), 1.0, rtol=1e-5)
    accuracy = (out["probs_rating"].argmax(1) == rating).mean()
    assert accuracy == pytest.approx(best["accuracy_rating"])


def test_bad_labels_are_refused(tiny_dict: dict[str, Any], rich_data: Path, tmp_path: Path) -> None:
    tiny_dict["tasks"] = [{"name": "ctr", "label": "rating"}]  # 0/1/2 is not a binary label
    with pytest.raises(ValueError, match="label column 'rating' must hold 0/1"):
        run(tiny_dict, rich_data, tmp_path / "a")
    tiny_dict["tasks"] = [{"name": "r", "label": "rating", "kind": "multiclass", "num_class": 2}]
    with pytest.raises(ValueError, match=r"must hold class ids 0\.\.1"):
        run(tiny_dict, rich_data, tmp_path / "b")


def test_missing_columns_are_named(
    tiny_dict: dict[str, Any], tiny_data: Path, tmp_path: Path
) -> None:
    tiny_dict["tasks"][1]["sample_weight"] = "importance"
    with pytest.raises(ValueError, match=r"missing columns \['importance'\]"):
        run(tiny_dict, tiny_data, tmp_path / "run")


def test_task_loss_counts_only_rows_in_the_task() -> None:
    task = TaskConfig(name="t", label="y")
    logits = torch.tensor([[0.3], [-1.0], [2.0], [0.0]])
    y = torch.tensor([1.0, 0.0, float("nan"), 1.0])
    w = torch.tensor([1.0, 1.0, 0.0, 0.0])
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits[:2, 0], y[:2])
    torch.testing.assert_close(task_loss(task, logits, y, w), expected)
    # sample weights scale each row; the mean is over rows with a non-zero weight
    w2 = torch.tensor([3.0, 1.0, 0.0, 0.0])
    per_row = torch.nn.functional.binary_cross_entropy_with_logits(
        logits[:2, 0], y[:2], reduction="none"
    )
    torch.testing.assert_close(task_loss(task, logits, y, w2), (3 * per_row[0] + per_row[1]) / 2)


def test_encode_table_masks_missing_labels_weights_and_task_space(rich_data: Path) -> None:
    table = pq.read_table(rich_data).slice(0, 500)
    config = parse_config(
        {
            "features": [{"name": "user_id", "kind": "categorical"}],
            "tasks": [
                {"name": "ctr", "label": "clk_partial", "sample_weight": "w"},
                {"name": "cvr", "label": "buy", "only_where": {"clk": 1}},
            ],
        }
    )
    schema = SchemaFitter(config).fit([table])
    batch = encode_table(table, schema, config.tasks)
    present = ~np.isnan(table.column("clk_partial").to_numpy(zero_copy_only=False))
    np.testing.assert_array_equal(batch.masks["ctr"].numpy(), present)
    np.testing.assert_allclose(
        batch.weights["ctr"].numpy(), np.where(present, table.column("w").to_numpy(), 0), rtol=1e-6
    )
    clicked = table.column("clk").to_numpy() == 1
    np.testing.assert_array_equal(batch.masks["cvr"].numpy(), clicked)
    np.testing.assert_array_equal(batch.weights["cvr"].numpy(), clicked.astype(np.float32))


@pytest.mark.parametrize(
    "task",
    [
        {"label": "clk_partial", "sample_weight": "zero"},  # every row weighs 0
        {"label": "nothing"},  # every label is missing
        {"label": "buy", "only_where": {"clk": 5}},  # no row is in the task's space
        {"label": "buy", "weight": 0.0},  # the task's loss weighs nothing in the total
    ],
    ids=["sample_weight", "missing_labels", "only_where", "task_weight"],
)
def test_rows_outside_a_task_do_not_train_it(
    tiny_dict: dict[str, Any], rich_data: Path, tmp_path: Path, task: dict[str, Any]
) -> None:
    """A task none of whose rows count gets no gradient: its tower keeps its initial weights,
    while the other task's tower trains."""
    table = pq.read_table(rich_data)
    table = table.append_column("zero", pa.array(np.zeros(table.num_rows)))
    table = table.append_column("nothing", pa.array(np.full(table.num_rows, np.nan)))
    data = tmp_path / "data.parquet"
    write_table(table, data)
    tiny_dict["tasks"][1] |= task
    tiny_dict["train"]["valid_fraction"] = 0.0
    run(tiny_dict, data, tmp_path / "run")
    loaded = load_run(tmp_path / "run")
    torch.manual_seed(tiny_dict["train"]["seed"])
    initial = build_model(loaded.config, loaded.schema).state_dict()
    trained = loaded.model.state_dict()
    for name, value in trained.items():
        if name.startswith("net.towers.1."):
            assert torch.equal(value, initial[name]), name
        if name.startswith("net.towers.0.") and name.endswith("weight"):
            assert not torch.equal(value, initial[name]), name


def test_only_where_metrics_use_the_task_space(
    tiny_dict: dict[str, Any], tiny_data: Path, tmp_path: Path
) -> None:
    tiny_dict["tasks"][1]["only_where"] = {"clk": 1}
    metrics = run(tiny_dict, tiny_data, tmp_path / "run")
    loaded = load_run(tmp_path / "run")
    valid = valid_rows(tiny_data, 3)
    scores = predict(loaded.model, encode_table(valid, loaded.schema, loaded.config.tasks))
    clicked = pc.equal(valid.column("clk"), 1).to_numpy(zero_copy_only=False)
    expected = roc_auc_score(valid.column("buy").to_numpy()[clicked], scores["probs_cvr"][clicked])
    assert metrics["best"]["auc_cvr"] == pytest.approx(expected)
    everywhere = roc_auc_score(valid.column("buy").to_numpy(), scores["probs_cvr"])
    assert everywhere != pytest.approx(expected)


# --------------------------------------------------------------------- regularisation, optimiser


def test_l2_shrinks_dense_weights_and_embedding_l2_shrinks_embeddings(
    tiny_dict: dict[str, Any], tiny_data: Path, tmp_path: Path
) -> None:
    def norms(run_dir: Path) -> tuple[float, float]:
        w = weights(run_dir)
        dense = sum(
            float((v**2).sum()) for k, v in w.items() if v.ndim >= 2 and ".tables." not in k
        )
        emb = sum(float((v**2).sum()) for k, v in w.items() if ".tables." in k)
        return dense, emb

    tiny_dict["train"]["epochs"] = 2
    run(tiny_dict, tiny_data, tmp_path / "plain")
    tiny_dict["model"]["l2"] = 0.05
    run(tiny_dict, tiny_data, tmp_path / "l2")
    tiny_dict["model"] |= {"l2": 0.0, "embedding_l2": 0.5}
    run(tiny_dict, tiny_data, tmp_path / "emb")
    plain, l2, emb = norms(tmp_path / "plain"), norms(tmp_path / "l2"), norms(tmp_path / "emb")
    assert l2[0] < 0.8 * plain[0]
    assert emb[1] < 0.8 * plain[1]
    assert emb[0] > 0.8 * plain[0]  # embedding_l2 leaves the dense weights alone


@pytest.mark.parametrize(
    ("train_options", "expected_lr"),
    [
        ({"lr_schedule": "constant"}, lambda lr, s: [lr, lr, lr]),
        ({"lr_schedule": "step", "step_gamma": 0.5}, lambda lr, s: [lr / 2, lr / 4, lr / 8]),
        ({"lr_schedule": "cosine"}, lambda lr, s: [0.75 * lr, 0.25 * lr, 0.0]),
        (
            {"warmup_steps": 1000, "optimizer": "adamw", "weight_decay": 0.01},
            # after k steps the next step's lr is lr * (k + 1) / warmup_steps
            lambda lr, s: [lr * (e * s + 1) / 1000 for e in (1, 2, 3)],
        ),
    ],
    ids=["constant", "step", "cosine", "warmup_adamw"],
)
def test_lr_schedules(
    tiny_dict: dict[str, Any],
    tiny_data: Path,
    tmp_path: Path,
    train_options: dict[str, Any],
    expected_lr: Any,
) -> None:
    tiny_dict["train"] |= {"epochs": 3, "batch_size": 1024} | train_options
    metrics = run(tiny_dict, tiny_data, tmp_path / "run")
    steps = metrics["steps_per_epoch"]
    got = [e["lr"] for e in metrics["epochs"]]
    want = expected_lr(tiny_dict["train"]["lr"], steps)
    if train_options.get("lr_schedule") == "cosine":  # lr after each epoch of 3: cos at 1/3, 2/3, 1
        want = [0.005 * 0.5 * (1 + np.cos(np.pi * e / 3)) for e in (1, 2, 3)]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-12)


# --------------------------------------------------------------------- network options by config


@pytest.mark.parametrize(
    "model",
    [
        {"experts": 1},
        {"gate": "shared", "gate_units": [4]},
        {"activation": "tanh", "dropout": 0.1, "batch_norm": True},
        {"senet": {"reduction_ratio": 2}},
        {"kind": "ple", "experts": 2, "task_experts": 1, "ple_layers": 2},
    ],
    ids=["shared_bottom", "omoe", "act_dropout_bn", "senet", "ple"],
)
def test_network_options_train(
    tiny_dict: dict[str, Any], tiny_data: Path, tmp_path: Path, model: dict[str, Any]
) -> None:
    tiny_dict["model"] |= model
    tiny_dict["train"]["epochs"] = 2
    metrics = run(tiny_dict, tiny_data, tmp_path / "run")
    first, second = (e["train_loss"]["total"] for e in metrics["epochs"])
    assert second < first
    loaded = load_run(tmp_path / "run")
    net: Any = loaded.model.net
    experts = metrics["gate_experts"]
    if model.get("kind") == "ple":
        assert experts == ["ctr.0", "cvr.0", "shared.0", "shared.1"] and len(net.layers) == 2
    else:
        assert len(experts) == model.get("experts", 3)
    if "senet" in model:
        assert loaded.model.senet is not None
    if model.get("gate") == "shared":
        assert metrics["gates"]["ctr"] == metrics["gates"]["cvr"]
    for task in ("ctr", "cvr"):
        assert sum(metrics["gates"][task]) == pytest.approx(1.0, abs=1e-5)


def test_groups_and_shared_embeddings(
    tiny_dict: dict[str, Any], tiny_data: Path, tmp_path: Path
) -> None:
    tiny_dict["features"] = [
        {"name": "user_id", "kind": "categorical", "embedding_dim": 4, "group": "user"},
        {"name": "age_level", "kind": "categorical", "embedding_dim": 2, "group": "user"},
        {"name": "item_id", "kind": "categorical", "embedding_dim": 4, "embedding_name": "items"},
        {"name": "tag_brand_list", "kind": "tags", "embedding_dim": 4, "embedding_name": "items"},
        {"name": "price", "kind": "numeric", "default": 0.0, "group": "unused"},
    ]
    tiny_dict["model"]["groups"] = ["user", "all"]
    run(tiny_dict, tiny_data, tmp_path / "run")
    loaded = load_run(tmp_path / "run")
    assert [f.name for f in loaded.schema.features] == [
        "user_id",
        "age_level",
        "item_id",
        "tag_brand_list",
    ]
    tables = [k for k in loaded.model.state_dict() if ".tables." in k]
    assert tables == [
        "embedding.tables.emb_user_id.weight",
        "embedding.tables.emb_age_level.weight",
        "embedding.tables.emb_items.weight",
    ]
    items = loaded.schema["item_id"].vocab
    assert items is not None  # brands and items: one vocab
    assert any(v.startswith("b") for v in items) and any(v.startswith("i") for v in items)


# ---------------------------------------------------------------------------- progress bar


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("progress", [True, False])
def test_progress_bar_on_a_terminal_shows_the_running_loss_per_task(
    tiny_dict: dict[str, Any],
    tiny_data: Path,
    tmp_path: Path,
    progress: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    tiny_dict["train"]["progress"] = progress
    run(tiny_dict, tiny_data, tmp_path / "run")
    err = terminal.getvalue()
    if progress:
        assert "epoch 1" in err and "ctr=" in err and "cvr=" in err and "loss=" in err
    else:
        assert err == ""


def test_off_a_terminal_one_line_per_epoch_and_no_bar(
    tiny_dict: dict[str, Any], tiny_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tiny_dict["train"] |= {"progress": True, "epochs": 3}
    run(tiny_dict, tiny_data, tmp_path / "run")
    captured = capsys.readouterr()
    assert captured.err == ""
    lines = [line for line in captured.out.splitlines() if line.startswith("epoch ")]
    assert [line.split(":")[0] for line in lines] == ["epoch 1", "epoch 2", "epoch 3"]
    assert all("train loss" in line and "auc_ctr=" in line for line in lines)


# ------------------------------------------------------------------------ best epoch, identity


def test_early_stopping_on_a_validation_metric_without_validation_rows_is_refused(
    tiny_dict: dict[str, Any], tiny_data: Path, tmp_path: Path
) -> None:
    tiny_dict["train"] |= {"valid_fraction": 0.0, "early_stopping": {"metric": "auc_ctr"}}
    with pytest.raises(ConfigError, match=r"train\.early_stopping\.metric: 'auc_ctr' is measured"):
        run(tiny_dict, tiny_data, tmp_path / "run")
    # with a validation file it trains
    valid = tmp_path / "valid.parquet"
    write_table(valid_rows(tiny_data, 3), valid)
    metrics = run(tiny_dict, tiny_data, tmp_path / "run", valid_path=valid)
    assert metrics["valid_rows"] > 0


def test_no_validation_rows_at_run_time_fall_back_to_the_training_loss(
    tiny_dict: dict[str, Any], tmp_path: Path
) -> None:
    """A fraction so small that no row is held out: a warning, and the training loss decides."""
    data = tmp_path / "few.parquet"
    write_table(synthetic_ranking(300, seed=2), data)
    tiny_dict["train"] |= {
        "valid_fraction": 1e-9,
        "epochs": 2,
        "early_stopping": {"metric": "auc_ctr", "patience": 1},
    }
    metrics = run(tiny_dict, data, tmp_path / "run")
    assert metrics["valid_rows"] == 0 and len(metrics["epochs"]) == 2
    (warning,) = metrics["warnings"]
    assert warning["warning"].startswith("train.early_stopping.metric: auc_ctr needs validation")
    losses = [e["train_loss"]["total"] for e in metrics["epochs"]]
    assert metrics["best_epoch"] == 1 + int(np.argmin(losses))


def test_a_nan_metric_does_not_freeze_the_best_epoch(
    tiny_dict: dict[str, Any], tiny_data: Path, tmp_path: Path
) -> None:
    """Validation rows with one class of `buy`: auc_cvr is NaN every epoch. Each such epoch is
    reported, and the kept weights are the latest (not epoch 1's forever)."""
    table = pq.read_table(tiny_data)
    valid = tmp_path / "valid.parquet"
    one_class = table.filter(pc.equal(table["buy"], 0)).slice(0, 500)
    write_table(one_class, valid)
    tiny_dict["train"] |= {"epochs": 3, "early_stopping": {"metric": "auc_cvr", "patience": 5}}
    metrics = run(tiny_dict, tiny_data, tmp_path / "run", valid_path=valid)
    assert all(np.isnan(e["valid"]["auc_cvr"]) for e in metrics["epochs"])
    assert [w["epoch"] for w in metrics["warnings"] if "NaN" in w["warning"]] == [1, 2, 3]
    assert metrics["best_epoch"] == 3


def test_a_nan_first_metric_keeps_the_latest_weights(
    tiny_dict: dict[str, Any], tiny_data: Path, tmp_path: Path
) -> None:
    """Without early stopping the first metric (auc_ctr) picks the epoch; on validation rows
    that are all clicks it is NaN every epoch, and the latest weights are kept."""
    table = pq.read_table(tiny_data)
    valid = tmp_path / "valid.parquet"
    write_table(table.filter(pc.equal(table["clk"], 1)).slice(0, 300), valid)
    tiny_dict["train"] |= {"epochs": 2}
    metrics = run(tiny_dict, tiny_data, tmp_path / "run", valid_path=valid)
    assert metrics["best_epoch"] == 2 and np.isnan(metrics["best"]["auc_ctr"])


def test_config_hash_ignores_progress_threads_and_cache(tiny_dict: dict[str, Any]) -> None:
    base = config_hash(parse_config(tiny_dict))
    tiny_dict["train"] |= {"progress": not tiny_dict["train"]["progress"], "threads": 3}
    tiny_dict["train"]["cache_mb"] = 0
    assert config_hash(parse_config(tiny_dict)) == base
    tiny_dict["train"]["lr"] = 0.5
    assert config_hash(parse_config(tiny_dict)) != base


def test_threads_apply_to_the_run_only(
    tiny_dict: dict[str, Any], tiny_data: Path, tmp_path: Path
) -> None:
    torch.set_num_threads(2)
    tiny_dict["train"]["threads"] = 1
    assert run(tiny_dict, tiny_data, tmp_path / "one")["threads"] == 1
    assert torch.get_num_threads() == 2
    del tiny_dict["train"]["threads"]
    assert run(tiny_dict, tiny_data, tmp_path / "default")["threads"] == 2


def test_schema_is_fitted_on_training_rows_only(tiny_data: Path, tmp_path: Path) -> None:
    config = parse_config(
        {
            "features": [{"name": "user_id", "kind": "categorical"}],
            "tasks": [{"name": "ctr", "label": "clk"}],
            "train": {"valid_fraction": 0.5, "seed": 1},
        }
    )
    schema, rows = Trainer(config, tiny_data, tmp_path / "run").fit_schema()
    table = pq.read_table(tiny_data)
    held = held_out(1, 0, table.num_rows, 0.5)
    train_users = set(table.column("user_id").filter(pa.array(~held)).to_pylist())
    assert rows == int((~held).sum())
    assert set(schema["user_id"].vocab or []) == train_users
    assert isinstance(schema, FeatureSchema)
