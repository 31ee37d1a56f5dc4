"""`mmoe serve` (one flag per setting, service/settings.py; flags override MMOE_* environment
variables), `mmoe verify` (a file's golden rows, run as the server runs them at load) and
`mmoe items build|push` (service/item_build.py, service/item_push.py)."""

from __future__ import annotations

import argparse
import sys
import typing
from pathlib import Path
from typing import Any

_FLAG_NAMES = {"model_path": "--model"}
_NO_FLAG = {"api_key"}  # a secret on the command line is visible to every user of the machine


def verify(parser: argparse.ArgumentParser) -> None:
    """`mmoe verify`'s arguments (mmoe/cli.py's command table)."""
    parser.add_argument("model", help="the model.onnx to check")
    parser.add_argument(
        "--provider",
        choices=["auto", "cpu", "cuda"],
        default="auto",
        help="onnxruntime execution provider, as MMOE_PROVIDER (default auto)",
    )
    parser.set_defaults(func=_verify)


def items(parser: argparse.ArgumentParser) -> None:
    """`mmoe items build|push`'s arguments (mmoe/cli.py's command table): the serving install
    runs both (pyarrow, and redis for push), no training code."""
    from mmoe.service import item_build, item_push

    commands = parser.add_subparsers(dest="items_command", required=True, metavar="COMMAND")
    item_build.register(commands)
    item_push.register(commands)


def serve(p: argparse.ArgumentParser) -> None:
    """`mmoe serve`'s arguments (mmoe/cli.py's command table)."""
    from mmoe.service.settings import Settings

    for name, field in Settings.model_fields.items():
        if name in _NO_FLAG:
            continue
        flag = _FLAG_NAMES.get(name, "--" + name.replace("_", "-"))
        default = "" if field.default is None else f", default {field.default}"
        help_text = f"{field.description} (env MMOE_{name.upper()}{default})"
        p.add_argument(
            flag, dest=name, help=help_text.replace("%", "%%"), **_kind(field.annotation)
        )
    p.set_defaults(func=_serve)


def _kind(annotation: Any) -> dict[str, Any]:
    """argparse type or choices for a settings field."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is typing.Literal:
        return {"choices": list(args)}
    if annotation is bool:
        return {"action": argparse.BooleanOptionalAction}
    base = args[0] if args else annotation
    return {"type": str if base is Path else base, "metavar": "PATH" if base is Path else None}


def _serve(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from mmoe.service.logs import configure_logging
    from mmoe.service.settings import Settings

    overrides = {
        k: v for k, v in vars(args).items() if v is not None and k not in ("func", "command")
    }
    try:
        settings = Settings(**overrides)
    except ValidationError as err:
        print(f"error: invalid settings: {err}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    if settings.workers > 1:  # the parent imports no model code: it only supervises
        from mmoe.service.workers import Supervisor

        return Supervisor(settings).run()
    import uvicorn

    from mmoe.service.app import create_app, uvicorn_config

    server = uvicorn.Server(uvicorn_config(create_app(settings), settings))
    server.run()
    return 0 if server.started else 3  # 3: the start failed (a setting to fix), as uvicorn.run


def _verify(args: argparse.Namespace) -> int:
    # The serving side only (onnxruntime, the request decoder): no torch, no onnx package.
    import numpy as np

    from mmoe.service.payload import RequestDecoder
    from mmoe.service.predictor import ModelLoadError, Predictor

    try:
        predictor = Predictor(args.model, args.provider)
        golden = predictor.meta.golden
        if golden is None or not golden.rows:
            print(
                f"error: {args.model} has no golden rows (exported before metadata format 1.1): "
                "nothing to verify; export it again",
                file=sys.stderr,
            )
            return 2
        decoder = RequestDecoder(predictor.meta, max(1, len(golden.rows)))
        mismatches = predictor.golden_mismatches(decoder)
    except ModelLoadError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    values = sum(np.asarray(v).size for v in golden.outputs.values())
    where = f"on {predictor.provider}"
    if mismatches:
        print(
            f"{args.model}: {len(mismatches)} of {values} golden values differ from what was "
            f"exported beyond the allowed difference {where}; a server refuses this file:"
        )
        for m in mismatches:
            print(f"  {m}")
        return 1
    print(
        f"{args.model}: {len(golden.rows)} golden rows, {len(golden.outputs)} outputs: all "
        f"{values} values match what was exported {where}"
    )
    return 0
