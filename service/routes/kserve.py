"""The KServe V2 / Triton HTTP protocol, so existing Triton and KServe clients can call the model.

Inputs are named after the raw features (BYTES for ids and tags, FP32 for numbers; tags are
[N, max_len], empty strings being padding). Both JSON tensors and Triton's binary tensor data
extension (`Inference-Header-Content-Length`) are understood, in requests and responses.
"""

from __future__ import annotations

import math
import struct
from typing import Any

import msgspec
import numpy as np
import orjson
from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from mmoe.contract.metadata import FeatureInfo
from mmoe.service.auth import require_api_key
from mmoe.service.errors import ApiError, PayloadError
from mmoe.service.http import read_request_body
from mmoe.service.payload import MAX_ID_CHARS, column_array, default_array, duplicate_key
from mmoe.service.state import LoadedModel, ModelHolder, get_holder, get_settings

router = APIRouter(prefix="/v2", tags=["kserve-v2"])

_NUMERIC_TYPES = {
    "FP16": "<f2",
    "FP32": "<f4",
    "FP64": "<f8",
    "INT8": "i1",
    "INT16": "<i2",
    "INT32": "<i4",
    "INT64": "<i8",
    "UINT8": "u1",
    "UINT16": "<u2",
    "UINT32": "<u4",
    "UINT64": "<u8",
}
_HEADER = "inference-header-content-length"


class V2Error(ApiError):
    """KServe V2 errors are `{"error": "<message>"}`."""

    def body(self) -> dict[str, Any]:
        return {"error": f"{self.field}: {self.reason}" if self.field else self.reason}


def _v2(err: ApiError) -> V2Error:
    return V2Error(err.status, err.code, err.reason, err.field, err.headers)


async def _require_api_key(request: Request) -> None:
    """require_api_key, answered in the V2 error shape (tritonclient expects a string)."""
    try:
        await require_api_key(request)
    except ApiError as err:
        raise _v2(err) from None


class _Tensor(msgspec.Struct):
    name: str
    shape: list[int]
    datatype: str
    data: Any = None
    parameters: dict[str, Any] = {}


class _Output(msgspec.Struct):
    name: str
    parameters: dict[str, Any] = {}


class _InferRequest(msgspec.Struct):
    inputs: list[_Tensor]
    id: str | None = None
    outputs: list[_Output] | None = None
    parameters: dict[str, Any] = {}


_V2_ERROR = {
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "properties": {"error": {"type": "string"}},
                "required": ["error"],
            }
        }
    }
}
MODEL_RESPONSES: dict[int | str, dict[str, Any]] = {
    404: {"description": "Unknown model or version", **_V2_ERROR},
    503: {"description": "No model loaded yet", **_V2_ERROR},
}
INFER_RESPONSES: dict[int | str, dict[str, Any]] = {
    **MODEL_RESPONSES,
    400: {"description": "Malformed JSON or binary framing", **_V2_ERROR},
    413: {"description": "Body or row count over the limit", **_V2_ERROR},
    415: {"description": "Body is neither JSON nor octet-stream", **_V2_ERROR},
    422: {"description": "A tensor is wrong: the message names it", **_V2_ERROR},
}


def _model(holder: ModelHolder, name: str, version: str | None = None) -> LoadedModel:
    model = holder.current
    if model is None:
        retry = {"Retry-After": str(holder.settings.retry_after_s)}
        raise V2Error(503, "not_ready", holder.not_ready_reason, None, retry)
    if name != model.name:
        raise V2Error(404, "unknown_model", f"unknown model {name!r}; serving {model.name!r}")
    if version is not None and version != model.version:
        raise V2Error(404, "unknown_version", f"model {name!r} has version {model.version!r}")
    return model


@router.get("", summary="Server metadata")
async def server_metadata() -> dict[str, Any]:
    return {"name": "mmoe-ranking", "version": "1", "extensions": ["binary_tensor_data"]}


@router.get("/health/live", summary="Server is live")
async def live() -> dict[str, bool]:
    return {"live": True}


