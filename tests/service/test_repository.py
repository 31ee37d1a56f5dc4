"""Several models and versions in one server, with real server processes: a repository laid out
as Triton's and its version policies, a broken version refused while the others serve, routing
that keeps a caller in its arm, a shadow that never alters or delays the answer, Triton's
repository API (load, unload, index) over HTTP and gRPC, tritonclient calling a named version,
and every answer saying which model and version gave it."""

from __future__ import annotations

import shutil
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from tritonclient.utils import InferenceServerException

from tests.metrics import scrape, value
from tests.onnx_files import edit_weights, fail_past_rows, slow_copy
from tests.server import ServerProcess
from tests.service.test_grpc import GrpcServer

BODY = {
    "context": {"user_id": "u1", "age_level": 3},
    "candidates": {"item_id": ["i1", "i2", "i3", "i4"], "category": ["c1", "c2", "c3", "c1"]},
}


def put(repo: Path, name: str, version: int, model: Path) -> Path:
    """Copy `model` into the repository as `name` `version`, as a deploy does: written beside,
    then renamed into place."""
    folder = repo / name / str(version)
    folder.mkdir(parents=True, exist_ok=True)
    staged = folder / ".model.onnx.partial"
    shutil.copy(model, staged)
    staged.replace(folder / "model.onnx")
    return folder / "model.onnx"


def predict(
    server: ServerProcess, body: dict[str, Any] | None = None, **extra: Any
) -> httpx.Response:
    return httpx.post(f"{server.url}/predict", json={**(body or BODY), **extra}, timeout=60)


def served(r: httpx.Response) -> tuple[str, str]:
    assert r.status_code == 200, r.text
    model = r.json()["model"]
    assert (r.headers["x-model-name"], r.headers["x-model-version"]) == (
        model["name"],
        model["version"],
    )
    return model["name"], model["version"]


def index(server: ServerProcess) -> dict[tuple[str, str], dict[str, str]]:
    r = httpx.post(f"{server.url}/v2/repository/index", timeout=30)
    assert r.status_code == 200, r.text
    return {(e["name"], e["version"]): e for e in r.json()}


def reload(server: ServerProcess) -> httpx.Response:
    return httpx.post(f"{server.url}/admin/reload", timeout=120)


def serve_repository(
    start_server: Callable[..., ServerProcess], repo: Path, **env: str
) -> ServerProcess:
    return start_server(repo / "unused.onnx", env={"MMOE_MODEL_REPOSITORY": str(repo), **env})


@pytest.mark.slow
def test_versions_are_loaded_by_policy_and_named_by_their_folders(
    start_server: Callable[..., ServerProcess], tiny_onnx: Path, tmp_path: Path
) -> None:
    repo = tmp_path / "repo"
    for version in (1, 2, 3):
        put(repo, "ranker", version, tiny_onnx)  # the file calls itself tiny 7
    server = serve_repository(start_server, repo)
    assert served(predict(server)) == ("ranker", "3")  # latest 1, named by its folders
    states = {k: e["state"] for k, e in index(server).items()}
    assert states == {
        ("ranker", "1"): "UNAVAILABLE",
        ("ranker", "2"): "UNAVAILABLE",
        ("ranker", "3"): "READY",
    }
    assert index(server)[("ranker", "1")]["reason"] == "not selected by the version policy"
    meta = httpx.get(f"{server.url}/metadata").json()
    assert meta["model"]["name"] == "ranker" and meta["model"]["version"] == "3"
    assert meta["model"]["exported_as"] == {"name": "tiny", "version": "7"}

    (repo / "ranker" / "config.yaml").write_text("version_policy: {specific: {versions: [1, 3]}}")
    put(repo, "other", 5, tiny_onnx)
    r = reload(server)
    assert r.status_code == 200 and r.json()["failed"] is None, r.text
    assert {k for k, e in index(server).items() if e["state"] == "READY"} == {
        ("ranker", "1"),
        ("ranker", "3"),
        ("other", "5"),
    }
    # Two models and no routing file: a request must say which.
    r = predict(server)
    assert r.status_code == 422 and r.json()["error"]["field"] == "model", r.text
    assert served(predict(server, model="other")) == ("other", "5")
    assert served(predict(server, model="ranker")) == ("ranker", "3")
    assert served(predict(server, model="ranker", version="1")) == ("ranker", "1")
    r = predict(server, model="ranker", version="2")
    assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_version", r.text
    r = predict(server, model="nope")
    assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_model", r.text
    # /readyz names every model served.
    ready = httpx.get(f"{server.url}/readyz").json()
    assert {(m["name"], m["version"]) for m in ready["models"]} == {
        ("ranker", "1"),
        ("ranker", "3"),
        ("other", "5"),
    }

    # Removed from disk: unloaded at the next reading.
    shutil.rmtree(repo / "other")
    assert reload(server).status_code == 200
    assert served(predict(server)) == ("ranker", "3")  # one model again: no name needed
    # Per-model metrics carry the model and the version.
    samples = scrape(server)
    assert value(samples, "mmoe_requests_total", route="/predict", model="ranker", version="1") == 1
    assert value(samples, "mmoe_runtime_seconds_count", model="other", version="5") >= 1
    assert value(samples, "mmoe_score_count", model="ranker", version="3") > 0


