"""Golden rows, checked at load: real server processes refuse a file whose network weights were
edited after export (metadata untouched) and serve the file as exported; a reload to an edited
file keeps the old model. `mmoe verify` runs the same check without torch or onnx."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.onnx_files import edit_weights
from tests.server import ServerProcess
from tests.service.test_reload import rewrite_metadata

BODY = {"context": {"user_id": "u1", "age_level": 2}, "candidates": {"category": ["c1", "c2"]}}


@pytest.fixture(scope="module")
def edited(tiny_onnx: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("edited") / "edited.onnx"
    edit_weights(tiny_onnx, path)
    return path


def not_ready_reason(server: ServerProcess, timeout: float = 30) -> str:
    """/readyz's reason once the server has tried to load its file."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = httpx.get(f"{server.url}/readyz")
        assert r.status_code == 503, r.text
        reason: str = r.json()["reason"]
        if reason != "model not loaded yet":
            return reason
        time.sleep(0.05)
    raise TimeoutError(server.log())


def test_a_file_whose_weights_were_edited_is_not_served(
    start_server: Callable[..., ServerProcess], edited: Path
) -> None:
    server = start_server(edited, wait_ready=False)
    reason = not_ready_reason(server)
    assert "does not compute what was exported" in reason, reason
    assert "probs_c" in reason and "difference" in reason and "allowed" in reason, reason
    r = httpx.post(f"{server.url}/predict", json=BODY)
    assert r.status_code == 503, r.text
    assert r.json()["error"]["code"] == "not_ready"
    assert "does not compute what was exported" in r.json()["error"]["reason"]


def test_the_file_as_exported_is_served(server: ServerProcess) -> None:
    assert httpx.get(f"{server.url}/readyz").status_code == 200
    r = httpx.post(f"{server.url}/predict", json=BODY)
    assert r.status_code == 200, r.text


def test_a_reload_to_an_edited_file_keeps_the_old_model(
    start_server: Callable[..., ServerProcess], tiny_onnx: Path, edited: Path, tmp_path: Path
) -> None:
    models = tmp_path / "models"
    models.mkdir()
    shutil.copy(tiny_onnx, models / "model.onnx")
    shutil.copy(edited, models / "edited.onnx")
    server = start_server(models / "model.onnx")
    r = httpx.post(f"{server.url}/admin/reload", json={"path": "edited.onnx"}, timeout=60)
    assert r.status_code == 422, r.text
    reason = r.json()["error"]["reason"]
    assert "does not compute what was exported" in reason and "difference" in reason, reason
    assert "still serving the previous model" in reason
    ready = httpx.get(f"{server.url}/readyz")
    assert ready.status_code == 200 and ready.json()["version"] == "7"
    assert httpx.post(f"{server.url}/predict", json=BODY).status_code == 200


def test_a_file_from_a_newer_major_format_is_not_served(
    start_server: Callable[..., ServerProcess], tiny_onnx: Path, tmp_path: Path
) -> None:
    newer = rewrite_metadata(
        tiny_onnx, tmp_path / "newer.onnx", lambda meta: meta.update(format_version="2.0")
    )
    server = start_server(newer, wait_ready=False)
    reason = not_ready_reason(server)
    assert "written by a newer exporter (format 2.0)" in reason and "upgrade the server" in reason


def verify(model: Path) -> subprocess.CompletedProcess[str]:
    """`mmoe verify MODEL` in a process where torch and onnx cannot be imported, as in the
    serving install."""
    code = (
        "import sys; sys.modules.update(torch=None, onnx=None); "
        "from mmoe.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    return subprocess.run(
        [sys.executable, "-c", code, "verify", str(model), "--provider", "cpu"],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_verify_passes_the_exported_file_and_fails_an_edited_one(
    tiny_onnx: Path, edited: Path
) -> None:
    good = verify(tiny_onnx)
    assert good.returncode == 0, good.stderr
    assert "match what was exported" in good.stdout
    bad = verify(edited)
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert "differ from what was exported" in bad.stdout
    assert "of golden row" in bad.stdout and "difference" in bad.stdout


def test_verify_says_when_a_file_has_no_golden_rows(tiny_onnx: Path, tmp_path: Path) -> None:
    def as_format_1_0(meta: dict[str, object]) -> None:
        meta.pop("golden")
        meta["format_version"] = 1

    old = rewrite_metadata(tiny_onnx, tmp_path / "old.onnx", as_format_1_0)
    out = verify(old)
    assert out.returncode == 2 and "no golden rows" in out.stderr


def test_golden_rows_are_raw_requests(tiny_onnx: Path) -> None:
    """What the file stores is what a caller sends: JSON rows keyed by feature name."""
    import onnx

    from mmoe.contract.metadata import read_metadata

    model = onnx.load(str(tiny_onnx))
    golden = read_metadata({p.key: p.value for p in model.metadata_props}).golden
    assert golden is not None and len(golden.rows) == 8
    json.dumps(golden.rows)  # JSON-able
    features = {"user_id", "item_id", "category", "age_level", "price", "hour", "tag_brand_list"}
    assert all(set(row) <= features for row in golden.rows)
    assert any(isinstance(row.get("tag_brand_list"), str) for row in golden.rows)
    assert any(row.get("price", 0) is None for row in golden.rows)  # null: the default
    assert any("price" not in row for row in golden.rows)  # left out: the default
    assert set(golden.outputs) == {"probs_ctr", "logits_ctr", "probs_cvr", "logits_cvr"}
