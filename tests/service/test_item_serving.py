"""Item features held by a real server (MMOE_ITEMS): a request sending the candidates' ids alone
scores as the same request with every item feature inline, over /predict (columns and rows)
and KServe V2 (HTTP and gRPC); a feature sent inline overrides the table; an id the table lacks
takes the defaults and is counted; a new table swaps in under load with no failed request, a
bad one is refused while the old one serves; with Redis, an outage and a restart under load
answer no 5xx."""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tritonclient.grpc as triton_grpc

from tests.metrics import scrape, value
from tests.redis_server import RedisServer
from tests.server import ServerProcess
from tests.service.test_grpc import GrpcServer

# tiny_context_onnx's candidate features (the user's fields, hour and tags are context).
ITEMS: dict[str, list[Any]] = {
    "item_id": ["i1", "i2", "i3", "i4"],
    "category": ["c1", "c7", "c1", "c2"],
    "price": [12.5, 1.0, None, 300.0],
}
CONTEXT: dict[str, Any] = {"user_id": "u12", "age_level": 3, "hour": 9.5, "tag_brand_list": "b1|b3"}


def write_table(path: Path, columns: dict[str, list[Any]]) -> Path:
    staged = path.with_name(f".{path.name}.partial")
    pq.write_table(pa.table(columns), staged)
    staged.replace(path)  # as `mmoe items build` writes it: beside, then renamed over
    return path