@pytest.mark.slow
def test_a_broken_version_is_refused_with_its_reason_while_the_others_serve(
    start_server: Callable[..., ServerProcess], tiny_onnx: Path, tmp_path: Path
) -> None:
    repo = tmp_path / "repo"
    put(repo, "ranker", 1, tiny_onnx)
    (repo / "ranker" / "config.yaml").write_text("version_policy: {all: {}}")
    server = serve_repository(start_server, repo)
    stop = threading.Event()
    outcomes: Counter[str] = Counter()

    def load() -> None:
        with httpx.Client(timeout=60) as client:
            while not stop.is_set():
                r = client.post(f"{server.url}/predict", json=BODY)
                outcomes[f"{r.status_code} {r.headers.get('x-model-version')}"] += 1

    thread = threading.Thread(target=load)
    thread.start()
    try:
        edit_weights(tiny_onnx, tmp_path / "edited.onnx")  # its golden rows no longer hold
        put(repo, "ranker", 2, tmp_path / "edited.onnx")
        r = reload(server)
        assert r.status_code == 200 and "ranker 2" in r.json()["failed"], r.text
        entry = index(server)[("ranker", "2")]
        assert entry["state"] == "UNAVAILABLE" and "does not compute" in entry["reason"]
        put(repo, "ranker", 3, tiny_onnx)
        assert reload(server).status_code == 200
        time.sleep(0.3)
    finally:
        stop.set()
        thread.join()
    assert set(outcomes) <= {"200 1", "200 3"} and outcomes["200 3"] > 0, outcomes
    assert httpx.get(f"{server.url}/readyz").status_code == 200
    r = predict(server, version="2")
    assert r.status_code == 404 and "does not compute" in r.json()["error"]["reason"], r.text
    samples = scrape(server)
    assert (
        value(samples, "mmoe_golden_checks_total", model="ranker", version="2", result="mismatch")
        >= 1
    )
    assert value(samples, "mmoe_golden_checks_total", model="ranker", version="3", result="ok") >= 1


