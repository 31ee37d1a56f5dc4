"""Reloading the model (POST /admin/reload and SIGHUP) on a server under load: a file that does
not load or fails its warm-up is rejected while the old model keeps serving every request, and a
good file swaps in without a failed request."""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx
import onnx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from mmoe.contract.metadata import METADATA_KEY
from tests.metrics import scrape, value
from tests.server import ServerProcess

BODY = {"context": {"user_id": "u1", "age_level": 2}, "candidates": {"category": ["c1"] * 16}}


def rewrite_metadata(src: Path, dst: Path, change: Callable[[dict[str, Any]], None]) -> Path:
    """A copy of `src` whose metadata JSON went through `change`."""
    model = onnx.load(str(src))
    (prop,) = [p for p in model.metadata_props if p.key == METADATA_KEY]
    meta = json.loads(prop.value)
    change(meta)
    prop.value = json.dumps(meta)
    onnx.save(model, str(dst))
    return dst


def version_8(src: Path, dst: Path) -> Path:
    return rewrite_metadata(src, dst, lambda meta: meta.update(version="8"))


def fails_warmup(src: Path, dst: Path) -> Path:
    """A loadable file whose metadata calls a string input numeric: the warm-up run fails."""

    def change(meta: dict[str, Any]) -> None:
        meta["features"][0].update(kind="numeric", dtype="float32", default=0.0)

    return rewrite_metadata(src, dst, change)


def replace(path: Path, data: bytes) -> None:
    """Write the file the way a deployment should: all at once, by rename."""
    staged = path.with_name(path.name + ".staged")
    staged.write_bytes(data)
    staged.replace(path)


