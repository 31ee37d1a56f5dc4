"""docs/experiments.md's walk-through runs as written: each bash block in turn, in a fresh folder,
against a real server, with what the test cannot do there swapped for its equivalent (the
server is the test's own, started on a free port; `mmoe export` of the demo's run is a copy of
a model file: the walk-through exports the same run again). After each step the server serves
what the step says."""

from __future__ import annotations

import re
import shutil
import subprocess
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.docs import ROOT
from tests.metrics import scrape, value
from tests.server import ServerProcess

DOC = ROOT / "docs" / "experiments.md"


def steps() -> list[str]:
    walk = DOC.read_text().split("## Walk-through", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.*?)```", walk, re.DOTALL)


def runnable(block: str, port: int) -> str:
    block = block.replace("localhost:8000", f"127.0.0.1:{port}")
    block = re.sub(r"^.*\bmmoe serve\b.*$", "true  # the test's server", block, flags=re.M)
    return re.sub(
        r"^mmoe export \S+ --out (\S+)$",
        r'mkdir -p "$(dirname \1)" && cp models/demo.onnx \1',
        block,
        flags=re.M,
    )


def versions_answering(server: ServerProcess, users: int = 200) -> Counter[str]:
    seen: Counter[str] = Counter()
    with httpx.Client(timeout=60) as client:
        for i in range(users):
            body = {
                "context": {"user_id": f"u{i}", "age_level": 3},
                "candidates": {"item_id": ["i1", "i2"], "category": ["c1", "c2"]},
            }
            r = client.post(f"{server.url}/predict", json=body)
            assert r.status_code == 200, r.text
            seen[r.json()["model"]["version"]] += 1
    return seen


@pytest.mark.slow
def test_the_walk_through_runs_as_written(
    start_server: Callable[..., ServerProcess], tiny_context_onnx: Path, tmp_path: Path
) -> None:
    blocks = steps()
    assert len(blocks) == 6 and "mmoe serve" in blocks[0]
    (tmp_path / "models").mkdir()
    shutil.copy(tiny_context_onnx, tmp_path / "models" / "demo.onnx")
    env = {"MMOE_MODEL_REPOSITORY": str(tmp_path / "repo"), "MMOE_LOAD_RETRY_S": "0.2"}
    server = start_server(tmp_path / "unused.onnx", env=env, wait_ready=False)

    def run(i: int) -> str:
        done = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", runnable(blocks[i], server.port)],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, (blocks[i], done.stdout, done.stderr)
        return done.stdout

    out = run(0)  # the repository, version 1
    assert '"status":"ready"' in out and '"state":"READY"' in out
    assert versions_answering(server, 20) == {"1": 20}
    run(1)  # version 2 in shadow
    out = run(2)  # traffic, and the comparison
    assert '"version":"1"' in out and "mmoe_shadow_requests_total" in out
    assert versions_answering(server, 20) == {"1": 20}
    shadow = {"model": "ranker", "version": "1", "shadow_version": "2"}
    assert value(scrape(server), "mmoe_shadow_requests_total", **shadow) >= 21
    run(3)  # A/B 90/10
    ab = versions_answering(server)
    assert set(ab) == {"1", "2"} and 5 <= ab["2"] <= 40, ab
    run(4)  # ramp, then promote
    assert versions_answering(server, 50) == {"2": 50}
    run(5)  # roll back
    assert versions_answering(server, 50) == {"1": 50}
    states = {
        (e["name"], e["version"]): e["state"]
        for e in httpx.post(f"{server.url}/v2/repository/index").json()
    }
    assert states == {("ranker", "1"): "READY", ("ranker", "2"): "READY"}
