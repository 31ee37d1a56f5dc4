"""`mmoe bench --protocols`: the same requests over the three ways a client can call one server,
interleaved at each candidates x concurrency point:

- json: POST /predict, the context features sent once (what the ranking API is for);
- v2-json: the KServe V2 HTTP route with JSON tensors;
- v2-binary: the KServe V2 HTTP route with binary tensors (Triton's binary_tensor_data);
- grpc: KServe V2 ModelInfer over gRPC with raw_input_contents (what tritonclient.grpc sends).

V2 has no shared context: its tensors carry every feature for every candidate (the context
repeated N times), as a Triton or KServe client would send them. Each asks for the task scores
only (probs_<task>), which is what /predict returns. All clients are closed-loop and built in:
the HTTP ones write ready-made requests (bench/load.py), the gRPC one sends ready-serialised
messages on one channel (HTTP/2 streams, grpc.aio), so neither pays for encoding in the window;
their own CPU is reported, since on a small machine they share the cores with the server.
"""

from __future__ import annotations

import argparse
import asyncio
import struct
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import orjson
from tritonclient.grpc import service_pb2 as pb

from mmoe.bench.floor import Floor
from mmoe.bench.load import LoadResult, WindowHook, http_request, load_result, run_requests
from mmoe.bench.models import BenchModel
from mmoe.bench.server import ServerProc, Usage, free_port

PROTOCOLS = ("json", "v2-json", "v2-binary", "grpc")
_INFER = "/inference.GRPCInferenceService/ModelInfer"
_LENGTH = struct.Struct("<I")

# (name, V2 datatype, shape, values as an array) for each input tensor
Tensor = tuple[str, str, list[int], np.ndarray]


def tensors(floor: Floor, body: bytes) -> list[Tensor]:
    """The graph inputs a /predict body decodes to, as V2 tensors. A missing number (NaN, which
    the graph reads as the default) is sent as its default: JSON has no NaN."""
    defaults = {f.name: f.default for f in floor.decoder.meta.features if f.kind == "numeric"}
    out = []
    for name, arr in floor.decoder.decode(body).feeds.items():
        if arr.dtype == object:
            out.append((name, "BYTES", list(arr.shape), arr))
        else:
            missing = np.isnan(arr)
            if missing.any():  # only a feature with a default decodes to NaN
                default = defaults[name]
                assert isinstance(default, float | int), name
                arr = np.where(missing, np.float32(default), arr).astype(np.float32)
            out.append((name, "FP32", list(arr.shape), arr))
    return out


def _raw(datatype: str, arr: np.ndarray) -> bytes:
    """A tensor's raw bytes: little-endian numbers, or each BYTES element after its length."""
    if datatype == "BYTES":
        return b"".join(_LENGTH.pack(len(b)) + b for b in (v.encode() for v in arr.ravel()))
    return np.ascontiguousarray(arr, "<f4").tobytes()


def v2_json_request(model: str, outputs: list[str], inputs: list[Tensor], port: int) -> bytes:
    """The whole HTTP request: JSON tensors (flat `data`, row-major)."""
    body = {
        "inputs": [
            {"name": name, "datatype": datatype, "shape": shape, "data": arr.ravel().tolist()}
            for name, datatype, shape, arr in inputs
        ],
        "outputs": [{"name": o} for o in outputs],
    }
    return http_request(f"/v2/models/{model}/infer", orjson.dumps(body), port)


def v2_binary_request(model: str, outputs: list[str], inputs: list[Tensor], port: int) -> bytes:
    """The whole HTTP request: a JSON header naming the tensors, then their bytes."""
    raws = [_raw(datatype, arr) for _, datatype, _, arr in inputs]
    header = orjson.dumps(
        {
            "inputs": [
                {
                    "name": name,
                    "datatype": datatype,
                    "shape": shape,
                    "parameters": {"binary_data_size": len(raw)},
                }
                for (name, datatype, shape, _), raw in zip(inputs, raws, strict=True)
            ],
            "outputs": [{"name": o, "parameters": {"binary_data": True}} for o in outputs],
        }
    )
    body = header + b"".join(raws)
    headers = {
        "Content-Type": "application/octet-stream",
        "Inference-Header-Content-Length": str(len(header)),
    }
    return http_request(f"/v2/models/{model}/infer", body, port, headers)


