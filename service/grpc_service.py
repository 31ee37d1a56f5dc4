"""The handlers of KServe V2 over gRPC (`inference.GRPCInferenceService`), on the same model
registry, runners, limits, metrics and API key as HTTP; grpc_v2.py starts and stops the server.

The messages are Triton's generated ones (tritonclient.grpc.service_pb2), so
`tritonclient.grpc` and other KServe V2 clients work unchanged. Served: ServerLive, ServerReady,
ModelReady, ServerMetadata, ModelMetadata and ModelInfer (typed `contents` or
`raw_input_contents`; outputs come back as `raw_output_contents`, as Triton sends them), and
the repository extension (RepositoryIndex, RepositoryModelLoad, RepositoryModelUnload, behind
the API key); the protocol's other methods answer UNIMPLEMENTED. ModelInfer names the model
that answered in its response and in the initial metadata (`x-model-name`, `x-model-version`),
as HTTP does in headers.

Errors carry the HTTP path's text ("<field>: <reason>"), with the status mapped to a gRPC code:
bad input INVALID_ARGUMENT, no model yet or overload UNAVAILABLE (trailing metadata
`retry-after`), unknown model NOT_FOUND, missing or wrong API key UNAUTHENTICATED, a failure
no request should cause INTERNAL (logged under the request's id, which the message gives). A request
message that is not a valid protobuf is INVALID_ARGUMENT too (the handlers take the raw bytes
and parse them, where grpcio's own deserialisation would answer INTERNAL).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from typing import Any

import grpc
import numpy as np
from google.protobuf.message import DecodeError, Message
from starlette.datastructures import Headers
from tritonclient.grpc import service_pb2 as pb

from mmoe.service import kserve_v2
from mmoe.service.auth import check_api_key
from mmoe.service.cpu_share import CpuShare
from mmoe.service.errors import ApiError, InternalError, PayloadError
from mmoe.service.metrics import ServiceMetrics
from mmoe.service.observability import REQUEST_ID
from mmoe.service.registry import LoadedModel, ModelRegistry
from mmoe.service.settings import Settings
from mmoe.service.shadow import ShadowScorer
from mmoe.service.workers import Action

SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name

access_log = logging.getLogger("mmoe.access")
service_log = logging.getLogger("mmoe.service")

# The typed `contents` field that holds each datatype's values (FP16 has none: raw only).
_CONTENTS = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


def status_code(err: ApiError) -> grpc.StatusCode:
    """The gRPC code for an error the HTTP path answers with `err.status`."""
    if err.status == 401:
        return grpc.StatusCode.UNAUTHENTICATED
    if err.status == 403:
        return grpc.StatusCode.PERMISSION_DENIED
    if err.status == 404:
        return grpc.StatusCode.NOT_FOUND
    if err.status == 500:  # a failure no request should cause (InternalError)
        return grpc.StatusCode.INTERNAL
    if err.status >= 500:  # 503: not ready, queue full, timeout
        return grpc.StatusCode.UNAVAILABLE
    return grpc.StatusCode.INVALID_ARGUMENT


_HEALTH = {"ServerLive", "ServerReady", "ModelReady"}  # not access-logged, as /livez, /readyz
Handler = Callable[[Any, grpc.aio.ServicerContext], Awaitable[Message]]


class InferenceService:
    """The handlers of inference.GRPCInferenceService, each observed like an HTTP request: a
    count and latency per method (route label `grpc:<Method>`, status the gRPC code name), an
    access-log line, and a place among the requests in progress."""

    def __init__(
        self,
        settings: Settings,
        registry: ModelRegistry,
        metrics: ServiceMetrics,
        share: CpuShare,
        shadows: ShadowScorer,
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.metrics = metrics
        self.share = share
        self.shadows = shadows

    def handlers(self) -> grpc.GenericRpcHandler:
        methods: dict[str, tuple[type[Message], type[Message], Handler, bool]] = {
            # name: (request, response, handler, needs the API key)
            "ServerLive": (pb.ServerLiveRequest, pb.ServerLiveResponse, self._live, False),
            "ServerReady": (pb.ServerReadyRequest, pb.ServerReadyResponse, self._ready, False),
            "ModelReady": (pb.ModelReadyRequest, pb.ModelReadyResponse, self._model_ready, False),
            "ServerMetadata": (
                pb.ServerMetadataRequest,
                pb.ServerMetadataResponse,
                self._server_metadata,
                False,
            ),
            "ModelMetadata": (
                pb.ModelMetadataRequest,
                pb.ModelMetadataResponse,
                self._model_metadata,
                False,
            ),
            "ModelInfer": (pb.ModelInferRequest, pb.ModelInferResponse, self._infer, True),
            "RepositoryIndex": (
                pb.RepositoryIndexRequest,
                pb.RepositoryIndexResponse,
                self._repository_index,
                True,
            ),
            "RepositoryModelLoad": (
                pb.RepositoryModelLoadRequest,
                pb.RepositoryModelLoadResponse,
                self._repository_load,
                True,
            ),
            "RepositoryModelUnload": (
                pb.RepositoryModelUnloadRequest,
                pb.RepositoryModelUnloadResponse,
                self._repository_unload,
                True,
            ),
        }
        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                name: grpc.unary_unary_rpc_method_handler(
                    self._observed(name, request, handler, needs_key),
                    request_deserializer=None,  # raw bytes: parsed in _observed
                    response_serializer=response.SerializeToString,
                )
                for name, (request, response, handler, needs_key) in methods.items()
            },
        )

    def _observed(
        self, method: str, request_type: type[Message], handler: Handler, needs_key: bool
    ) -> Callable[[bytes, grpc.aio.ServicerContext], Awaitable[Message]]:
        route = f"grpc:{method}"

        async def call(body: bytes, context: grpc.aio.ServicerContext) -> Message:
            start = time.perf_counter()
            metadata = {
                m.key: m.value
                for m in context.invocation_metadata() or ()
                if isinstance(m.value, str)  # not the binary (-bin) entries
            }
            request_id = metadata.get("x-request-id", "")[:128] or uuid.uuid4().hex
            REQUEST_ID.set(request_id)
            trailing: list[tuple[str, str]] = [("x-request-id", request_id)]
            code = grpc.StatusCode.UNKNOWN
            _SERVED.set(None)
            self.metrics.active.inc()
            try:
                with self.share.request():
                    try:
                        response = await self._handle(
                            request_type, handler, needs_key, metadata, body, context
                        )
                    except ApiError as err:
                        code = status_code(err)
                        if "Retry-After" in err.headers:
                            trailing.append(("retry-after", err.headers["Retry-After"]))
                        await context.abort(code, str(err), tuple(trailing))
                    except Exception:  # a bug: logged, answered INTERNAL with the request's id
                        code = grpc.StatusCode.INTERNAL
                        extra = {"event": "internal_error", "request_id": request_id}
                        service_log.exception(
                            "gRPC handler failed", extra=extra | {"method": method}
                        )
                        await context.abort(code, InternalError(request_id).reason, tuple(trailing))
                code = grpc.StatusCode.OK
                context.set_trailing_metadata(tuple(trailing))
                return response
            except asyncio.CancelledError:  # the client went away, or its deadline passed
                code = grpc.StatusCode.CANCELLED
                raise
            finally:
                self.metrics.active.dec()
                elapsed = time.perf_counter() - start
                served = _SERVED.get()
                model = (served.name, served.version) if served is not None else ("", "")
                self.metrics.requests.labels(route, code.name, *model).inc()
                self.metrics.latency.labels(route, *model).observe(elapsed)
                if self.settings.access_log and method not in _HEALTH:
                    access_log.info(
                        "request",
                        extra={
                            "request_id": request_id,
                            "method": "grpc",
                            "path": f"/{SERVICE}/{method}",
                            "status": code.name,
                            "ms": round(elapsed * 1000, 3),
                            "client": context.peer(),
                        },
                    )

        return call

    async def _handle(
        self,
        request_type: type[Message],
        handler: Handler,
        needs_key: bool,
        metadata: dict[str, str],
        body: bytes,
        context: grpc.aio.ServicerContext,
    ) -> Message:
        """The handler's answer to the raw request `body`, or an ApiError."""
        if needs_key:
            check_api_key(self.settings, Headers(metadata))
        try:
            request = request_type.FromString(body)
        except DecodeError as err:
            raise PayloadError(
                None, f"not a valid {request_type.__name__} message: {err}"
            ) from None
        return await handler(request, context)

    # ------------------------------------------------------------------------- handlers

    async def _live(self, request: Any, context: grpc.aio.ServicerContext) -> Message:
        return pb.ServerLiveResponse(live=True)

    async def _ready(self, request: Any, context: grpc.aio.ServicerContext) -> Message:
        return pb.ServerReadyResponse(ready=self.registry.ready()[0])

    async def _model_ready(self, request: Any, context: grpc.aio.ServicerContext) -> Message:
        # "Is it ready?" has an answer for any name: no, for a model not loaded or not served.
        try:
            self.registry.find(request.name, request.version)
        except ApiError:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=True)

    async def _server_metadata(self, request: Any, context: grpc.aio.ServicerContext) -> Message:
        return pb.ServerMetadataResponse(
            name=kserve_v2.SERVER_NAME, version=kserve_v2.SERVER_VERSION
        )

    async def _model_metadata(self, request: Any, context: grpc.aio.ServicerContext) -> Message:
        model = self.registry.find(request.name, request.version)
        meta = kserve_v2.model_metadata(model, self.registry.versions(model.name))
        tensors = {
            # V2 gRPC's TensorMetadata has no parameters: which inputs are context is in the
            # HTTP model metadata (and GET /metadata).
            key: [
                pb.ModelMetadataResponse.TensorMetadata(
                    name=t["name"], datatype=t["datatype"], shape=t["shape"]
                )
                for t in meta[key]
            ]
            for key in ("inputs", "outputs")
        }
        return pb.ModelMetadataResponse(
            name=meta["name"], versions=meta["versions"], platform=meta["platform"], **tensors
        )

    async def _infer(self, request: Any, context: grpc.aio.ServicerContext) -> Message:
        version = request.model_version or None
        feature = self.registry.key_feature(request.model_name)
        key = _key_value(request, feature) if feature and not version else None
        model, shadow = self.registry.resolve(request.model_name, version, key)
        _SERVED.set(model)
        await context.send_initial_metadata(
            (("x-model-name", model.name), ("x-model-version", model.version))
        )
        features = {f.name: f for f in model.predictor.meta.features}
        given = _given(features, request)
        max_rows = self.settings.max_batch_rows
        decoded = kserve_v2.feeds(features, given, max_rows, model.item_fields)
        await model.fill_items(decoded)
        feeds = decoded.feeds
        names = kserve_v2.output_names(model, [o.name for o in request.outputs])
        outputs = await model.runner.infer(feeds, decoded.n)
        response = pb.ModelInferResponse(
            model_name=model.name, model_version=model.version, id=request.id
        )
        for name in names:
            arr = np.ascontiguousarray(outputs[name], dtype="<f4")
            response.outputs.add(name=name, datatype="FP32", shape=arr.shape)
            response.raw_output_contents.append(arr.tobytes())
        if shadow is not None:  # scored once the answer has left (the next turn of the loop)
            feeds_for = kserve_v2.shadow_feeds(model, feeds, given, max_rows)
            asyncio.get_running_loop().call_soon(
                self.shadows.submit, model, shadow, feeds_for, outputs
            )
        return response

    async def _repository_index(self, request: Any, context: grpc.aio.ServicerContext) -> Message:
        entries = self.registry.index()
        if request.ready:
            entries = [e for e in entries if e["state"] == "READY"]
        return pb.RepositoryIndexResponse(
            models=[pb.RepositoryIndexResponse.ModelIndex(**e) for e in entries]
        )

    async def _repository_load(self, request: Any, context: grpc.aio.ServicerContext) -> Message:
        await self._repository_change(Action("load", request.model_name))
        return pb.RepositoryModelLoadResponse()

    async def _repository_unload(self, request: Any, context: grpc.aio.ServicerContext) -> Message:
        await self._repository_change(Action("unload", request.model_name))
        return pb.RepositoryModelUnloadResponse()

    async def _repository_change(self, action: Action) -> None:
        if self.registry.repository is None:
            raise PayloadError(
                None, "load and unload need a model repository (MMOE_MODEL_REPOSITORY)"
            )
        if not self.registry.in_repository(action.arg):
            raise PayloadError(None, f"no model {action.arg!r} in the repository")
        failed = await self.registry.apply_everywhere(action)
        if failed is not None:
            raise PayloadError(None, f"failed to load {action.arg!r}: {failed}")