@pytest.mark.slow
def test_arms_keep_each_caller_and_share_callers_by_weight(
    start_server: Callable[..., ServerProcess], tiny_onnx: Path, tmp_path: Path
) -> None:
    repo = tmp_path / "repo"
    for number in (7, 8):
        put(repo, "ranker", number, tiny_onnx)
    (repo / "routing.yaml").write_text(
        "default: ranker\nmodels:\n  ranker:\n    key: context.user_id\n"
        '    arms: {"7": 70, "8": 30}\n'
    )
    server = serve_repository(start_server, repo, MMOE_WORKERS="2")
    users = [f"user-{i}" for i in range(300)]
    arms: dict[str, str] = {}
    with httpx.Client(timeout=60) as client:
        for user in users + users:  # each caller twice, over both workers
            body = {**BODY, "context": {"user_id": user}}
            r = client.post(f"{server.url}/predict", json=body)
            version = served(r)[1]
            assert arms.setdefault(user, version) == version, user
        share = Counter(arms.values())["8"] / len(users)
        assert 0.2 < share < 0.4, share
        # The same key over KServe V2 lands in the same arm.
        for user in users[:20]:
            v2 = client.post(
                f"{server.url}/v2/models/ranker/infer",
                json={
                    "inputs": [
                        {"name": "user_id", "shape": [2], "datatype": "BYTES", "data": [user] * 2},
                        {"name": "category", "shape": [2], "datatype": "BYTES", "data": ["c", "d"]},
                    ]
                },
            )
            assert v2.status_code == 200, v2.text
            assert v2.json()["model_version"] == arms[user] == v2.headers["x-model-version"]
    # Ramping the weights moves callers from 7 to 8 only; no request fails meanwhile.
    (repo / "routing.yaml").write_text(
        "default: ranker\nmodels:\n  ranker:\n    key: context.user_id\n"
        '    arms: {"7": 20, "8": 80}\n'
    )
    assert reload(server).status_code == 200
    with httpx.Client(timeout=60) as client:
        for user in users:
            version = served(
                client.post(f"{server.url}/predict", json={**BODY, "context": {"user_id": user}})
            )[1]
            assert not (arms[user] == "8" and version == "7"), user
    # A bad routing file is refused with its reason; the last good one stays.
    (repo / "routing.yaml").write_text("models: {ranker: {arms: {'7': 50, '8': 60}}}")
    r = reload(server)
    assert r.status_code == 200 and "add up to 110" in r.json()["routing_error"], r.text
    meta = httpx.get(f"{server.url}/metadata").json()
    assert meta["repository"]["routing"]["models"]["ranker"]["arms"] == {"7": 20.0, "8": 80.0}


@pytest.mark.slow
def test_a_shadow_never_alters_delays_or_fails_the_answer_and_is_compared(
    start_server: Callable[..., ServerProcess], tiny_onnx: Path, tmp_path: Path
) -> None:
    repo = tmp_path / "repo"
    put(repo, "ranker", 1, tiny_onnx)
    slow_copy(tiny_onnx, tmp_path / "slow.onnx", size=400, rounds=6)
    put(repo, "ranker", 2, tmp_path / "slow.onnx")  # the same scores, each call much slower
    fail_past_rows(tiny_onnx, tmp_path / "fails.onnx", 40)
    put(repo, "ranker", 3, tmp_path / "fails.onnx")
    (repo / "routing.yaml").write_text(
        'models:\n  ranker:\n    arms: {"1": 100}\n    shadow: {version: "2", percent: 100}\n'
    )
    server = serve_repository(start_server, repo, MMOE_WORKERS="1")
    alone = [predict(server, version="1").json() for _ in range(3)]
    with httpx.Client(timeout=60) as client:
        times, answers = [], []
        for _ in range(20):
            t0 = time.perf_counter()
            r = client.post(f"{server.url}/predict", json=BODY)
            times.append(time.perf_counter() - t0)
            assert served(r) == ("ranker", "1")
            answers.append(r.json()["scores"])
        assert all(a == alone[0]["scores"] for a in answers)
        slow = time.perf_counter()
        predict(server, version="2")
        slow = time.perf_counter() - slow
        # A shadow call takes `slow`; the answers did not wait for theirs.
        assert np.median(times) < slow / 3, (np.median(times), slow)
        time.sleep(slow * 2)  # the last shadow finishes
    samples = scrape(server)
    labels = {"model": "ranker", "version": "1", "shadow_version": "2"}
    scored = value(samples, "mmoe_shadow_requests_total", **labels, outcome="scored")
    shed = value(samples, "mmoe_shadow_requests_total", **labels, outcome="shed")
    assert scored >= 1 and scored + shed == 20, (scored, shed)
    assert value(samples, "mmoe_shadow_score_difference_count", **labels, task="ctr") == 4 * scored
    assert (
        value(samples, "mmoe_shadow_score_difference_bucket", **labels, task="ctr", le="0.0001")
        == 4 * scored
    )  # the same scores
    assert value(samples, "mmoe_shadow_rank_correlation_count", **labels, task="ctr") == scored
    assert value(samples, "mmoe_runtime_seconds_count", model="ranker", version="2") >= scored

    # A shadow that fails: the answers are whole, the failures counted.
    (repo / "routing.yaml").write_text(
        'models:\n  ranker:\n    arms: {"1": 100}\n    shadow: {version: "3"}\n'
    )
    assert reload(server).status_code == 200
    many = {**BODY, "candidates": {"category": [f"c{i}" for i in range(50)]}}
    for _ in range(5):
        assert served(predict(server, many)) == ("ranker", "1")
        time.sleep(0.1)
    failed = value(
        scrape(server), "mmoe_shadow_requests_total", shadow_version="3", outcome="failed"
    )
    assert failed >= 1