def grpc_request(model: str, outputs: list[str], inputs: list[Tensor]) -> bytes:
    """A serialised ModelInferRequest with raw_input_contents."""
    request = pb.ModelInferRequest(model_name=model)
    for name, datatype, shape, arr in inputs:
        request.inputs.add(name=name, datatype=datatype, shape=shape)
        request.raw_input_contents.append(_raw(datatype, arr))
    for o in outputs:
        request.outputs.add(name=o)
    return request.SerializeToString()


def grpc_load(
    target: str,
    requests: list[bytes],
    concurrency: int,
    seconds: float,
    warmup: float,
    timeout: float = 30.0,
    on_window: WindowHook | None = None,
) -> LoadResult:
    """`concurrency` closed loops of ModelInfer calls on one channel: a warm-up of `warmup`
    seconds, then `seconds` measured (`on_window("start")`, `on_window("end")` at its edges)."""
    hook = on_window or (lambda _: None)
    latencies: list[int] = []
    errors: dict[str, int] = {}
    cpu: dict[str, float] = {}

    def window(edge: str) -> None:
        cpu[edge] = time.process_time()  # this process's CPU: the client's own
        hook(edge)

    async def run() -> None:
        async with grpc.aio.insecure_channel(target) as channel:
            call = channel.unary_unary(_INFER)  # bytes in, bytes out: no client-side protobuf
            await channel.channel_ready()
            t0 = time.perf_counter_ns()
            start, end = t0 + int(warmup * 1e9), t0 + int((warmup + seconds) * 1e9)
            loop = asyncio.get_running_loop()
            loop.call_later(warmup, window, "start")
            loop.call_later(warmup + seconds, window, "end")

            async def worker(k: int) -> None:
                i = k
                while (sent := time.perf_counter_ns()) < end:
                    i = (i + 1) % len(requests)
                    try:
                        await call(requests[i], timeout=timeout)
                        error = ""
                    except grpc.aio.AioRpcError as err:
                        error = err.code().name
                    now = time.perf_counter_ns()
                    if start <= now <= end:
                        if error:
                            errors[error] = errors.get(error, 0) + 1
                        else:
                            latencies.append(now - sent)

            await asyncio.gather(*(worker(k) for k in range(concurrency)))

    asyncio.run(run())
    lat = np.asarray(latencies, dtype=np.float64) / 1e6
    client_cpu = cpu.get("end", 0.0) - cpu.get("start", 0.0)
    return load_result("grpc", concurrency, seconds, lat, errors, client_cpu)


