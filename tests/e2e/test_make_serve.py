"""`make serve` and a plain `mmoe serve` as a new user runs them: the MMOE_* environment decides
what is served and where (the Makefile passes no settings of its own), and with no settings at
all the server serves the demo model that `make demo` writes."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from mmoe.service.settings import Settings
from tests.server import free_port

ROOT = Path(__file__).resolve().parents[2]
VENV = Path(sys.prefix)
# The install steps are not what these tests are about (and would reinstall the checkout when
# pyproject.toml is newer than the stamps).
SKIP_INSTALL = ["-o", f"{VENV}/.serve-installed", "-o", f"{VENV}/.train-installed"]

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")


def _environment(**settings: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MMOE_")}
    return {**env, "MMOE_ACCESS_LOG": "false", **settings}


def _dry_run(*args: str, **settings: str) -> list[str]:
    """The commands `make ARGS` would run, without running them."""
    cmd = ["make", "-s", "-n", "-C", str(ROOT), f"VENV={VENV}", *SKIP_INSTALL, *args]
    proc = subprocess.run(cmd, env=_environment(**settings), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return [line.strip() for line in proc.stdout.splitlines() if line.strip()]


def test_the_settings_default_model_is_the_demo_the_makefile_builds() -> None:
    makefile = (ROOT / "Makefile").read_text()
    demo = re.search(r"^DEMO_MODEL := (\S+)$", makefile, re.M)
    assert demo, "the Makefile names no DEMO_MODEL"
    default = Settings.model_fields["model_path"].default
    assert default == Path(demo.group(1))


def test_make_serve_passes_no_flags_over_the_environment() -> None:
    commands = _dry_run("serve", MMOE_PORT="8011", MMOE_HOST="0.0.0.0")
    assert commands[-1] == f"{VENV}/bin/mmoe serve", commands


def test_make_serve_builds_the_demo_only_when_it_is_what_is_served() -> None:
    # -W: as if the demo's config had just changed, so the demo model is out of date.
    stale = ["-W", "configs/demo.yaml", "serve"]
    demo = _dry_run(*stale)
    assert any(" train --config configs/demo.yaml" in c for c in demo), demo
    assert demo[-1] == f"{VENV}/bin/mmoe serve"
    other = _dry_run(*stale, MMOE_MODEL_PATH="elsewhere/model.onnx")
    assert other == [f"{VENV}/bin/mmoe serve"], other


def test_make_serve_refuses_make_variables_it_would_ignore() -> None:
    cmd = ["make", "-n", "-C", str(ROOT), f"VENV={VENV}", "serve", "PORT=8011"]
    proc = subprocess.run(cmd, env=_environment(), capture_output=True, text=True)
    assert proc.returncode != 0
    assert "MMOE_PORT=8011 make serve" in proc.stderr


class _Session:
    """A command in a process group of its own (make and the server it starts)."""

    def __init__(self, cmd: list[str], env: dict[str, str], cwd: Path, log: Path) -> None:
        self.log = log
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                cmd, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )

    def wait_ready(self, url: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"exited with {self.proc.returncode}: {self.output()}")
            try:
                if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"{url}/readyz not 200 within {timeout}s: {self.output()}")

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


@pytest.fixture
def session(tmp_path: Path) -> Iterator[list[_Session]]:
    started: list[_Session] = []
    yield started
    for s in started:
        s.stop()


@pytest.mark.slow
def test_make_serve_serves_on_the_port_and_model_of_the_environment(
    tiny_onnx: Path, tmp_path: Path, session: list[_Session]
) -> None:
    port = free_port()
    env = _environment(MMOE_PORT=str(port), MMOE_HOST="127.0.0.1", MMOE_MODEL_PATH=str(tiny_onnx))
    cmd = ["make", "-s", "-C", str(ROOT), f"VENV={VENV}", *SKIP_INSTALL, "serve"]
    session.append(_Session(cmd, env, ROOT, tmp_path / "make.log"))
    url = f"http://127.0.0.1:{port}"
    session[0].wait_ready(url)
    assert httpx.get(f"{url}/metadata").json()["model"]["name"] == "tiny"


@pytest.mark.slow
def test_plain_mmoe_serve_serves_the_demo_model(
    tiny_onnx: Path, tmp_path: Path, session: list[_Session]
) -> None:
    # A checkout where `make demo` has run (the tiny model stands in for the demo).
    demo = tmp_path / "checkout" / "models" / "demo.onnx"
    demo.parent.mkdir(parents=True)
    shutil.copy(tiny_onnx, demo)
    port = free_port()
    cmd = [sys.executable, "-m", "mmoe", "serve"]
    env = _environment(MMOE_PORT=str(port))
    session.append(_Session(cmd, env, demo.parents[1], tmp_path / "serve.log"))
    url = f"http://127.0.0.1:{port}"
    session[0].wait_ready(url)
    assert httpx.get(f"{url}/metadata").json()["model"]["name"] == "tiny"