@pytest.fixture(scope="module")
def grpc_repository(
    tiny_onnx: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[GrpcServer, Path]]:
    tmp = tmp_path_factory.mktemp("grpc-repo")
    repo = tmp / "repo"
    for version in (1, 2):
        put(repo, "ranker", version, tiny_onnx)
    put(repo, "other", 1, tiny_onnx)
    (repo / "ranker" / "config.yaml").write_text("version_policy: {all: {}}")
    (repo / "routing.yaml").write_text("default: ranker\n")
    env = {"MMOE_MODEL_REPOSITORY": str(repo), "MMOE_WORKERS": "2"}
    with GrpcServer(repo / "unused.onnx", env, tmp / "server.log") as server:
        yield server, repo


def triton_inputs(module: Any) -> list[Any]:
    values = {"user_id": ["u1", "u2"], "category": ["c1", "c2"]}
    inputs = []
    for name, v in values.items():
        tensor = module.InferInput(name, [2], "BYTES")
        tensor.set_data_from_numpy(np.array(v, dtype=object))
        inputs.append(tensor)
    return inputs


@pytest.mark.slow
def test_tritonclient_calls_a_named_version_over_http_and_grpc(
    grpc_repository: tuple[GrpcServer, Path],
) -> None:
    server, _ = grpc_repository
    http = triton_http.InferenceServerClient(server.url.removeprefix("http://"))
    try:
        for version in ("1", "2"):
            result = http.infer("ranker", triton_inputs(triton_http), model_version=version)
            assert result.get_response()["model_version"] == version
            assert http.is_model_ready("ranker", version)
        assert http.get_model_metadata("ranker")["versions"] == ["1", "2"]
        assert not http.is_model_ready("ranker", "3")
    finally:
        http.close()
    with server.client() as grpc_client:
        for version in ("1", "2"):
            result = grpc_client.infer("ranker", triton_inputs(triton_grpc), model_version=version)
            assert result.get_response().model_version == version
        result = grpc_client.infer("other", triton_inputs(triton_grpc))
        assert result.get_response().model_name == "other"


@pytest.mark.slow
def test_the_repository_api_loads_and_unloads_in_every_worker(
    grpc_repository: tuple[GrpcServer, Path], tiny_onnx: Path
) -> None:
    server, _ = grpc_repository
    http = triton_http.InferenceServerClient(server.url.removeprefix("http://"))
    try:
        http.unload_model("other")
        states = {(m["name"], m["version"]): m for m in http.get_model_repository_index()}
        assert states[("other", "1")]["state"] == "UNAVAILABLE"
        assert states[("other", "1")]["reason"] == "unloaded"
        for _ in range(6):  # both workers: none serves it
            r = predict(server, model="other")
            assert r.status_code == 404, r.text
        assert reload(server).status_code == 200  # a reading of the repository keeps it out
        assert predict(server, model="other").status_code == 404
        with server.client() as grpc_client:
            grpc_client.load_model("other")
            index_grpc = grpc_client.get_model_repository_index()
            ready = {(m.name, m.version) for m in index_grpc.models if m.state == "READY"}
            assert ("other", "1") in ready
            with pytest.raises(InferenceServerException, match="no model 'nope'"):
                grpc_client.load_model("nope")
        for _ in range(6):
            assert served(predict(server, model="other")) == ("other", "1")
        with pytest.raises(InferenceServerException, match=r"no model '\.hidden'"):
            http.load_model(".hidden")
    finally:
        http.close()
