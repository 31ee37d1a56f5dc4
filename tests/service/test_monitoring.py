"""Monitoring what the model sees (service/monitoring.py, docs/monitoring.md): with real server
processes, the feature-value counters move by exactly the values sent, the gate weights add up
to the rows scored, the references in /metadata are the validation rows' and the live series
over those same rows reproduce them, and each piece turned off removes its series; in process,
the bulk histogram update and the recorder's weighting of context inputs."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from mmoe.contract.metadata import FeatureInfo, ModelMetadata, MonitorInfo, TaskInfo
from mmoe.service.monitoring import SCORE_BUCKETS, MonitoringMetrics, Watched, observe_many
from tests.metrics import by_labels, delta, scrape
from tests.server import ServerProcess

FEATURE_SERIES = ("mmoe_feature_values_total", "mmoe_feature_reference_rate")
GATE_SERIES = ("mmoe_gate_weight_total", "mmoe_gate_weight_reference")
SCORE_SERIES = ("mmoe_score_count", "mmoe_score_bucket", "mmoe_score_mean_reference")


def predict(server: ServerProcess, body: dict[str, Any]) -> dict[str, Any]:
    r = httpx.post(f"{server.url}/predict", json=body, timeout=60)
    assert r.status_code == 200, r.text
    result: dict[str, Any] = r.json()
    return result


def schema(run: Path) -> dict[str, Any]:
    features = json.loads((run / "schema.json").read_text())["features"]
    return {f["name"]: f for f in features}


# ------------------------------------------------------------------------ a known batch


def test_a_batch_moves_each_counter_by_exactly_its_values(
    server: ServerProcess, tiny_run: Path
) -> None:
    fitted = schema(tiny_run)
    users, categories = fitted["user_id"]["vocab"], fitted["category"]["vocab"]
    tags = fitted["tag_brand_list"]["vocab"]
    assert len(tags) >= 5
    body = {
        # One value for the four candidates: an unknown age level, four times.
        "context": {"age_level": "no-such-level"},
        "candidates": {
            "user_id": [users[0], "unknown-user", users[1], ""],
            "item_id": ["i1", None, "i3", ""],  # hashed: known or default, never oov
            "category": [categories[0], "new-category", categories[1], "another-new"],
            "price": [1.5, None, 2.0, None],
            # hour left out: its default in every row
            "tag_brand_list": [[tags[0], "unknown-tag"], [], None, tags[:5]],  # max_len 4
        },
    }
    before = scrape(server)
    predict(server, body)
    moved = delta(before, scrape(server), "mmoe_feature_values_total", "feature", "outcome")
    expected = {
        ("user_id", "known"): 2,
        ("user_id", "oov"): 1,
        ("user_id", "default"): 1,  # "" is a missing id
        ("item_id", "known"): 2,
        ("item_id", "default"): 2,
        ("category", "known"): 2,
        ("category", "oov"): 2,
        ("category", "default"): 0,
        ("age_level", "known"): 0,
        ("age_level", "oov"): 4,
        ("age_level", "default"): 0,
        ("price", "known"): 2,
        ("price", "default"): 2,
        ("hour", "known"): 0,
        ("hour", "default"): 4,
        # ids: 1 known + 1 unknown, then the first 4 of 5 known; 2 rows without ids
        ("tag_brand_list", "known"): 5,
        ("tag_brand_list", "oov"): 1,
        ("tag_brand_list", "default"): 2,
    }
    assert moved == expected


def test_gate_weights_add_up_to_the_rows_scored_per_task(
    server: ServerProcess, tiny_run: Path
) -> None:
    users = schema(tiny_run)["user_id"]["vocab"]
    before = scrape(server)
    for n in (1, 5, 37):
        predict(server, {"candidates": {"user_id": users[:n], "category": ["c1"] * n}})
    moved = delta(before, scrape(server), "mmoe_gate_weight_total", "task", "expert")
    metrics = json.loads((tiny_run / "metrics.json").read_text())
    experts = metrics["gate_experts"]
    assert {e for _, e in moved} == set(experts)
    for task in ("ctr", "cvr"):
        per_expert = [moved[(task, e)] for e in experts]
        assert all(w > 0 for w in per_expert)
        assert sum(per_expert) == pytest.approx(1 + 5 + 37, rel=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("batching", ["direct", "merged"])
def test_context_given_once_counts_once_per_candidate(
    start_server: Callable[..., ServerProcess],
    tiny_context_onnx: Path,
    tiny_context_run: Path,
    batching: str,
) -> None:
    # Merged: concurrent requests in one runtime call, their contexts broadcast to their rows.
    merged = {"MMOE_BATCH_MAX_ROWS": "1024", "MMOE_BATCH_WAIT_MS": "500"}
    server = start_server(tiny_context_onnx, env=merged if batching == "merged" else {})
    fitted = schema(tiny_context_run)
    users, categories = fitted["user_id"]["vocab"], fitted["category"]["vocab"]
    tags = fitted["tag_brand_list"]["vocab"]
    body = {
        "context": {
            "user_id": users[0],
            "age_level": "no-such-level",
            "tag_brand_list": [tags[0], "unknown-tag"],
            # hour left out: its default, given once
        },
        "candidates": {"category": [categories[0], "new-category", *categories[1:4]]},
    }
    before = scrape(server)
    with ThreadPoolExecutor(4) as pool:
        for result in pool.map(lambda _: predict(server, body), range(4)):
            assert result["n"] == 5
    after = scrape(server)
    moved = delta(before, after, "mmoe_feature_values_total", "feature", "outcome")
    rows = 4 * 5
    assert {k: v for k, v in moved.items() if v} == {
        ("user_id", "known"): rows,
        ("item_id", "default"): rows,
        ("category", "known"): 4 * 4,
        ("category", "oov"): 4,
        ("age_level", "oov"): rows,
        ("price", "default"): rows,
        ("hour", "default"): rows,
        ("tag_brand_list", "known"): rows,
        ("tag_brand_list", "oov"): rows,
    }
    gates = delta(before, after, "mmoe_gate_weight_total", "task", "expert")
    for task in ("ctr", "cvr"):
        assert sum(w for (t, _), w in gates.items() if t == task) == pytest.approx(rows, rel=1e-6)
    (runs,) = delta(before, after, "mmoe_runtime_batch_rows_count").values()
    assert runs < 4 if batching == "merged" else runs == 4


# ---------------------------------------------------------------- the validation rows


def validation_rows(run: Path, data: Path) -> list[dict[str, Any]]:
    """The run's validation rows, as the trainer held them out, restricted to the features."""
    from mmoe.model.batches import BatchStream
    from mmoe.model.checkpoint import load_run
    from mmoe.model.data import DataSource

    config = load_run(run).config
    table = BatchStream(config, DataSource(data, config)).valid_table()
    assert table is not None
    names = [f.name for f in config.input_features]
    rows = table.select(names).to_pylist()
    return [
        {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in row.items()}
        for row in rows
    ]


