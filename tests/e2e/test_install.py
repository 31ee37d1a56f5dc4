"""The installs: each wheel installs nothing but the `mmoe` namespace, and the serving install
(`pip install .[serve]`) carries no training code and no torch, and `mmoe serve` runs in it,
HTTP and KServe V2 over gRPC, as does `mmoe items build`."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import grpc
import httpx
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tritonclient.grpc import service_pb2, service_pb2_grpc

from tests.server import free_port

ROOT = Path(__file__).resolve().parents[2]
TRAINING_PACKAGES = ("mmoe.model", "mmoe.export", "mmoe.bench")


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the project's files (not .venv or build outputs), so that a build leaves
    nothing behind in the checkout."""
    src = tmp_path_factory.mktemp("src")
    files = subprocess.run(
        ["git", "-C", str(ROOT), "ls-files", "--cached", "--others", "--exclude-standard"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    for name in files:
        path = ROOT / name
        assert not path.is_symlink(), f"{name}: the packaging maps folders, nothing links them"
        if path.is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, src / name)
    return src


def _wheel_files(wheels: Path, distribution: str) -> list[str]:
    (wheel,) = wheels.glob(f"{distribution}-*.whl")
    return zipfile.ZipFile(wheel).namelist()


@pytest.mark.slow
def test_each_wheel_installs_only_the_mmoe_namespace(source: Path, tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    projects = [str(source), str(source / "training")]
    build = subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), *projects],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    subpackages = {}
    for distribution in ("mmoe_ranking", "mmoe_ranking_train"):
        files = _wheel_files(wheels, distribution)
        info = next(f for f in files if f.endswith(".dist-info/METADATA")).split("/")[0]
        tops = {f.split("/")[0] for f in files} - {info}
        assert tops == {"mmoe"}, f"{distribution} installs top-level {sorted(tops)}"
        subpackages[distribution] = {f.split("/")[1] for f in files if f.count("/") > 1}
    assert subpackages["mmoe_ranking"] == {"contract", "service"}
    assert subpackages["mmoe_ranking_train"] == {"model", "export", "bench"}
    # The training wheel adds to the serving one's package; it must not replace its files.
    serving = set(_wheel_files(wheels, "mmoe_ranking"))
    assert "mmoe/__init__.py" in serving and "mmoe/cli.py" in serving
    assert not serving & set(_wheel_files(wheels, "mmoe_ranking_train"))


@pytest.mark.slow
def test_serve_install_has_no_training_code_nor_torch_and_serves(
    source: Path, tmp_path: Path, tiny_onnx: Path
) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    install = subprocess.run(
        [str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", f"{source}[serve]"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert install.returncode == 0, install.stderr[-3000:]
    listed = subprocess.run(
        [str(py), "-m", "pip", "list", "--format=freeze"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.lower()
    assert "onnxruntime==" in listed and "fastapi==" in listed
    # pyarrow is in: the server reads item tables (docs/items.md).
    assert "pyarrow==" in listed and "redis==" in listed
    for heavy in ("torch", "onnx==", "scikit-learn"):
        assert heavy not in listed, f"{heavy} installed by .[serve]:\n{listed}"
    # Run outside the checkout, whose folders would be importable from the working directory.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    found = subprocess.run(
        [
            str(py),
            "-c",
            "import importlib.util as u, sys; print([m for m in sys.argv[1:] if u.find_spec(m)])",
            *TRAINING_PACKAGES,
            "torch",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert found == "[]", f"the serving install has {found}"
    mmoe = str(venv / "bin" / "mmoe")
    helped = subprocess.run([mmoe, "--help"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert helped.returncode == 0, helped.stderr
    assert "serve" in helped.stdout and "not installed" in helped.stdout
    train = subprocess.run(
        [mmoe, "train", "--config", "x.yaml"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert train.returncode == 2 and "./training" in train.stderr, train.stderr

    verify = subprocess.run(
        [mmoe, "verify", str(tiny_onnx)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert verify.returncode == 0, verify.stdout + verify.stderr  # golden rows, without torch

    data, items = tmp_path / "log.parquet", tmp_path / "items.parquet"
    pq.write_table(pa.table({"item_id": ["i1", "i2", "i1"], "price": [1.0, 2.0, 3.0]}), data)
    build = [mmoe, "items", "build", "--data", str(data), "--key", "item_id", "--out", str(items)]
    built = subprocess.run(
        [*build, "--model", str(tiny_onnx), "--features", "price"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert built.returncode == 0 and "2 items from 3 rows" in built.stdout, built.stderr

    port, grpc_port = free_port(), free_port()
    serve = [mmoe, "serve", "--model", str(tiny_onnx), "--port", str(port)]
    proc = subprocess.Popen(
        [*serve, "--grpc-port", str(grpc_port)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(600):
            try:
                if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
            time.sleep(0.1)
        r = httpx.post(
            f"{url}/predict",
            json={"context": {"user_id": "u1"}, "candidates": {"category": ["c1", "c2"]}},
        )
        assert r.status_code == 200, r.text
        assert len(r.json()["scores"]["ctr"]) == 2
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            assert stub.ServerReady(service_pb2.ServerReadyRequest(), timeout=30).ready
    finally:
        proc.terminate()
        proc.wait(30)