# The model that answers the call being handled, for its metrics' labels.
_SERVED: ContextVar[LoadedModel | None] = ContextVar("grpc_served", default=None)


def _key_value(request: Any, feature: str) -> str | None:
    """The routing key: the first value of the input named `feature`, if the call gives it."""
    raw = request.raw_input_contents
    for i, t in enumerate(request.inputs):
        if t.name != feature:
            continue
        field = f"inputs[{t.name}]"
        if raw and i < len(raw):
            arr = kserve_v2.tensor_array(field, t.datatype, t.shape, raw=raw[i])
        else:
            arr = kserve_v2.tensor_array(field, t.datatype, t.shape, values=_typed_values(field, t))
        return kserve_v2.first_value(arr)
    return None


def _given(features: dict[str, Any], request: Any) -> dict[str, np.ndarray]:
    """The request's input tensors by name, from raw_input_contents (one per input, in order)
    or from each input's typed contents."""
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise PayloadError(
            "raw_input_contents",
            f"{len(raw)} entries for {len(request.inputs)} inputs: give one per input "
            "(or typed contents for all)",
        )
    given: dict[str, np.ndarray] = {}
    for i, t in enumerate(request.inputs):
        field = kserve_v2.input_field(features, t.name, given)
        if raw:
            if t.HasField("contents"):
                raise PayloadError(field, "give raw_input_contents or contents, not both")
            given[t.name] = kserve_v2.tensor_array(field, t.datatype, t.shape, raw=raw[i])
        else:
            values = _typed_values(field, t)
            given[t.name] = kserve_v2.tensor_array(field, t.datatype, t.shape, values=values)
    return given


def _typed_values(field: str, t: Any) -> list[Any]:
    """The values of an input given as typed contents, from the field its datatype uses."""
    given = [f.name for f, _ in t.contents.ListFields()]
    expected = _CONTENTS.get(t.datatype)
    if expected is None:
        if t.datatype == "FP16":
            raise PayloadError(field, "FP16 has no typed contents: send raw_input_contents")
        return []  # an unsupported datatype: tensor_array says so
    wrong = [name for name in given if name != expected]
    if wrong:
        raise PayloadError(field, f"{t.datatype} values go in contents.{expected}, not {wrong[0]}")
    if not given and any(d != 0 for d in t.shape):
        raise PayloadError(field, f"no values: give contents.{expected} or raw_input_contents")
    return list(getattr(t.contents, expected))
