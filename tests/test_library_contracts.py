"""What the code relies on inside the libraries it uses, beyond their documented interfaces, and
the upper bounds in pyproject.toml that keep those libraries at releases where it holds.

Each test names the code that relies on it. When one fails after an upgrade: adapt that code,
then move the bound (pyproject.toml, training/pyproject.toml)."""

from __future__ import annotations

import asyncio
import inspect
import tomllib
from importlib.metadata import version
from pathlib import Path
from typing import Annotated, Any

import msgspec
import pytest
from packaging.requirements import Requirement

from mmoe.contract.metadata import FeatureInfo, ModelMetadata, TaskInfo
from mmoe.service.errors import PayloadError
from mmoe.service.payload import RequestDecoder

ROOT = Path(__file__).resolve().parents[1]

# distribution -> (pyproject file, extra or None for the base dependencies, who relies on it)
BOUNDED = {
    "uvicorn": ("pyproject.toml", "serve", "service/protocol.py subclasses HttpToolsProtocol"),
    "msgspec": ("pyproject.toml", "serve", "service/payload.py parses ValidationError text"),
    "prometheus-client": (
        "pyproject.toml",
        "serve",
        "service/monitoring.py's observe_many uses a Histogram's buckets",
    ),
    "schemathesis": ("pyproject.toml", "dev", "tests/service/test_fuzz_openapi.py (private API)"),
    "onnxruntime": (
        "training/pyproject.toml",
        None,
        "export/variants.py: onnxruntime.transformers.float16, the quantizer's log line",
    ),
    "onnx": ("training/pyproject.toml", None, "export/: the exporter's opset and IR version"),
    "torch": ("training/pyproject.toml", None, "export/: torch.onnx.export's graph"),
}


def _requirement(pyproject: str, extra: str | None, name: str) -> Requirement:
    project = tomllib.loads((ROOT / pyproject).read_text())["project"]
    listed = project["dependencies"] if extra is None else project["optional-dependencies"][extra]
    found = [Requirement(r) for r in listed if Requirement(r).name == name]
    assert found, f"{name} is not in {pyproject} [{extra or 'dependencies'}]"
    return found[0]


@pytest.mark.parametrize("name", sorted(BOUNDED))
def test_libraries_used_beyond_their_interface_have_an_upper_bound(name: str) -> None:
    pyproject, extra, why = BOUNDED[name]
    req = _requirement(pyproject, extra, name)
    assert any(s.operator in ("<", "<=", "==", "~=") for s in req.specifier), (
        f"{pyproject}: {req} needs an upper bound ({why})"
    )
    installed = version(name)
    assert req.specifier.contains(installed, prereleases=True), (
        f"{name} {installed} is installed, outside {req} ({why}): reinstall, or check that code "
        "against it and move the bound"
    )


# ---- msgspec: service/payload.py turns ValidationError text into a field and a reason ---------


def _decode_error(body: bytes) -> str:
    column = Annotated[list[float], msgspec.Meta(max_length=2)] | msgspec.UnsetType
    inner = msgspec.defstruct(
        "Inner", [("f0", column, msgspec.UNSET)], rename={"f0": "price"}, forbid_unknown_fields=True
    )
    outer = msgspec.defstruct("Outer", [("candidates", inner)])
    with pytest.raises(msgspec.ValidationError) as err:
        msgspec.json.decode(body, type=outer)
    return str(err.value)


@pytest.mark.parametrize(
    ("body", "text"),
    [
        (
            b'{"candidates": {"price": [1, 2, 3]}}',
            "Expected `array` of length <= 2 - at `$.candidates.price`",
        ),
        (
            b'{"candidates": {"nope": 1}}',
            "Object contains unknown field `nope` - at `$.candidates`",
        ),
        (
            b'{"candidates": {"price": [1, "x"]}}',
            "Expected `float`, got `str` - at `$.candidates.price[1]`",
        ),
    ],
)
def test_msgspec_words_errors_as_the_payload_parser_reads_them(body: bytes, text: str) -> None:
    got = _decode_error(body)
    assert got == text, (
        f"msgspec {version('msgspec')} words a validation error as {got!r}, not {text!r}: "
        "service/payload.py's _msgspec_error parses that form (reason, ' - at `$.path`', the "
        "row limit, unknown fields); adapt it"
    )


def _decoder(max_rows: int = 2) -> RequestDecoder:
    meta = ModelMetadata(
        name="m",
        version="1",
        features=[
            FeatureInfo(name="item", kind="categorical", dtype="string"),
            FeatureInfo(name="price", kind="numeric", dtype="float32", default=0.0),
        ],
        tasks=[TaskInfo(name="ctr", kind="binary", output="probs_ctr")],
    )
    return RequestDecoder(meta, max_rows=max_rows)


@pytest.mark.parametrize(
    ("body", "field", "status", "code"),
    [
        (b'{"candidates": {"item": ["a", "b", "c"]}}', "candidates.item", 413, "too_many_rows"),
        (b'{"candidates": {"item": ["a"], "nope": [1]}}', "candidates.nope", 422, None),
        (b'{"candidates": {"item": ["a"], "price": ["x"]}}', "candidates.price[0]", 422, None),
    ],
)
def test_the_payload_parser_reads_this_msgspec(
    body: bytes, field: str, status: int, code: str | None
) -> None:
    with pytest.raises(PayloadError) as err:
        _decoder().decode(body)
    got: Any = err.value
    assert (got.field, got.status) == (field, status), (
        f"with msgspec {version('msgspec')} the error is field={got.field!r} status={got.status}"
        f" ({got.reason!r}); service/payload.py's _msgspec_error no longer reads its text"
    )
    if code is not None:
        assert got.code == code
    assert "`" not in got.reason and " - at " not in got.reason, got.reason


