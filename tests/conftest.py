"""Shared fixtures: a tiny trained run and its exported ONNX file (built once per session), and
real server processes on loopback ports."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.server import ServerProcess

HERE = Path(__file__).parent
TINY_CONFIG = HERE / "data" / "tiny.yaml"


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from mmoe.model.data import write_table
    from mmoe.model.synthetic import synthetic_ranking

    path = tmp_path_factory.mktemp("data") / "train.parquet"
    write_table(synthetic_ranking(6000, seed=11), path)
    return path


@pytest.fixture(scope="session")
def tiny_run(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from mmoe.model.config import load_config
    from mmoe.model.train import train

    out = tmp_path_factory.mktemp("run") / "tiny"
    train(load_config(TINY_CONFIG), tiny_data, out)
    return out


@pytest.fixture(scope="session")
def tiny_onnx(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from mmoe.export.exporter import export_run

    out = tmp_path_factory.mktemp("onnx") / "model.onnx"
    export_run(tiny_run, out, parity_rows=256)
    return out


@pytest.fixture(scope="session")
def tiny_plain_onnx(tiny_run: Path, tiny_onnx: Path) -> Path:
    """tiny_run exported with --no-monitor, beside tiny_onnx (where `mmoe bench --monitoring`
    looks for it)."""
    from mmoe.export.exporter import export_run

    out = tiny_onnx.parent / f"{tiny_onnx.stem}.no-monitor.onnx"
    export_run(tiny_run, out, parity_rows=64, monitor=False)
    return out


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[Callable[..., ServerProcess]]:
    """start_server(model, env={...}, wait_ready=True) -> a running ServerProcess."""
    started: list[ServerProcess] = []

    def start(
        model: Path,
        env: dict[str, str] | None = None,
        wait_ready: bool = True,
        args: list[str] | None = None,
    ) -> ServerProcess:
        server = ServerProcess(model, env, args, log_path=tmp_path / f"server{len(started)}.log")
        started.append(server)
        return server.start(wait_ready=wait_ready)

    yield start
    for s in started:
        s.stop()


@pytest.fixture
def server(start_server: Callable[..., ServerProcess], tiny_onnx: Path) -> ServerProcess:
    return start_server(tiny_onnx)


# tiny.yaml's features that tiny_context_run declares request context: a categorical id with a
# vocabulary, one with a default, a bucketised number and a tag list.
TINY_CONTEXT = ("user_id", "age_level", "hour", "tag_brand_list")


@pytest.fixture(scope="session")
def tiny_context_run(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny.yaml trained with TINY_CONTEXT declared `context: true`."""
    import yaml

    from mmoe.model.config import parse_config
    from mmoe.model.train import train

    config = yaml.safe_load(TINY_CONFIG.read_text())
    for f in config["features"]:
        f["context"] = f["name"] in TINY_CONTEXT
    out = tmp_path_factory.mktemp("run") / "tiny_context"
    train(parse_config(config), tiny_data, out)
    return out


@pytest.fixture(scope="session")
def tiny_context_onnx(tiny_context_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from mmoe.export.exporter import export_run

    out = tmp_path_factory.mktemp("onnx") / "context.onnx"
    export_run(tiny_context_run, out, parity_rows=256)
    return out
