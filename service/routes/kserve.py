"""The KServe V2 / Triton HTTP protocol, so existing Triton and KServe clients can call the model.

Both JSON tensors and Triton's binary tensor data extension (`Inference-Header-Content-Length`)
are understood, in requests and responses. What the protocol means apart from HTTP (model
lookup, metadata, tensors -> feeds) is in service/kserve_v2.py, shared with gRPC.
"""

from __future__ import annotations

from typing import Any

import msgspec
import numpy as np
import orjson
from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from starlette.background import BackgroundTask

from mmoe.contract.metadata import FeatureInfo
from mmoe.service import kserve_v2
from mmoe.service.auth import require_api_key
from mmoe.service.errors import ApiError, PayloadError
from mmoe.service.http import read_request_body
from mmoe.service.kserve_v2 import input_field, tensor_array
from mmoe.service.observability import SERVED
from mmoe.service.payload import duplicate_key
from mmoe.service.registry import LoadedModel, ModelRegistry
from mmoe.service.shadow import ShadowScorer
from mmoe.service.state import get_registry, get_settings
from mmoe.service.workers import Action

router = APIRouter(prefix="/v2", tags=["kserve-v2"])

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


def _model(registry: ModelRegistry, name: str, version: str | None = None) -> LoadedModel:
    try:
        return registry.find(name, version)
    except ApiError as err:
        raise _v2(err) from None


@router.get("", summary="Server metadata")
async def server_metadata() -> dict[str, Any]:
    return {
        "name": kserve_v2.SERVER_NAME,
        "version": kserve_v2.SERVER_VERSION,
        "extensions": ["binary_tensor_data"],
    }


@router.get("/health/live", summary="Server is live")
async def live() -> dict[str, bool]:
    return {"live": True}


@router.get("/health/ready", summary="Server is ready")
async def ready(request: Request) -> Response:
    ok = get_registry(request).ready()[0]
    return Response(orjson.dumps({"ready": ok}), 200 if ok else 503, media_type="application/json")


@router.get("/models/{name}", summary="Model metadata", responses=MODEL_RESPONSES)
@router.get(
    "/models/{name}/versions/{version}", summary="Model metadata", responses=MODEL_RESPONSES
)
async def model_metadata(request: Request, name: str, version: str | None = None) -> dict[str, Any]:
    registry = get_registry(request)
    return kserve_v2.model_metadata(_model(registry, name, version), registry.versions(name))


@router.get("/models/{name}/ready", summary="Model is ready", responses=MODEL_RESPONSES)
@router.get(
    "/models/{name}/versions/{version}/ready", summary="Model is ready", responses=MODEL_RESPONSES
)
async def model_ready(request: Request, name: str, version: str | None = None) -> dict[str, Any]:
    model = _model(get_registry(request), name, version)
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
    registry = get_registry(request)
    try:
        registry.find(name, version or None)  # a name not served: 404 before the body is read
        body = await read_request_body(
            request, get_settings(request).max_body_bytes, ("application/octet-stream",)
        )
        req, binary = _split_body(body, request.headers.get(_HEADER))
        feature = registry.key_feature(name)
        key = _key_value(req, binary, feature) if feature and not version else None
        model, shadow = registry.resolve(name, version or None, key)
        request.scope[SERVED] = model
        features = {f.name: f for f in model.predictor.meta.features}
        given = _given(features, req, binary)
        decoded = kserve_v2.feeds(
            features, given, get_settings(request).max_batch_rows, model.item_fields
        )
        await model.fill_items(decoded)
        feeds = decoded.feeds
        wanted = _wanted_outputs(model, req)
        outputs = await model.runner.infer(feeds, decoded.n)
    except V2Error:
        raise
    except ApiError as err:
        raise _v2(err) from None
    response = _response(model, req, {k: outputs[k] for k, _ in wanted}, dict(wanted))
    if shadow is not None:
        scorer: ShadowScorer = request.app.state.shadows
        feeds_for = kserve_v2.shadow_feeds(
            model, feeds, given, get_settings(request).max_batch_rows
        )
        response.background = BackgroundTask(scorer.submit, model, shadow, feeds_for, outputs)
    return response


