"""`mmoe serve`: flags override MMOE_* environment variables."""

from __future__ import annotations

import argparse
import sys
from typing import Any


def register(sub: Any) -> None:
    p = sub.add_parser("serve", help="serve model.onnx over HTTP (FastAPI + onnxruntime)")
    p.add_argument("--model", dest="model_path", help="model.onnx (env MMOE_MODEL_PATH)")
    p.add_argument("--model-dir", dest="model_dir", help="directory /admin/reload may load from")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--provider", choices=["auto", "cpu", "cuda"])
    p.add_argument("--intra-op-threads", type=int)
    p.add_argument("--inference-workers", type=int)
    p.add_argument("--max-batch-rows", type=int)
    p.add_argument("--max-body-bytes", type=int)
    p.add_argument(
        "--batch-max-rows", type=int, help="dynamic batching: rows per runtime call (0 = off)"
    )
    p.add_argument("--batch-wait-ms", type=float)
    p.add_argument("--max-queue", type=int)
    p.add_argument("--request-timeout-ms", type=int)
    p.add_argument("--client-timeout-s", type=float)
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    import uvicorn
    from pydantic import ValidationError

    from service.app import create_app
    from service.logs import configure_logging
    from service.protocol import bounded_http_protocol
    from service.settings import Settings

    overrides = {
        k: v for k, v in vars(args).items() if v is not None and k not in ("func", "command")
    }
    try:
        settings = Settings(**overrides)
    except ValidationError as err:
        print(f"error: invalid settings: {err}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=30,
        server_header=False,
        http=bounded_http_protocol(settings.client_timeout_s),
    )
    return 0