def _check_same_scores(
    server: ServerProc,
    model: str,
    outputs: list[str],
    body: bytes,
    inputs: list[Tensor],
    grpc_port: int,
) -> None:
    """gRPC scores a body as /predict does, or the comparison measures nothing."""
    url = f"http://127.0.0.1:{server.port}/predict"
    request = urllib.request.Request(url, body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as answer:
        scores = orjson.loads(answer.read())["scores"]
    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        raw = channel.unary_unary(_INFER)(grpc_request(model, outputs, inputs), timeout=60)
    response = pb.ModelInferResponse.FromString(raw)
    got = {
        o.name: np.frombuffer(r, "<f4")
        for o, r in zip(response.outputs, response.raw_output_contents, strict=True)
    }
    for task, values in scores.items():
        output = next(o for o in outputs if o.endswith(f"_{task}"))
        if not np.allclose(got[output], values, rtol=0, atol=1e-6):
            raise RuntimeError(f"gRPC scores for {task} differ from /predict's")


def measure(
    spec: BenchModel,
    bodies: dict[int, list[bytes]],
    floor: Floor,
    args: argparse.Namespace,
    out_dir: Path,
    say: Callable[[str], None],
) -> list[dict[str, Any]]:
    """One server (default settings, gRPC on), each point of the grid over each protocol, in
    rotating order so that none is always measured first."""
    grpc_port = free_port()
    server = ServerProc.service(
        spec.onnx, {"MMOE_GRPC_PORT": str(grpc_port)}, out_dir / f"{spec.name}-protocols.log"
    )
    meta = floor.decoder.meta
    outputs = [t.output for t in meta.tasks]
    cells = []
    server.start()
    try:
        requests: dict[tuple[str, int], list[bytes]] = {}
        for n in args.candidates:
            v2 = [tensors(floor, b) for b in bodies[n]]
            requests["json", n] = [http_request("/predict", b, server.port) for b in bodies[n]]
            requests["v2-json", n] = [
                v2_json_request(meta.name, outputs, t, server.port) for t in v2
            ]
            requests["v2-binary", n] = [
                v2_binary_request(meta.name, outputs, t, server.port) for t in v2
            ]
            requests["grpc", n] = [grpc_request(meta.name, outputs, t) for t in v2]
            _check_same_scores(server, meta.name, outputs, bodies[n][0], v2[0], grpc_port)
        turn = 0
        for n in args.candidates:
            for c in args.concurrency:
                for k in range(len(PROTOCOLS)):
                    protocol = PROTOCOLS[(turn + k) % len(PROTOCOLS)]
                    cells.append(
                        _point(server, grpc_port, protocol, requests[protocol, n], n, c, args)
                    )
                    cell = cells[-1]
                    say(
                        f"  {protocol:>10} n={n:<5} c={c:<3} {cell['rps']:8.1f} req/s  "
                        f"p50 {cell['p50_ms']:7.2f}  p99 {cell['p99_ms']:7.2f} ms  "
                        f"errors {cell['errors']}  server cpu "
                        f"{cell['server_cpu_ms_per_request'] or 0:.2f} ms/req"
                    )
                turn += 1
    finally:
        server.stop()
    return cells


def _point(
    server: ServerProc,
    grpc_port: int,
    protocol: str,
    requests: list[bytes],
    n: int,
    c: int,
    args: argparse.Namespace,
) -> dict[str, Any]:
    edges: dict[str, tuple[float, Usage]] = {}

    def window(edge: str) -> None:
        edges[edge] = (time.perf_counter(), server.usage())

    if protocol == "grpc":
        res = grpc_load(
            f"127.0.0.1:{grpc_port}", requests, c, args.seconds, args.warmup, on_window=window
        )
    else:
        res = run_requests(server.port, requests, c, args.seconds, args.warmup, on_window=window)
    server.wait_idle()
    (t0, u0), (t1, u1) = edges["start"], edges["end"]
    cpu_s = u1.cpu_s - u0.cpu_s if u0.cpu_s is not None and u1.cpu_s is not None else None
    request_bytes = int(np.mean([len(r) for r in requests]))
    return res.to_dict() | {
        "protocol": protocol,
        "candidates": n,
        "rows_per_s": res.rps * n,
        "request_bytes": request_bytes,
        "server_cpu_ms_per_request": (
            1e3 * cpu_s / res.requests if cpu_s is not None and res.requests else None
        ),
        "server_cpu": cpu_s / (t1 - t0) if cpu_s is not None else None,
        "client_cpu_ms_per_request": (
            1e3 * res.client_cpu_s / res.requests if res.requests else None
        ),
    }


def _f(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{x:,.{digits}f}"


def markdown(results: dict[str, Any]) -> str:
    """The protocol tables of a run (empty without --protocols)."""
    lines: list[str] = []
    for model in results["models"]:
        cells = model.get("protocols")
        if not cells:
            continue
        lines += [
            "",
            f"### {model['name']}: protocols (one server, interleaved)",
            "",
            "| candidates | c | protocol | req/s | vs json | p50 ms | p99 ms | server CPU ms/req "
            "| client CPU ms/req | request bytes | errors |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        json_rps = {
            (x["candidates"], x["concurrency"]): x["rps"] for x in cells if x["protocol"] == "json"
        }
        for x in sorted(
            cells, key=lambda x: (x["candidates"], x["concurrency"], PROTOCOLS.index(x["protocol"]))
        ):
            base = json_rps.get((x["candidates"], x["concurrency"]))
            ratio = x["rps"] / base if base else None
            lines.append(
                f"| {x['candidates']} | {x['concurrency']} | {x['protocol']} | {_f(x['rps'])} "
                f"| {_f(ratio, 2)} | {_f(x['p50_ms'], 2)} | {_f(x['p99_ms'], 2)} "
                f"| {_f(x['server_cpu_ms_per_request'], 2)} "
                f"| {_f(x['client_cpu_ms_per_request'], 2)} | {x['request_bytes']:,} "
                f"| {x['errors']} |"
            )
    return "\n".join(lines) + ("\n" if lines else "")