def count_outcomes(f: dict[str, Any], values: list[Any]) -> dict[str, int]:
    """The counting rule of docs/monitoring.md, written out plainly."""
    counts = {"known": 0, "oov": 0, "default": 0}
    vocab = set(f["vocab"]) if f.get("vocab") is not None else None
    for v in values:
        if f["kind"] == "numeric":
            counts["default" if v is None else "known"] += 1
        elif f["kind"] == "tags":
            if v is None:
                v = f["default"] or []
            if isinstance(v, str):
                v = v.split(f["separator"])
            ids = [str(t) for t in v if str(t) != ""][: f["max_len"]]
            if not ids:
                counts["default"] += 1
            for t in ids:
                counts["oov" if vocab is not None and t not in vocab else "known"] += 1
        else:
            s = (f["default"] or "") if v is None else str(v)
            if s in ("", f["default"]):
                counts["default"] += 1
            elif vocab is not None and s not in vocab:
                counts["oov"] += 1
            else:
                counts["known"] += 1
    return counts


@pytest.mark.slow
def test_references_are_the_validation_rows_and_live_series_reproduce_them(
    server: ServerProcess, tiny_run: Path, tiny_data: Path
) -> None:
    rows = validation_rows(tiny_run, tiny_data)
    fitted = schema(tiny_run)
    monitor = httpx.get(f"{server.url}/metadata").json()["monitor"]
    reference = monitor["reference"]
    assert reference["rows"] == len(rows)

    # The reference rates are the validation rows' shares of values per outcome.
    for name, f in fitted.items():
        counts = count_outcomes(f, [r[name] for r in rows])
        total = sum(counts.values())
        want = {k: c / total for k, c in counts.items()}
        got = reference["features"][name]
        assert got["known"] == pytest.approx(want["known"], abs=1e-12), name
        assert got["default"] == pytest.approx(want["default"], abs=1e-12), name
        if f.get("vocab") is None:
            assert got["oov"] is None, name
        else:
            assert got["oov"] == pytest.approx(want["oov"], abs=1e-12), name

    # The same rows through the server: the counters, the scores and the gate weights give
    # back the references.
    before = scrape(server)
    scores = predict(server, {"instances": rows})["scores"]
    after = scrape(server)
    values = delta(before, after, "mmoe_feature_values_total", "feature", "outcome")
    for name, rates in reference["features"].items():
        seen = sum(v for (feature, *_), v in values.items() if feature == name)
        for outcome, rate in rates.items():
            live = values.get((name, outcome), 0.0) / seen
            assert live == pytest.approx(rate or 0.0, abs=1e-12), (name, outcome)
    for task, (mean,) in reference["scores"].items():
        assert float(np.mean(scores[task])) == pytest.approx(mean, abs=1e-5), task
    gates = delta(before, after, "mmoe_gate_weight_total", "task", "expert")
    for task, means in reference["gates"].items():
        for expert, mean in zip(monitor["experts"], means, strict=True):
            assert gates[(task, expert)] / len(rows) == pytest.approx(mean, abs=1e-5)

    # And the service exports them as the references of the recording rules.
    ref_rates = by_labels(after, "mmoe_feature_reference_rate", "feature", "outcome")
    assert ref_rates[("user_id", "oov")] == reference["features"]["user_id"]["oov"]
    ref_scores = by_labels(after, "mmoe_score_mean_reference", "task")
    assert ref_scores == {(t,): m for t, (m,) in reference["scores"].items()}
    ref_gates = by_labels(after, "mmoe_gate_weight_reference", "task", "expert")
    assert ref_gates[("ctr", monitor["experts"][0])] == reference["gates"]["ctr"][0]


