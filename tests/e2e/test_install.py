"""The serving install is small: `pip install .[serve]` pulls no torch, and `mmoe serve` runs,
HTTP and KServe V2 over gRPC."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import grpc
import httpx
import pytest
from tritonclient.grpc import service_pb2, service_pb2_grpc

from tests.server import free_port

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_serve_install_has_no_torch_and_serves(tmp_path: Path, tiny_onnx: Path) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    # A copy of the project's files (not .venv or build outputs), so the build leaves nothing
    # behind in the checkout.
    src = tmp_path / "src"
    files = subprocess.run(
        ["git", "-C", str(ROOT), "ls-files", "--cached", "--others", "--exclude-standard"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    for name in files:
        path = ROOT / name
        if path.is_symlink():  # mmoe/model -> ../model and the like
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            (src / name).symlink_to(os.readlink(path))
        elif path.is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, src / name)
    install = subprocess.run(
        [str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", f"{src}[serve]"],
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
    for heavy in ("torch", "onnx==", "pyarrow", "scikit-learn"):
        assert heavy not in listed, f"{heavy} installed by .[serve]:\n{listed}"

    port, grpc_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    serve = [str(venv / "bin" / "mmoe"), "serve", "--model", str(tiny_onnx), "--port", str(port)]
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