def _key_value(req: _InferRequest, binary: bytes, feature: str) -> str | None:
    """The routing key: the first value of the input named `feature`, if the call gives it."""
    offset = 0
    for t in req.inputs:
        size = t.parameters.get("binary_data_size")
        if t.name == feature:
            field = f"inputs[{t.name}]"
            if isinstance(size, int) and not isinstance(size, bool):
                raw = memoryview(binary)[offset : offset + size]
                arr = tensor_array(field, t.datatype, t.shape, raw=raw)
            else:
                arr = tensor_array(field, t.datatype, t.shape, values=t.data)
            return kserve_v2.first_value(arr)
        if isinstance(size, int) and not isinstance(size, bool):
            offset += size
    return None


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


def _given(
    features: dict[str, FeatureInfo], req: _InferRequest, binary: bytes
) -> dict[str, np.ndarray]:
    """The request's input tensors by name, each from its JSON data or its binary data."""
    view = memoryview(binary)
    offset = 0
    given: dict[str, np.ndarray] = {}
    for t in req.inputs:
        field = input_field(features, t.name, given)
        size = t.parameters.get("binary_data_size")
        if size is not None:
            if (
                not isinstance(size, int)
                or isinstance(size, bool)
                or size < 0
                or offset + size > len(view)
            ):
                raise PayloadError(field, "binary_data_size runs past the end of the body")
            raw = view[offset : offset + size]
            offset += size
            given[t.name] = tensor_array(field, t.datatype, t.shape, raw=raw)
        elif t.data is None:
            raise PayloadError(field, "no data and no binary_data_size")
        else:
            given[t.name] = tensor_array(field, t.datatype, t.shape, values=t.data)
    return given


def _wanted_outputs(model: LoadedModel, req: _InferRequest) -> list[tuple[str, bool]]:
    """(output name, send as binary) for each requested output; all outputs by default."""
    default_binary = bool(req.parameters.get("binary_data_output", False))
    asked = {o.name: o.parameters.get("binary_data", default_binary) for o in req.outputs or []}
    names = kserve_v2.output_names(model, list(asked))
    return [(name, bool(asked.get(name, default_binary))) for name in names]


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


# ----------------------------------------------------------------- the repository extension
# Triton's model repository API: list the repository's models and versions with their state,
# load a model (again, as its folder and version policy say now) or unload it, in every
# worker. Behind the API key when one is set.


_REPOSITORY_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"description": "No repository, no such model, or it failed to load", **_V2_ERROR},
    401: {"description": "Missing or wrong API key", **_V2_ERROR},
}


class _RepositoryIndexRequest(msgspec.Struct):
    ready: bool = False


@router.post(
    "/repository/index",
    summary="The repository's models and versions, with their state",
    dependencies=[Depends(_require_api_key)],
    responses={k: v for k, v in _REPOSITORY_RESPONSES.items() if k != 400}
    | {400: {"description": "Malformed JSON", **_V2_ERROR}},
)
async def repository_index(request: Request) -> Response:
    body = await read_request_body(request, 4096)
    try:
        req = msgspec.json.decode(body, type=_RepositoryIndexRequest) if body.strip() else None
    except (msgspec.DecodeError, UnicodeDecodeError) as err:
        raise V2Error(400, "malformed_json", f"malformed JSON: {err}") from None
    entries = get_registry(request).index()
    if req is not None and req.ready:
        entries = [e for e in entries if e["state"] == "READY"]
    return Response(orjson.dumps(entries), media_type="application/json")


@router.post(
    "/repository/models/{name}/load",
    summary="Load a model of the repository (again) in every worker",
    dependencies=[Depends(_require_api_key)],
    responses=_REPOSITORY_RESPONSES,
)
async def repository_load(request: Request, name: str) -> Response:
    return await _repository_change(request, Action("load", name))


@router.post(
    "/repository/models/{name}/unload",
    summary="Unload every version of a model in every worker, until it is loaded again",
    dependencies=[Depends(_require_api_key)],
    responses=_REPOSITORY_RESPONSES,
)
async def repository_unload(request: Request, name: str) -> Response:
    return await _repository_change(request, Action("unload", name))


async def _repository_change(request: Request, action: Action) -> Response:
    registry = get_registry(request)
    await read_request_body(request, 64 * 1024)  # its parameters (config overrides) are not used
    if registry.repository is None:
        raise V2Error(
            400,
            "no_repository",
            "load and unload need a model repository (MMOE_MODEL_REPOSITORY); this server "
            "serves one file",
        )
    if not registry.in_repository(action.arg):
        raise V2Error(400, "unknown_model", f"no model {action.arg!r} in the repository")
    failed = await registry.apply_everywhere(action)
    if failed is not None:
        raise V2Error(400, "load_failed", f"failed to load {action.arg!r}: {failed}")
    return Response(b"{}", media_type="application/json")