@router.get("/health/ready", summary="Server is ready")
async def ready(request: Request) -> Response:
    ok = get_holder(request).ready()[0]
    return Response(orjson.dumps({"ready": ok}), 200 if ok else 503, media_type="application/json")


def _input_meta(f: FeatureInfo) -> dict[str, Any]:
    shape = [-1, f.max_len] if f.kind == "tags" else [-1]
    return {"name": f.name, "datatype": "FP32" if f.kind == "numeric" else "BYTES", "shape": shape}


@router.get("/models/{name}", summary="Model metadata", responses=MODEL_RESPONSES)
@router.get(
    "/models/{name}/versions/{version}", summary="Model metadata", responses=MODEL_RESPONSES
)
async def model_metadata(request: Request, name: str, version: str | None = None) -> dict[str, Any]:
    model = _model(get_holder(request), name, version)
    outputs = [
        {"name": o.name, "datatype": "FP32", "shape": [-1, *o.shape[1:]]}
        for o in model.predictor.session.get_outputs()
    ]
    return {
        "name": model.name,
        "versions": [model.version],
        "platform": "onnxruntime_onnx",
        "inputs": [_input_meta(f) for f in model.predictor.meta.features],
        "outputs": outputs,
    }


@router.get("/models/{name}/ready", summary="Model is ready", responses=MODEL_RESPONSES)
@router.get(
    "/models/{name}/versions/{version}/ready", summary="Model is ready", responses=MODEL_RESPONSES
)
async def model_ready(request: Request, name: str, version: str | None = None) -> dict[str, Any]:
    model = _model(get_holder(request), name, version)
    return {"name": model.name, "ready": True}


_INFER: dict[str, Any] = dict(
    summary="Inference",
    dependencies=[Depends(_require_api_key)],
    responses=INFER_RESPONSES,
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": msgspec.json.schema(_InferRequest)}},
        }
    },
)


@router.post("/models/{name}/infer", **_INFER)
@router.post("/models/{name}/versions/{version}/infer", **_INFER)
async def infer(
    name: str,
    request: Request,
    version: str | None = None,
) -> Response:
    model = _model(get_holder(request), name, version)
    try:
        body = await read_request_body(
            request, get_settings(request).max_body_bytes, ("application/octet-stream",)
        )
        req, binary = _split_body(body, request.headers.get(_HEADER))
        n, feeds = _feeds(model, req, binary, get_settings(request).max_batch_rows)
        wanted = _wanted_outputs(model, req)
        outputs = await model.runner.infer(feeds, n)
    except V2Error:
        raise
    except ApiError as err:
        raise _v2(err) from None
    return _response(model, req, {k: outputs[k] for k, _ in wanted}, dict(wanted))


def _split_body(body: bytes, header_len: str | None) -> tuple[_InferRequest, bytes]:
    json_part, binary = body, b""
    if header_len is not None:
        if not header_len.isdigit() or int(header_len) > len(body):
            raise V2Error(
                400,
                "bad_header",
                f"Inference-Header-Content-Length {header_len!r} is not a valid length",
            )
        json_part, binary = body[: int(header_len)], body[int(header_len) :]
    try:
        req = msgspec.json.decode(json_part, type=_InferRequest)
    except msgspec.ValidationError as err:
        raise V2Error(422, "invalid_request", str(err)) from None
    except msgspec.DecodeError as err:
        raise V2Error(400, "malformed_json", f"malformed JSON: {err}") from None
    except UnicodeDecodeError as err:  # msgspec raises it for invalid UTF-8 inside strings
        raise V2Error(
            400, "malformed_json", f"malformed JSON: a string is not valid UTF-8 ({err.reason})"
        ) from None
    except RecursionError:  # `data` and `parameters` take any JSON, nested without bound
        raise V2Error(400, "malformed_json", "malformed JSON: nested too deeply") from None
    key = duplicate_key(json_part)
    if key is not None:
        raise V2Error(422, "duplicate_key", f"{key!r} given twice in one object")
    return req, binary