# ---- prometheus-client: service/monitoring.py observes a batch of scores at once ---------------


def test_prometheus_histograms_have_the_buckets_observe_many_uses() -> None:
    from prometheus_client import CollectorRegistry, Histogram

    h = Histogram("h", "h", buckets=(0.5, 1.0), registry=CollectorRegistry())
    missing = [a for a in ("_upper_bounds", "_buckets", "_sum") if not hasattr(h, a)]
    assert not missing, (
        f"prometheus-client {version('prometheus-client')}: a Histogram has no {missing}, which "
        "service/monitoring.py's observe_many increments directly"
    )
    assert list(h._upper_bounds) == [0.5, 1.0, float("inf")]
    assert len(h._buckets) == 3 and all(hasattr(b, "inc") for b in h._buckets)
    h._buckets[1].inc(2)
    h._sum.inc(1.5)
    samples = {(s.name, s.labels.get("le")): s.value for s in next(iter(h.collect())).samples}
    assert samples[("h_bucket", "1.0")] == 2 and samples[("h_bucket", "0.5")] == 0, (
        f"prometheus-client {version('prometheus-client')}: a histogram's exported buckets are "
        "no longer the per-bucket values observe_many increments (it would report wrong counts)"
    )
    assert samples[("h_sum", None)] == 1.5


# ---- uvicorn: service/protocol.py subclasses its httptools protocol ----------------------------

OVERRIDDEN = (
    "connection_made",
    "connection_lost",
    "data_received",
    "on_headers_complete",
    "on_message_complete",
)


def test_uvicorn_httptools_protocol_has_what_the_bounded_protocol_overrides() -> None:
    from uvicorn.protocols.http import httptools_impl

    base = httptools_impl.HttpToolsProtocol
    gone = [name for name in OVERRIDDEN if name not in vars(base)]
    assert not gone, (
        f"uvicorn {version('uvicorn')}: HttpToolsProtocol no longer defines {gone}, which "
        "service/protocol.py's BoundedHttpProtocol overrides to bound request heads"
    )
    params = list(inspect.signature(base.__init__).parameters)
    assert params[:4] == ["self", "config", "server_state", "app_state"], (
        f"uvicorn {version('uvicorn')}: HttpToolsProtocol({params[1:]}): uvicorn builds the "
        "protocol class it is given (uvicorn.run(http=...)) with other arguments now"
    )
    for status in (408, 431):
        line = httptools_impl.STATUS_LINE.get(status, b"")
        assert line.startswith(b"HTTP/1.1 %d " % status), (
            f"uvicorn {version('uvicorn')}: STATUS_LINE[{status}] is {line!r}; "
            "service/protocol.py writes it before its 408/431 bodies"
        )


class _Transport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.closed = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 8000) if name in ("sockname", "peername") else default

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def write(self, data: Any) -> None:
        pass


def test_uvicorn_protocol_instances_have_the_loop_and_transport_the_subclass_uses() -> None:
    from uvicorn.config import Config
    from uvicorn.server import ServerState

    from mmoe.service.protocol import bounded_http_protocol

    async def app(scope: Any, receive: Any, send: Any) -> None:
        pass

    config = Config(app, http="httptools", log_config=None)
    config.load()
    loop = asyncio.new_event_loop()
    try:
        protocol = bounded_http_protocol(10.0)(
            config=config, server_state=ServerState(), app_state={}, _loop=loop
        )
        transport = _Transport()
        protocol.connection_made(transport)
        assert protocol.loop is loop and protocol.transport is transport, (
            f"uvicorn {version('uvicorn')}: the protocol keeps its loop and transport under other "
            "names; service/protocol.py uses self.loop and self.transport"
        )
        protocol.connection_lost(None)
    finally:
        loop.close()


# ---- schemathesis: tests/service/test_fuzz_openapi.py imports a private module -----------------


def test_schemathesis_private_config_the_fuzz_test_imports() -> None:
    try:
        from schemathesis.config._checks import (
            NEGATIVE_DATA_REJECTION_EXPECTED_STATUSES,
            NegativeDataRejectionConfig,
        )
    except ImportError as err:
        pytest.fail(
            f"schemathesis {version('schemathesis')}: {err}; tests/service/test_fuzz_openapi.py "
            "imports these to accept 413 as a rejection of too-long arrays"
        )
    assert "422" in [str(s) for s in NEGATIVE_DATA_REJECTION_EXPECTED_STATUSES]
    NegativeDataRejectionConfig(
        expected_statuses=[*NEGATIVE_DATA_REJECTION_EXPECTED_STATUSES, "413"]
    )


# ---- onnxruntime: export/variants.py's float16 variant ----------------------------------------


def test_onnxruntime_float16_converter_takes_the_arguments_the_export_passes() -> None:
    from onnxruntime.transformers.float16 import convert_float_to_float16

    params = inspect.signature(convert_float_to_float16).parameters
    missing = {"keep_io_types", "op_block_list"} - set(params)
    assert not missing, (
        f"onnxruntime {version('onnxruntime')}: convert_float_to_float16 takes no {missing}; "
        "export/variants.py's float16 passes them"
    )
