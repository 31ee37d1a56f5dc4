"""The obvious implementation, for comparison: FastAPI, a pydantic model per candidate row,
PyTorch eager on the training run's weights, one request at a time.

It answers the same /predict bodies as the service (context + columnar candidates) with the same
scores, using the training code's own preprocessing (`FeatureSchema.encode`).

    python -m mmoe.bench.baseline --run RUN_DIR --port 8001
"""

from __future__ import annotations

import argparse
from typing import Any

import pyarrow as pa
import torch
from fastapi import FastAPI, HTTPException
from pydantic import BaseModel, ConfigDict, create_model, field_validator

from mmoe.contract.outputs import output_names
from mmoe.model.batches import encode_table
from mmoe.model.checkpoint import Run, load_run
from mmoe.model.evaluation import predict
from mmoe.model.schema import FittedFeature


def _field_type(f: FittedFeature) -> Any:
    if f.kind == "numeric":
        return float | None
    if f.kind == "tags":
        return list[str] | None
    return str | None


class _RowBase(BaseModel):
    model_config = ConfigDict(coerce_numbers_to_str=True, extra="forbid")


def row_model(run: Run) -> type[BaseModel]:
    """One pydantic model for a candidate row, with a field per feature."""
    fields: dict[str, Any] = {f.name: (_field_type(f), None) for f in run.schema.features}
    tags = [f for f in run.schema.features if f.kind == "tags"]
    validators: dict[str, Any] = {}
    if tags:

        def split(cls: type, v: Any, info: Any) -> Any:
            if isinstance(v, str):
                sep = run.schema[info.field_name].separator or "|"
                return v.split(sep)
            return v

        names = [f.name for f in tags]
        validators["split_tags"] = field_validator(*names, mode="before")(classmethod(split))
    return create_model("Row", __base__=_RowBase, __validators__=validators, **fields)


class PredictRequest(BaseModel):
    context: dict[str, Any] = {}
    candidates: dict[str, list[Any]]


def create_app(run: Run) -> FastAPI:
    app = FastAPI(title="baseline: FastAPI + pydantic rows + torch eager")
    Row = row_model(run)
    model = run.model.eval()
    scores = {t.name: output_names(t.name, t.kind).score for t in run.config.tasks}
    arrow_types = {
        f.name: pa.float64()
        if f.kind == "numeric"
        else pa.list_(pa.string())
        if f.kind == "tags"
        else pa.string()
        for f in run.schema.features
    }

    @app.get("/readyz")
    async def readyz() -> dict[str, str]:
        return {"status": "ready"}

    # `async def` with blocking work inside: one request at a time, as the obvious version does.
    @app.post("/predict")
    async def predict_route(req: PredictRequest) -> dict[str, Any]:
        columns = req.candidates
        n = len(next(iter(columns.values()))) if columns else 0
        rows = [Row(**req.context, **{k: v[i] for k, v in columns.items()}) for i in range(n)]
        if not rows:
            raise HTTPException(422, "no candidates")
        records = [r.model_dump() for r in rows]
        for f in run.schema.features:
            if f.default is not None:
                for rec in records:
                    if rec[f.name] is None:
                        rec[f.name] = f.default
        table = pa.Table.from_pylist(records, schema=pa.schema(arrow_types))
        with torch.no_grad():
            out = predict(model, encode_table(table, run.schema, [], with_labels=False))
        return {
            "model": {"name": run.config.name, "version": run.config.version},
            "n": n,
            "scores": {t: out[name].tolist() for t, name in scores.items()},
        }

    return app


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    parser = argparse.ArgumentParser(prog="python -m mmoe.bench.baseline", description=__doc__)
    parser.add_argument("--run", required=True, help="training run directory")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    args = parser.parse_args(argv)
    app = create_app(load_run(args.run))
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