def _tensor_array(t: _Tensor, binary: memoryview, offset: int) -> tuple[np.ndarray, int]:
    """One input tensor -> numpy (object array of str for BYTES), and the new binary offset."""
    field = f"inputs[{t.name}]"
    if any(d < 0 for d in t.shape):
        raise PayloadError(field, f"shape {t.shape} has a negative dimension")
    if len(t.shape) > 2:
        raise PayloadError(field, f"shape {t.shape}: inputs are [batch] or [batch, k]")
    count = math.prod(t.shape)  # exact: np.prod would wrap around on huge dimensions
    size = t.parameters.get("binary_data_size")
    if size is not None:
        if (
            not isinstance(size, int)
            or isinstance(size, bool)
            or size < 0
            or offset + size > len(binary)
        ):
            raise PayloadError(field, "binary_data_size runs past the end of the body")
        raw = binary[offset : offset + size]
        offset += size
        if t.datatype == "BYTES":
            values: list[Any] = []
            pos = 0
            while pos < len(raw):
                if pos + 4 > len(raw):
                    raise PayloadError(field, "truncated BYTES element")
                (length,) = struct.unpack_from("<I", raw, pos)
                pos += 4
                if pos + length > len(raw):
                    raise PayloadError(field, "truncated BYTES element")
                values.append(bytes(raw[pos : pos + length]))
                pos += length
            arr = np.array(values, dtype=object)
        elif t.datatype in _NUMERIC_TYPES:
            dt = np.dtype(_NUMERIC_TYPES[t.datatype])
            if len(raw) != count * dt.itemsize:
                raise PayloadError(
                    field, f"{len(raw)} bytes do not hold {count} {t.datatype} values"
                )
            arr = np.frombuffer(raw, dtype=dt)
        else:
            raise PayloadError(field, f"unsupported datatype {t.datatype}")
    else:
        if t.data is None:
            raise PayloadError(field, "no data and no binary_data_size")
        if t.datatype not in _NUMERIC_TYPES and t.datatype != "BYTES":
            raise PayloadError(field, f"unsupported datatype {t.datatype}")
        try:
            arr = np.array(t.data, dtype=object if t.datatype == "BYTES" else None)
        except ValueError:  # ragged nested lists
            raise PayloadError(field, "data is not a flat list of values") from None
    if arr.size != count:
        raise PayloadError(field, f"{arr.size} values do not fill shape {t.shape}")
    try:
        arr = arr.reshape(t.shape)
    except (ValueError, OverflowError):  # an empty array "shaped" [0, 2**62]
        raise PayloadError(field, f"shape {t.shape} is not a usable shape") from None
    if t.datatype == "BYTES":
        try:
            arr = np.vectorize(_as_text, otypes=[object])(arr) if arr.size else arr.astype(object)
        except (ValueError, TypeError) as err:  # UnicodeDecodeError is a ValueError
            raise PayloadError(
                field, f"BYTES values must be UTF-8 strings of at most {MAX_ID_CHARS} chars: {err}"
            ) from None
    elif arr.dtype.kind not in "iuf":
        raise PayloadError(field, f"values are not {t.datatype} numbers")
    return arr, offset


def _as_text(v: Any) -> str:
    if isinstance(v, bytes | str) and len(v) > MAX_ID_CHARS:
        raise ValueError(f"a value {len(v)} long")
    if isinstance(v, bytes):
        return v.decode("utf-8")
    if isinstance(v, str):
        return v
    if isinstance(v, int) and not isinstance(v, bool):
        return str(v)
    raise TypeError(f"{v!r} is not a string")