class Load:
    """Threads scoring BODY back to back until the block ends; every status and model version
    is kept."""

    def __init__(self, server: ServerProcess, threads: int = 3) -> None:
        self.server = server
        self.results: list[tuple[int, str]] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run) for _ in range(threads)]

    def _run(self) -> None:
        with httpx.Client(base_url=self.server.url, timeout=30) as client:
            while not self._stop.is_set():
                r = client.post("/predict", json=BODY)
                version = r.json()["model"]["version"] if r.status_code == 200 else r.text
                self.results.append((r.status_code, version))

    def wait_for_requests(self, count: int) -> None:
        target = len(self.results) + count
        deadline = time.monotonic() + 30
        while len(self.results) < target:
            assert time.monotonic() < deadline, "load made no progress"
            time.sleep(0.01)

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        self.wait_for_requests(3)
        return self

    def __exit__(
        self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        for t in self._threads:
            t.join()

    @property
    def failures(self) -> list[tuple[int, str]]:
        return [r for r in self.results if r[0] != 200]


@pytest.fixture
def model_dir(tiny_onnx: Path, tmp_path: Path) -> Path:
    """A model directory holding model.onnx (the tiny model, version 7)."""
    root = tmp_path / "models"
    root.mkdir()
    shutil.copy(tiny_onnx, root / "model.onnx")
    return root


def served_version(server: ServerProcess) -> str:
    r = httpx.get(f"{server.url}/readyz")
    assert r.status_code == 200
    version: str = r.json()["version"]
    return version


def versions_served(server: ServerProcess) -> set[str]:
    """The model versions any worker serves, from mmoe_model_info."""
    text = httpx.get(f"{server.url}/metrics").text
    return {
        s.labels["version"]
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "mmoe_model_info" and s.value == 1
    }


def reload(server: ServerProcess, body: dict[str, Any] | None = None) -> httpx.Response:
    return httpx.post(f"{server.url}/admin/reload", json=body or {}, timeout=60)


@pytest.mark.parametrize("batching", ["off", "on"])
def test_bad_files_are_rejected_under_load_and_a_good_one_swaps_in(
    start_server: Callable[..., ServerProcess], model_dir: Path, tiny_onnx: Path, batching: str
) -> None:
    (model_dir / "random.onnx").write_bytes(os.urandom(20_000))
    (model_dir / "truncated.onnx").write_bytes(tiny_onnx.read_bytes()[:5000])
    fails_warmup(tiny_onnx, model_dir / "warmup.onnx")
    version_8(tiny_onnx, model_dir / "v8.onnx")
    env = {"MMOE_BATCH_MAX_ROWS": "256", "MMOE_BATCH_WAIT_MS": "2"} if batching == "on" else {}
    server = start_server(model_dir / "model.onnx", env=env)

    with Load(server) as load:
        for name, reason in [
            ("random.onnx", "cannot load"),
            ("truncated.onnx", "cannot load"),
            ("warmup.onnx", "warm-up run failed"),
            ("missing.onnx", "model file not found"),
        ]:
            r = reload(server, {"path": name})
            assert r.status_code == 422, r.text
            error = r.json()["error"]
            assert error["code"] == "model_rejected"
            assert reason in error["reason"]
            assert "still serving the previous model" in error["reason"]
            load.wait_for_requests(3)
            assert served_version(server) == "7"
        rejected_until = len(load.results)

        r = reload(server, {"path": "v8.onnx"})
        assert r.status_code == 200, r.text
        assert r.json() | {"path": ""} == {
            "status": "reloaded",
            "model": "tiny",
            "version": "8",
            "path": "",
        }
        assert r.json()["path"] == str(model_dir / "v8.onnx")
        load.wait_for_requests(6)

    assert load.failures == []
    assert {v for _, v in load.results[:rejected_until]} == {"7"}
    assert load.results[-1] == (200, "8")
    meta = httpx.get(f"{server.url}/metadata").json()
    assert meta["model"]["version"] == "8"
    assert meta["model"]["path"] == str(model_dir / "v8.onnx")
    samples = scrape(server)
    workers = meta["batching"]["workers"]  # each loads the start's and v8's file
    assert value(samples, "mmoe_reloads_total", result="failed") == 4  # refused by the one asked
    assert value(samples, "mmoe_reloads_total", result="ok") == 2 * workers
    info = [labels for (name, labels) in samples if name == "mmoe_model_info"]
    assert len(info) == 1 and ("version", "8") in info[0]

    # no path: the configured file again
    r = reload(server)
    assert r.status_code == 200 and r.json()["version"] == "7"
    assert served_version(server) == "7"


def test_reload_paths_stay_inside_the_model_directory(
    start_server: Callable[..., ServerProcess], model_dir: Path, tiny_onnx: Path, tmp_path: Path
) -> None:
    version_8(tiny_onnx, tmp_path / "outside.onnx")
    server = start_server(model_dir / "model.onnx")
    for path in (str(tmp_path / "outside.onnx"), "../outside.onnx"):
        r = reload(server, {"path": path})
        assert r.status_code == 403, r.text
        assert r.json()["error"]["code"] == "path_not_allowed"
    assert served_version(server) == "7"


def test_sighup_reloads_the_file_and_keeps_the_old_model_if_it_is_bad(
    start_server: Callable[..., ServerProcess], model_dir: Path, tiny_onnx: Path
) -> None:
    model = model_dir / "model.onnx"
    good_v8 = version_8(tiny_onnx, model_dir / "v8.build").read_bytes()
    server = start_server(model)
    workers = httpx.get(f"{server.url}/metadata").json()["batching"]["workers"]

    def reloads(result: str) -> float:
        """Loads by result, counted in every worker (each reloads on SIGHUP)."""
        return value(scrape(server), "mmoe_reloads_total", result=result)

    def wait(check: Callable[[], bool]) -> None:
        deadline = time.monotonic() + 30
        while not check():
            assert time.monotonic() < deadline, server.log()
            time.sleep(0.05)

    with Load(server, threads=2) as load:
        replace(model, tiny_onnx.read_bytes()[:5000])
        server.signal(signal.SIGHUP)
        wait(lambda: reloads("failed") == workers)
        load.wait_for_requests(3)
        assert served_version(server) == "7"

        replace(model, good_v8)
        server.signal(signal.SIGHUP)
        wait(lambda: versions_served(server) == {"8"})  # by every worker
        load.wait_for_requests(3)

    assert load.failures == []
    assert load.results[-1] == (200, "8")
    assert reloads("ok") == 2 * workers
    assert server.proc is not None and server.proc.poll() is None  # SIGHUP did not end it
    assert "model load failed" in server.log()


@pytest.mark.slow
def test_repeated_swaps_under_batched_load_fail_no_request(
    start_server: Callable[..., ServerProcess], model_dir: Path, tiny_onnx: Path
) -> None:
    """Requests that took the old model just before a swap still finish on it, also when the
    old model's micro-batcher has stopped taking work."""
    version_8(tiny_onnx, model_dir / "v8.onnx")
    env = {"MMOE_BATCH_MAX_ROWS": "256", "MMOE_BATCH_WAIT_MS": "1"}
    server = start_server(model_dir / "model.onnx", env=env)
    with Load(server, threads=6) as load:
        for i in range(16):
            r = reload(server, {"path": "v8.onnx" if i % 2 == 0 else "model.onnx"})
            assert r.status_code == 200, r.text
    assert load.failures == []
    assert {v for _, v in load.results} == {"7", "8"}
