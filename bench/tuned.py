"""The hand-tuned peer, for comparison: what a user would write in an afternoon instead of using
this project. FastAPI + orjson + numpy + onnxruntime, several uvicorn worker processes with one
intra-op thread each, the run on the event loop, no validation (a bad body is a 500).

It answers the same /predict bodies as the service with the same scores, from the same ONNX file
(the rules it needs, defaults and tag padding, read from the file's metadata). Context values are
repeated for every row, as a server written for any ranking graph feeds it: the graph's inputs
are all [batch]-shaped there.

    python -m mmoe.bench.tuned --model model.onnx --port 8002 --workers 2
"""

from __future__ import annotations

import argparse
import os
from typing import Any

import numpy as np
import onnxruntime as ort
import orjson
from fastapi import FastAPI, Request, Response

from mmoe.contract.metadata import FeatureInfo, read_metadata


def create_app() -> FastAPI:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(os.environ["TUNED_MODEL"], opts, providers=["CPUExecutionProvider"])
    meta = read_metadata(sess.get_modelmeta().custom_metadata_map)
    tasks = {t.name: t.output for t in meta.tasks}
    app = FastAPI()

    def array(f: FeatureInfo, values: list[Any]) -> np.ndarray:
        if f.kind == "numeric":
            return np.array([f.default if v is None else v for v in values], dtype=np.float32)
        if f.kind == "categorical":
            return np.array([str(f.default if v is None else v) for v in values], dtype=object)
        width = f.max_len or 0
        out = np.empty((len(values), width), dtype=object)
        out.fill("")
        for i, value in enumerate(values):
            v: Any = f.default if value is None else value
            tags = [str(t) for t in (v.split(f.separator) if isinstance(v, str) else v) if t != ""]
            out[i, : len(tags[:width])] = tags[:width]
        return out

    @app.get("/readyz")
    async def readyz() -> dict[str, str]:
        return {"status": "ready"}

    @app.post("/predict")
    async def predict(request: Request) -> Response:
        body = orjson.loads(await request.body())
        cands, ctx = body["candidates"], body.get("context") or {}
        n = len(next(iter(cands.values())))
        feeds = {}
        for f in meta.features:
            if f.name in cands:
                feeds[f.name] = array(f, cands[f.name])
            else:
                feeds[f.name] = np.repeat(array(f, [ctx.get(f.name)]), n, axis=0)
        out = dict(zip(tasks.values(), sess.run(list(tasks.values()), feeds), strict=True))
        scores = {t: out[o] for t, o in tasks.items()}
        payload = {"model": {"name": meta.name, "version": meta.version}, "n": n, "scores": scores}
        return Response(orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY))

    return app


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    parser = argparse.ArgumentParser(prog="python -m mmoe.bench.tuned", description=__doc__)
    parser.add_argument("--model", required=True, help="the model.onnx to serve")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8002)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    os.environ["TUNED_MODEL"] = args.model  # read by each worker process
    uvicorn.run(
        "mmoe.bench.tuned:create_app",
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
        log_level="warning",
        access_log=False,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