def _feeds(
    model: LoadedModel, req: _InferRequest, binary: bytes, max_rows: int
) -> tuple[int, dict[str, np.ndarray]]:
    features = {f.name: f for f in model.predictor.meta.features}
    view = memoryview(binary)
    offset = 0
    given: dict[str, np.ndarray] = {}
    for t in req.inputs:
        if t.name not in features:
            raise PayloadError(
                f"inputs[{t.name}]", f"unknown input; the model takes {sorted(features)}"
            )
        if t.name in given:
            raise PayloadError(f"inputs[{t.name}]", "given twice")
        given[t.name], offset = _tensor_array(t, view, offset)
    if not given:
        raise PayloadError("inputs", "no inputs given")
    sizes = {k: v.shape[0] if v.ndim else 1 for k, v in given.items()}
    n = next(iter(sizes.values()))
    for k, size in sizes.items():
        if size != n:
            raise PayloadError(
                f"inputs[{k}]", f"batch size {size} differs from the other inputs' {n}"
            )
    if n == 0:
        raise PayloadError("inputs", "empty batch")
    if n > max_rows:
        raise PayloadError(
            "inputs", f"{n} rows is more than the limit of {max_rows}", 413, "too_many_rows"
        )
    feeds: dict[str, np.ndarray] = {}
    for name, f in features.items():
        field = f"inputs[{name}]"
        if name not in given:
            feeds[name] = default_array(f, n, field)
            continue
        arr = given[name]
        if f.kind != "numeric" and arr.dtype.kind == "f":  # 1.0 would be scored as id "1.0"
            raise PayloadError(field, "ids are BYTES or integers, not floating point")
        if f.kind == "tags":
            if arr.ndim != 2:
                raise PayloadError(
                    field,
                    f"tags are [batch, tokens] (max {f.max_len}); got shape {list(arr.shape)}",
                )
            feeds[name] = column_array(f, [list(row) for row in arr], field)
        else:
            if arr.ndim == 2 and arr.shape[1] == 1:
                arr = arr[:, 0]
            if arr.ndim != 1:
                raise PayloadError(
                    field, f"expected shape [batch] or [batch, 1]; got {list(arr.shape)}"
                )
            if f.kind == "numeric":
                if arr.dtype == object:
                    raise PayloadError(field, "numeric feature needs a numeric datatype (FP32)")
                values = arr.astype(np.float64)
                feeds[name] = column_array(
                    f, [None if np.isnan(v) else v for v in values.tolist()], field
                )
            else:
                feeds[name] = column_array(f, arr.tolist(), field)
    return n, feeds


def _wanted_outputs(model: LoadedModel, req: _InferRequest) -> list[tuple[str, bool]]:
    """(output name, send as binary) for each requested output; all outputs by default."""
    available = model.predictor.outputs
    default_binary = bool(req.parameters.get("binary_data_output", False))
    if not req.outputs:
        return [(name, default_binary) for name in available]
    wanted = []
    for o in req.outputs:
        if o.name not in available:
            raise PayloadError(f"outputs[{o.name}]", f"unknown output; the model has {available}")
        wanted.append((o.name, bool(o.parameters.get("binary_data", default_binary))))
    return wanted


def _response(
    model: LoadedModel, req: _InferRequest, outputs: dict[str, np.ndarray], binary: dict[str, bool]
) -> Response:
    header: dict[str, Any] = {"model_name": model.name, "model_version": model.version}
    if req.id is not None:
        header["id"] = req.id
    tensors = []
    chunks: list[bytes] = []
    for name, arr in outputs.items():
        arr = np.ascontiguousarray(arr, dtype="<f4")
        entry: dict[str, Any] = {"name": name, "datatype": "FP32", "shape": list(arr.shape)}
        if binary[name]:
            data = arr.tobytes()
            entry["parameters"] = {"binary_data_size": len(data)}
            chunks.append(data)
        else:
            entry["data"] = arr.reshape(-1)
        tensors.append(entry)
    header["outputs"] = tensors
    head = orjson.dumps(header, option=orjson.OPT_SERIALIZE_NUMPY)
    if not chunks:
        return Response(head, media_type="application/json")
    return Response(
        head + b"".join(chunks),
        media_type="application/octet-stream",
        headers={"Inference-Header-Content-Length": str(len(head))},
    )
