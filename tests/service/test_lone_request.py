"""A request alone on the whole server runs on every core: each worker has a second session of the
file on more threads (MMOE_LONE_REQUEST_THREADS), sharing the weights of the first, and a call
takes it only while no other request is in progress anywhere on the server (CpuShare)."""

from __future__ import annotations

import json
import multiprocessing
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from mmoe.service.cpu_share import QUIET_S, CpuShare
from mmoe.service.predictor import Predictor, warmup_feeds
from mmoe.service.weights import large_initializers
from tests.server import ServerProcess
from tests.service.test_workers import BODY, scrape, value

# The test model's hashed item ids take rows 0..1000 of this table; rows added after them are
# never looked up, so the scores (and the file's golden rows) stay as exported.
TABLE = "net/logits.embedding.tables.emb_item_id.weight"
ADDED_ROWS = 2_500_000  # x 4 float32: 40 MB


@pytest.fixture(scope="module")
def heavy_onnx(tiny_onnx: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The test model with a 40 MB embedding table, so that a copy of the weights shows in RSS."""
    model = onnx.load(tiny_onnx)
    for i, init in enumerate(model.graph.initializer):
        if init.name == TABLE:
            table = numpy_helper.to_array(init)
            extra = np.random.default_rng(0).normal(size=(ADDED_ROWS, table.shape[1]))
            grown = np.concatenate([table, extra.astype(table.dtype)])
            model.graph.initializer[i].CopyFrom(numpy_helper.from_array(grown, TABLE))
    out = tmp_path_factory.mktemp("heavy") / "model.onnx"
    onnx.save(model, out)
    return out


def test_the_weights_read_are_those_onnx_reads(tiny_onnx: Path) -> None:
    ours = large_initializers(tiny_onnx, min_bytes=1)
    model = onnx.load(tiny_onnx)
    theirs = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer if i.raw_data}
    assert ours.keys() == theirs.keys() and TABLE in ours
    for name, array in ours.items():
        assert array.dtype == theirs[name].dtype and array.shape == theirs[name].shape, name
        assert np.array_equal(array, theirs[name]), name
    small = large_initializers(tiny_onnx, min_bytes=10_000)
    assert TABLE in small and len(small) < len(ours)  # [1001, 4] float32 is 16 kB


def test_a_file_that_is_not_onnx_gives_no_weights(tmp_path: Path) -> None:
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x0f\xff not protobuf" * 100)
    assert large_initializers(junk, 1) == {}
    assert large_initializers(tmp_path / "missing.onnx", 1) == {}


def test_the_lone_session_scores_as_the_other(tiny_onnx: Path) -> None:
    predictor = Predictor(tiny_onnx, "cpu", intra_op_threads=1, lone_threads=2)
    assert predictor.lone_session is not None and predictor.lone_threads == 2
    feeds = warmup_feeds(predictor.meta.features, 200)
    shared, lone = predictor.run(feeds), predictor.run(feeds, lone=True)
    for name in predictor.outputs:
        np.testing.assert_allclose(lone[name], shared[name], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    ("intra", "lone", "provider"), [(1, 1, "cpu"), (2, 2, "cpu"), (0, 2, "cpu"), (1, 0, "cpu")]
)
def test_no_lone_session_where_it_has_no_more_threads(
    tiny_onnx: Path, intra: int, lone: int, provider: str
) -> None:
    predictor = Predictor(tiny_onnx, provider, intra_op_threads=intra, lone_threads=lone)
    assert predictor.lone_session is None and predictor.lone_threads == 0
    feeds = warmup_feeds(predictor.meta.features, 8)
    assert predictor.run(feeds, lone=True).keys() == predictor.run(feeds).keys()


_RSS = """
import json, sys
from mmoe.service.predictor import Predictor
p = Predictor(sys.argv[1], "cpu", intra_op_threads=1, lone_threads=int(sys.argv[2]))
rss = int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0])
print(json.dumps({"kib": rss, "lone": p.lone_threads}))
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads RSS from /proc")
def test_two_sessions_hold_the_weights_once(heavy_onnx: Path) -> None:
    def loaded(lone: int) -> dict[str, int]:
        out = subprocess.run(
            [sys.executable, "-c", _RSS, str(heavy_onnx), str(lone)],
            capture_output=True,
            text=True,
            check=True,
        )
        result: dict[str, int] = json.loads(out.stdout.splitlines()[-1])
        return result

    one, two = loaded(1), loaded(2)
    assert (one["lone"], two["lone"]) == (0, 2)
    table_kib = ADDED_ROWS * 4 * 4 // 1024
    # A second copy of the table would add 39,000 KiB; the second session adds a few MB.
    assert two["kib"] - one["kib"] < table_kib // 4, (one, two)


def test_alone_means_no_other_request_anywhere_on_the_server() -> None:
    parent = CpuShare.for_supervisor(3, multiprocessing.get_context("spawn"))
    me, sibling = CpuShare.for_worker(parent.slots, 0), CpuShare.for_worker(parent.slots, 2)
    assert me.alone()  # nothing in progress: a call made now would be the only one
    with me.request():
        assert me.alone() and not sibling.alone()  # the sibling sees this worker's request
        with me.request():
            assert not me.alone()  # two in this worker
        with sibling.request():
            assert not me.alone() and not sibling.alone()
        assert not me.alone()  # the sibling was busy a moment ago: its next request may come
        time.sleep(QUIET_S * 2)
        assert me.alone()
    assert list(parent.slots[:3]) == [0, 0, 0] and me.alone()
    unfinished = sibling.request()  # a request the sibling never finishes: it dies with it
    unfinished.__enter__()
    assert not me.alone()
    parent.forget(2)
    assert me.alone()
    with pytest.raises(RuntimeError, match="supervisor"):
        parent.alone()
    single = CpuShare.single_process()  # its own count only
    with single.request():
        assert single.alone()


LONE = {"MMOE_WORKERS": "2", "MMOE_INTRA_OP_THREADS": "1", "MMOE_LONE_REQUEST_THREADS": "2"}


@pytest.mark.parametrize(("threads", "expected"), [("2", 2), ("1", 0)])
def test_requests_one_at_a_time_run_on_the_lone_session(
    start_server: Callable[..., ServerProcess],
    tiny_context_onnx: Path,
    threads: str,
    expected: int,
) -> None:
    server = start_server(tiny_context_onnx, env=LONE | {"MMOE_LONE_REQUEST_THREADS": threads})
    meta = httpx.get(f"{server.url}/metadata").json()
    assert meta["batching"]["lone_request_threads"] == expected
    before = scrape(server)
    sent = 12
    with httpx.Client() as client:
        scores = [client.post(f"{server.url}/predict", json=BODY).json() for _ in range(sent)]
    assert all(s["scores"] == scores[0]["scores"] for s in scores)
    after = scrape(server)
    calls = value(after, "mmoe_runtime_seconds_count") - value(before, "mmoe_runtime_seconds_count")
    lone = value(after, "mmoe_runtime_lone_calls_total") - value(
        before, "mmoe_runtime_lone_calls_total"
    )
    assert calls == sent
    assert lone == (sent if expected else 0)