def test_scores_fill_the_histogram(server: ServerProcess) -> None:
    before = scrape(server)
    body = {"candidates": {"user_id": ["u1", "u2", "u3"], "category": ["c1", "c2", "c3"]}}
    scores = predict(server, body)["scores"]
    after = scrape(server)
    for task, values in scores.items():
        count = delta(before, after, "mmoe_score_count", "task")[(task,)]
        total = delta(before, after, "mmoe_score_sum", "task")[(task,)]
        assert count == 3
        assert total == pytest.approx(sum(values), rel=1e-6)
        buckets = delta(before, after, "mmoe_score_bucket", "task", "le")
        for bound in SCORE_BUCKETS:
            in_bucket = buckets[(task, str(bound))]
            assert in_bucket == sum(v <= bound for v in values), (task, bound)


# ------------------------------------------------------------------ turning pieces off


@pytest.mark.slow
@pytest.mark.parametrize(
    ("setting", "removed"),
    [("FEATURES", FEATURE_SERIES), ("GATES", GATE_SERIES), ("SCORES", SCORE_SERIES)],
)
def test_each_piece_turned_off_removes_its_series(
    start_server: Callable[..., ServerProcess],
    tiny_onnx: Path,
    setting: str,
    removed: tuple[str, ...],
) -> None:
    server = start_server(tiny_onnx, env={f"MMOE_MONITOR_{setting}": "false"})
    predict(server, {"candidates": {"user_id": ["u1", "u2"], "category": ["c1", "c2"]}})
    names = {name for name, _ in scrape(server)}
    everything = {*FEATURE_SERIES, *GATE_SERIES, *SCORE_SERIES}
    assert names & everything == everything - set(removed)
    text = httpx.get(f"{server.url}/metrics").text
    for name in removed:
        assert name.removesuffix("_total").removesuffix("_count").removesuffix("_bucket") not in (
            text
        )


