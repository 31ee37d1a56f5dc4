"""KServe V2 over gRPC beside the HTTP app: in the same process and event loop, started and
stopped by the app's lifespan (`start`, `stop`); off unless MMOE_GRPC_PORT is set. The
handlers are in grpc_service.py, imported only when the port is set: grpcio and the protocol's
messages add about 0.25 s to a start.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from mmoe.service.cpu_share import CpuShare
from mmoe.service.metrics import ServiceMetrics
from mmoe.service.registry import ModelRegistry
from mmoe.service.settings import Settings
from mmoe.service.shadow import ShadowScorer

if TYPE_CHECKING:
    import grpc

# Calls in progress at shutdown get this long to finish (after the HTTP drain, which uvicorn
# runs before the lifespan ends); deploy/k8s/ sizes the pod's grace period with it.
STOP_GRACE_S = 10.0

log = logging.getLogger("mmoe.service")


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def start(
    settings: Settings,
    registry: ModelRegistry,
    metrics: ServiceMetrics,
    share: CpuShare,
    shadows: ShadowScorer,
) -> grpc.aio.Server | None:
    """Serve KServe V2 over gRPC on settings.host:settings.grpc_port (None when unset).
    Raises RuntimeError if the port cannot be bound."""
    if settings.grpc_port is None:
        return None
    import grpc

    from mmoe.service.grpc_service import InferenceService

    server = grpc.aio.server(
        options=[
            # The same bound as an HTTP body; past it grpcio answers RESOURCE_EXHAUSTED.
            ("grpc.max_receive_message_length", settings.max_body_bytes),
            # Each worker process of a multi-process server binds the same port (the kernel
            # spreads connections over them). grpcio's default on Linux, stated here because
            # the deployment relies on it.
            ("grpc.so_reuseport", 1),
        ]
    )
    service = InferenceService(settings, registry, metrics, share, shadows)
    server.add_generic_rpc_handlers((service.handlers(),))
    address = _address(settings.host, settings.grpc_port)
    try:
        server.add_insecure_port(address)
    except RuntimeError:
        log.critical(
            f"cannot serve gRPC: {address} cannot be bound (in use, or not an address here)",
            extra={"event": "grpc_bind_failed"},
        )
        raise
    await server.start()
    log.info("gRPC listening", extra={"event": "grpc_listening", "address": address})
    return server


async def stop(server: grpc.aio.Server | None) -> None:
    """Refuse new calls and let those in progress finish (up to STOP_GRACE_S)."""
    if server is not None:
        await server.stop(STOP_GRACE_S)