def scores(server: ServerProcess, body: dict[str, Any]) -> dict[str, np.ndarray]:
    r = httpx.post(f"{server.url}/predict", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return {task: np.array(v) for task, v in r.json()["scores"].items()}


def same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert a.keys() == b.keys()
    for task in a:
        np.testing.assert_allclose(a[task], b[task], rtol=0, atol=1e-5)


@contextlib.contextmanager
def posting(server: ServerProcess, body: dict[str, Any]) -> Iterator[Counter[int]]:
    """/predict with `body` sent in a closed loop on one connection while the block runs: the
    count of each status code, complete once the block has left."""
    stop = threading.Event()
    outcomes: Counter[int] = Counter()

    def load() -> None:
        with httpx.Client(timeout=60) as client:
            while not stop.is_set():
                outcomes[client.post(f"{server.url}/predict", json=body).status_code] += 1

    thread = threading.Thread(target=load)
    thread.start()
    try:
        yield outcomes
    finally:
        stop.set()
        thread.join()


@pytest.fixture(scope="module")
def table_server(
    tiny_context_onnx: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[GrpcServer, Path]]:
    tmp = tmp_path_factory.mktemp("items")
    table = write_table(tmp / "items.parquet", ITEMS)
    env = {"MMOE_ITEMS": str(table)}
    with GrpcServer(tiny_context_onnx, env, tmp / "server.log") as server:
        yield server, table


@pytest.mark.slow
def test_ids_alone_score_as_the_inline_request(table_server: tuple[GrpcServer, Path]) -> None:
    server, table = table_server
    inline = scores(server, {"context": CONTEXT, "candidates": ITEMS})
    ids = {"item_id": ITEMS["item_id"]}
    same(scores(server, {"context": CONTEXT, "candidates": ids}), inline)
    rows = [{**CONTEXT, "item_id": i} for i in ITEMS["item_id"]]
    same(scores(server, {"instances": rows}), inline)
    # An override wins over the table, for that request only.
    override = {**ids, "price": [5.0] * 4}
    same(
        scores(server, {"context": CONTEXT, "candidates": override}),
        scores(server, {"context": CONTEXT, "candidates": {**ITEMS, "price": [5.0] * 4}}),
    )
    mixed = [dict(r) for r in rows]
    mixed[1]["category"] = "c-other"  # one row sends its own category
    want = scores(
        server,
        {"context": CONTEXT, "candidates": {**ITEMS, "category": ["c1", "c-other", "c1", "c2"]}},
    )
    same(scores(server, {"instances": mixed}), want)

    # Over KServe V2, HTTP and gRPC: the key as a BYTES input.
    inputs: list[dict[str, Any]] = [
        {"name": "item_id", "shape": [4], "datatype": "BYTES", "data": ITEMS["item_id"]},
        {"name": "user_id", "shape": [1], "datatype": "BYTES", "data": ["u12"]},
        {"name": "age_level", "shape": [1], "datatype": "BYTES", "data": ["3"]},
        {"name": "hour", "shape": [1], "datatype": "FP32", "data": [9.5]},
        {"name": "tag_brand_list", "shape": [1, 2], "datatype": "BYTES", "data": ["b1", "b3"]},
    ]
    r = httpx.post(f"{server.url}/v2/models/tiny/infer", json={"inputs": inputs}, timeout=60)
    assert r.status_code == 200, r.text
    v2 = {
        o["name"].removeprefix("probs_"): np.array(o["data"])
        for o in r.json()["outputs"]
        if o["name"].startswith("probs_")
    }
    same(v2, inline)
    with server.client() as client:
        tensors = []
        for i in inputs:
            t = triton_grpc.InferInput(i["name"], i["shape"], i["datatype"])
            dtype = np.float32 if i["datatype"] == "FP32" else object
            t.set_data_from_numpy(np.array(i["data"], dtype=dtype).reshape(i["shape"]))
            tensors.append(t)
        result = client.infer("tiny", tensors)
    for task in inline:
        np.testing.assert_allclose(result.as_numpy(f"probs_{task}"), inline[task], atol=1e-5)

    meta = httpx.get(f"{server.url}/metadata").json()["items"]
    assert meta["source"] == str(table) and meta["rows"] == 4 and meta["key"] == "item_id"
    assert meta["loaded_at"] and meta["error"] is None


@pytest.mark.slow
def test_an_id_missing_from_the_table_gets_the_defaults_and_is_counted(
    table_server: tuple[GrpcServer, Path],
) -> None:
    server, _ = table_server
    before = scrape(server)
    got = scores(server, {"context": CONTEXT, "candidates": {"item_id": ["i1", "no-such-item"]}})
    after = scrape(server)
    for outcome, n in (("hit", 1), ("miss", 1)):
        counted = value(after, "mmoe_item_lookups_total", outcome=outcome) - value(
            before, "mmoe_item_lookups_total", outcome=outcome
        )
        assert counted == n, outcome
    # The defaults: price's (1.0); category has none: what the graph reads as unknown, "".
    inline = {"item_id": ["i1", "no-such-item"], "category": ["c1", ""], "price": [12.5, 1.0]}
    same(got, scores(server, {"context": CONTEXT, "candidates": inline}))
    # A request without the key column fills nothing: the usual rules apply.
    r = httpx.post(
        f"{server.url}/predict", json={"context": CONTEXT, "candidates": {"price": [1.0]}}
    )
    assert r.status_code == 422 and r.json()["error"]["field"] == "candidates.category", r.text


@pytest.mark.slow
def test_a_new_table_swaps_in_under_load_and_a_bad_one_is_refused(
    start_server: Callable[..., ServerProcess], tiny_context_onnx: Path, tmp_path: Path
) -> None:
    table = write_table(tmp_path / "items.parquet", ITEMS)
    env = {"MMOE_ITEMS": str(table), "MMOE_ITEMS_KEY": "item_id"}
    server = start_server(tiny_context_onnx, env=env)
    ids = {"context": CONTEXT, "candidates": {"item_id": ["i1", "i2"]}}
    first = scores(server, ids)
    with posting(server, ids) as outcomes:
        write_table(table, {**ITEMS, "price": [99.0, 98.0, 97.0, 96.0]})
        r = httpx.post(f"{server.url}/admin/reload", timeout=120)
        assert r.status_code == 200 and r.json()["items_error"] is None, r.text
        changed = scores(server, ids)
        assert not np.allclose(changed["ctr"], first["ctr"])
        # A bad table: a column the model does not take. Refused; the last good one serves.
        write_table(table, {**ITEMS, "colour": ["red"] * 4})
        r = httpx.post(f"{server.url}/admin/reload", timeout=120)
        assert r.status_code == 200 and "colour" in r.json()["items_error"], r.text
        same(scores(server, ids), changed)
        server.signal(signal.SIGHUP)  # the same refusal
        time.sleep(0.5)
    assert set(outcomes) == {200}, outcomes
    meta = httpx.get(f"{server.url}/metadata").json()["items"]
    assert "colour" in meta["error"]


@pytest.mark.slow
def test_redis_killed_and_restarted_under_load_answers_no_5xx(
    start_server: Callable[..., ServerProcess],
    tiny_context_onnx: Path,
    tmp_path: Path,
    redis_server: RedisServer,
) -> None:
    from tests.cli import mmoe

    table = write_table(tmp_path / "items.parquet", ITEMS)
    mmoe("items", "push", "--data", str(table), "--key", "item_id", "--redis", redis_server.url)
    env = {"MMOE_ITEMS": redis_server.url, "MMOE_ITEMS_TTL_S": "0.2"}
    server = start_server(tiny_context_onnx, env=env)
    inline = scores(server, {"context": CONTEXT, "candidates": ITEMS})
    ids = {"context": CONTEXT, "candidates": {"item_id": ITEMS["item_id"]}}
    same(scores(server, ids), inline)
    with posting(server, ids) as outcomes:
        time.sleep(0.5)
        redis_server.kill()
        time.sleep(1.0)
        redis_server.start()  # empty: what it held is gone
        mmoe("items", "push", "--data", str(table), "--key", "item_id", "--redis", redis_server.url)
        time.sleep(1.5)
    assert set(outcomes) == {200}, outcomes
    samples = scrape(server)
    assert value(samples, "mmoe_item_lookups_total", outcome="hit") > 0
    assert (
        value(samples, "mmoe_item_lookups_total", outcome="stale")
        + value(samples, "mmoe_item_lookups_total", outcome="error")
        > 0
    )
    same(scores(server, ids), inline)  # recovered