@pytest.mark.slow
def test_a_file_without_monitoring_outputs_is_served_with_scores_watched(
    start_server: Callable[..., ServerProcess],
    tiny_plain_onnx: Path,
) -> None:
    server = start_server(tiny_plain_onnx)
    assert httpx.get(f"{server.url}/metadata").json()["monitor"] is None
    body = {"candidates": {"user_id": ["u1", "u2"], "category": ["c1", "c2"]}}
    assert predict(server, body)["n"] == 2
    names = {name for name, _ in scrape(server)}
    assert not names & {*FEATURE_SERIES, *GATE_SERIES, "mmoe_score_mean_reference"}
    assert by_labels(scrape(server), "mmoe_score_count", "task") == {("ctr",): 2, ("cvr",): 2}


# ------------------------------------------------------------------------- in process


def test_observe_many_is_observe_for_each_value() -> None:
    rng = np.random.default_rng(5)
    values = np.concatenate(
        [rng.random(500), np.array(SCORE_BUCKETS), [0.0, 1.0, 1.5, -0.25]]
    ).astype(np.float32)
    texts = []
    for bulk in (False, True):
        registry = CollectorRegistry()
        h = Histogram("s", "s", ["task"], buckets=SCORE_BUCKETS, registry=registry)
        child = h.labels("ctr")
        if bulk:
            observe_many(child, values)
        else:
            for v in values.tolist():
                child.observe(v)
        texts.append(
            [
                line
                for line in generate_latest(registry).decode().splitlines()
                if "_created" not in line
            ]
        )
    buckets, sums = [], []
    for text in texts:
        buckets.append([line for line in text if "_bucket" in line or "_count" in line])
        sums.append(float(next(line for line in text if line.startswith("s_sum")).split()[-1]))
    assert buckets[0] == buckets[1]
    assert sums[1] == pytest.approx(sums[0], rel=1e-9)


def test_a_context_value_given_once_counts_once_per_row() -> None:
    features = [
        FeatureInfo(name="user", kind="categorical", dtype="string"),
        FeatureInfo(name="price", kind="numeric", dtype="float32", default=0.0),
    ]
    meta = ModelMetadata(
        name="m",
        version="1",
        features=features,
        tasks=[TaskInfo(name="ctr", kind="binary", output="probs_ctr")],
        monitor=MonitorInfo(
            feature_values="monitor/feature_values",
            features=["user", "price"],
            vocabulary=["user"],
        ),
    )
    registry = CollectorRegistry()
    recorder = MonitoringMetrics(registry, Watched()).monitor(meta, "m", "1")
    assert recorder.outputs == ["monitor/feature_values"]
    feeds = {
        "user": np.array(["u1"], dtype=object),  # context: one value for the 3 rows
        "price": np.array([1.0, np.nan, 2.0], dtype=np.float32),
    }
    outputs: dict[str, np.ndarray] = {
        "monitor/feature_values": np.array([[0, 1, 0], [2, 0, 1]], dtype=np.int64),
        "probs_ctr": np.array([0.1, 0.2, 0.3], dtype=np.float32),
    }
    recorder.record(feeds, outputs)
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(generate_latest(registry).decode())
        for s in family.samples
        if s.name == "mmoe_feature_values_total"
    }
    model = (("model", "m"), ("version", "1"))

    def labels(feature: str, outcome: str) -> tuple[tuple[str, str], ...]:
        return tuple(sorted((("feature", feature), ("outcome", outcome), *model)))

    def value(feature: str, outcome: str) -> float:
        return samples[("mmoe_feature_values_total", labels(feature, outcome))]

    assert value("user", "oov") == 3
    assert value("user", "known") == value("user", "default") == 0
    assert (value("price", "known"), value("price", "default")) == (2, 1)
    # A feature without a vocabulary has no oov series.
    assert not any(found == labels("price", "oov") for _, found in samples)
