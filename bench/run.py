"""`mmoe bench`: how fast the service is on this machine, against floors and peers, measured in
one run on the same weights and the same request bodies (docs/benchmarks.md says how to read it).

- floors: onnxruntime run() in-process on ready arrays, batches of 1..1024 rows, for two graphs
  of the same run: the naive one (exported without context declarations: every row recomputes
  the user's part, as any exporter's graph does) and the context-once one the service serves.
  A floor's throughput limit is the best of {all threads on one run, one thread per run on
  every core}. Plus the time to JSON-decode each body.
- servers, each in its own processes on loopback under a closed-loop load generator, at each
  concurrency x candidates-per-request: latency percentiles, throughput, errors, CPU and memory
  summed over all of a server's processes, the generator's CPU. Each point is compared with the
  floors measured around it (the mean of just before and just after), as the speed of a shared
  machine moves.
  - service: `mmoe serve` (its defaults, or --variant settings);
  - tuned: bench/tuned.py, the hand-tuned peer (FastAPI + orjson + numpy + onnxruntime, one
    worker process per core, no validation), on the same ONNX file;
  - baseline: bench/baseline.py (FastAPI + a pydantic model per row + torch eager), the naive
    peer, on the same weights.
  - flat: the service with the same requests sent without `context`, on both graphs (256
    candidates, c=8), for the flat-request target.
- cold start (process start to /readyz 200) and memory of each server.

Results go to results/<time>/: report.md, results.json, latency_throughput.png.

`mmoe bench paper-census ...` runs the MMoE paper's census-income experiment instead
(bench/paper_census.py, docs/paper_census.md).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from mmoe.bench import experiments, monitoring, paper_census, protocols, report
from mmoe.bench.floor import Floor, FloorPoint
from mmoe.bench.load import run_load, wrk_available
from mmoe.bench.models import MODELS, BenchModel, prepare
from mmoe.bench.payloads import flatten, make_bodies, read_sample
from mmoe.bench.server import ServerProc, Usage
from mmoe.service.settings import usable_cpus

FLOOR_ROWS = [1, 16, 64, 256, 1024]
FLAT_POINT = (report.TARGET_ROWS, 8)  # (candidates, concurrency) of the flat-request target
PEERS = ("tuned", "baseline")


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def _variant(text: str) -> tuple[str, dict[str, str]]:
    """NAME or NAME:KEY=VALUE,KEY=VALUE (MMOE_* settings for that service run)."""
    name, _, rest = text.partition(":")
    if not name or name in PEERS or name.startswith("flat"):
        raise argparse.ArgumentTypeError(f"{text!r}: give the variant a name of its own")
    env = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise argparse.ArgumentTypeError(f"{item!r}: expected KEY=VALUE")
        env[key.strip()] = value.strip()
    return name, env


def add_arguments(p: argparse.ArgumentParser) -> None:
    """`mmoe bench`'s arguments (mmoe/cli.py's command table)."""
    p.description = __doc__
    p.formatter_class = argparse.RawTextHelpFormatter
    p.add_argument("--models", default="demo,easyrec", help="of: " + ", ".join(MODELS))
    p.add_argument("--run", type=Path, help="benchmark this training run instead of --models")
    p.add_argument("--onnx", type=Path, help="its exported model.onnx (with --run)")
    p.add_argument(
        "--naive-onnx",
        type=Path,
        help="the same run exported without context declarations (with --run; default: --onnx)",
    )
    p.add_argument("--data", type=Path, help="data file to cut request bodies from (with --run)")
    p.add_argument(
        "--context", default="", help="features sent once per request, comma-separated (--run)"
    )
    p.add_argument("--quick", action="store_true", help="short runs (under 3 minutes), for CI")
    p.add_argument("--seconds", type=float, help="measured seconds per point (default 5)")
    p.add_argument("--warmup", type=float, help="warm-up seconds per point (default 1)")
    p.add_argument(
        "--concurrency",
        type=_ints,
        default=[1, 8, 32],
        help="requests in flight at once, comma-separated (default 1,8,32)",
    )
    p.add_argument(
        "--candidates",
        type=_ints,
        default=[64, 256, 1024],
        help="candidates per request, comma-separated (default 64,256,1024)",
    )
    p.add_argument(
        "--client",
        choices=["auto", "wrk", "python"],
        default="auto",
        help="load generator: wrk when installed (auto), else the built-in asyncio client",
    )
    p.add_argument(
        "--variant",
        type=_variant,
        action="append",
        help="service settings to compare, NAME:MMOE_X=1,MMOE_Y=2 (repeatable; default: the "
        "service's defaults, named 'service')",
    )
    p.add_argument("--no-tuned", action="store_true", help="leave out the hand-tuned peer")
    p.add_argument("--no-baseline", action="store_true", help="leave out the naive peer")
    p.add_argument("--no-flat", action="store_true", help="leave out the flat-request servers")
    p.add_argument(
        "--protocols",
        action="store_true",
        help="also compare /predict JSON, KServe HTTP binary tensors and KServe gRPC on one "
        "server (bench/protocols.py)",
    )
    p.add_argument(
        "--monitoring",
        action="store_true",
        help="also measure what monitoring costs: run() of the file against its --no-monitor "
        "export, and servers with monitoring on and off, interleaved (bench/monitoring.py)",
    )
    p.add_argument(
        "--experiments",
        action="store_true",
        help="also measure versions side by side (A/B, 100%% shadow, memory with 1, 2 and 4 "
        "versions) and item features (ids alone against every feature inline, file and "
        "Redis) (bench/experiments.py)",
    )
    p.add_argument(
        "--redis",
        help="with --experiments: a Redis (redis://host:port/db) for the item-store run",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="record a py-spy flame graph of each server at 256 candidates, concurrency 8 "
        "(needs py-spy: pip install py-spy, or the dev extra)",
    )
    p.add_argument("--cold-starts", type=int, help="cold starts to time per server (default 3)")
    p.add_argument("--out", type=Path, default=Path("results"), help="results folder")
    p.set_defaults(func=run)
    # Experiments of their own, run instead of the service benchmark when named.
    named = p.add_subparsers(dest="experiment", metavar="EXPERIMENT")
    paper_census.add_arguments(
        named.add_parser(
            "paper-census",
            help="the MMoE paper's census-income experiment (docs/paper_census.md)",
        )
    )


def main(argv: list[str]) -> int:
    """`mmoe bench ARGS` without the command table (the tests call it)."""
    p = argparse.ArgumentParser(prog="mmoe bench")
    add_arguments(p)
    args = p.parse_args(argv)
    result: int = args.func(args)
    return result


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _load() -> str:
    try:
        return " ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "-"


def _feature_names(run_dir: Path) -> list[tuple[str, str]]:
    """(feature name, data column) for each raw input of the model."""
    from mmoe.model.schema import FeatureSchema

    schema = FeatureSchema.load(run_dir / "schema.json")
    return [(f.name, f.column) for f in schema.features]


def _bodies(spec: BenchModel, sizes: list[int], count: int) -> dict[int, list[bytes]]:
    names = _feature_names(spec.run_dir)
    table = read_sample(spec.data, list(dict.fromkeys(c for _, c in names)))
    table = table.select([c for _, c in names]).rename_columns([n for n, _ in names])
    features = [n for n, _ in names]
    return {n: make_bodies(table, features, list(spec.context), n, count, seed=n) for n in sizes}


class Floors:
    """The naive and the context-once floor (one, when the two graphs are one file)."""

    def __init__(self, spec: BenchModel) -> None:
        self.context = Floor(spec.onnx)
        self.naive = self.context if spec.naive == spec.onnx else Floor(spec.naive)

    def point(self, body: bytes, budget_s: float) -> dict[str, FloorPoint]:
        context = self.context.point(body, budget_s)
        naive = context if self.naive is self.context else self.naive.point(body, budget_s)
        return {"naive": naive, "context": context}


def _measure_server(
    server: ServerProc,
    label: str,
    grid: list[tuple[int, int]],
    bodies: dict[int, list[bytes]],
    floors: Floors,
    args: argparse.Namespace,
    log_dir: Path,
    profile: Path,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Cold starts (the last start stays up and is measured under load), then the grid; each
    point is paired with the floors for its batch measured just before and just after it (their
    mean), so that the ratio compares the two under the same conditions on a machine whose
    speed moves."""
    times = []
    for k in range(args.cold_starts):
        times.append(server.start())
        if k < args.cold_starts - 1:
            server.stop()
    ready = server.usage()
    cells = []
    edges: dict[str, tuple[float, Usage]] = {}  # the measured window's (time, server usage)

    def window(edge: str) -> None:
        edges[edge] = (time.perf_counter(), server.usage())

    budget = min(0.2, args.seconds / 10)  # 0.05 s with --quick
    try:
        for n, c in grid:
            before = floors.point(bodies[n][0], budget)
            spy = None
            if args.profile and (n, c) == (256, 8):
                spy = _profile(server, profile, args)
            edges.clear()
            res = run_load(
                args.client,
                server.port,
                "/predict",
                bodies[n],
                c,
                args.seconds,
                args.warmup,
                settle=server.wait_idle,
                on_window=window,
            )
            server.wait_idle()
            if spy is not None:
                spy.wait()
            after = floors.point(bodies[n][0], budget)
            (t0, u0), (t1, u1) = edges["start"], edges["end"]
            cpu_s = u1.cpu_s - u0.cpu_s if u0.cpu_s is not None and u1.cpu_s else None
            cell = res.to_dict() | {
                "server": label,
                "candidates": n,
                "rows_per_s": res.rps * n,
                "server_cpu": cpu_s / (t1 - t0) if cpu_s is not None else None,
                "server_cpu_ms_per_request": (
                    1e3 * cpu_s / res.requests if cpu_s is not None and res.requests else None
                ),
                "server_rss_mb": u1.rss_mb,
                "server_processes": u1.processes,
                "client_cpu": res.client_cpu_s / res.seconds if res.seconds else None,
                "load": _load(),
                "floors": {
                    name: before[name].mean(after[name]).to_dict()
                    | {"run_ms_before_after": [before[name].run_ms, after[name].run_ms]}
                    for name in before
                },
            }
            cells.append(cell)
            _say(
                f"  {label:>10} n={n:<5} c={c:<3} {res.rps:8.1f} req/s  "
                f"p50 {res.p50_ms:7.2f}  p99 {res.p99_ms:7.2f} ms  errors {res.errors}  "
                f"server cpu {cell['server_cpu'] or 0:.2f}"
            )
            if res.errors:
                _say(f"    errors: {res.error_kinds}; server log: {log_dir}")
        end = server.usage()
    finally:
        server.stop()
    times.sort()
    info = {
        "cold_start_s": times[len(times) // 2],
        "cold_starts_s": times,
        "ready_rss_mb": ready.rss_mb,
        "peak_rss_mb": end.peak_rss_mb,
        "processes": end.processes,
        "env": server.env_overrides,
    }
    return info, cells


def _profile(
    server: ServerProc, out: Path, args: argparse.Namespace
) -> subprocess.Popen[bytes] | None:
    """py-spy sampling the server's threads, in all its processes, over the coming point
    (without pausing it: native frames would need that, and would slow the server down)."""
    if shutil.which("py-spy") is None:
        _say("  --profile: py-spy is not installed (pip install py-spy); no profile")
        return None
    argv = ["py-spy", "record", "--pid", str(server.pid), "--output", str(out), "--threads"]
    argv += ["--subprocesses", "--nonblocking", "--duration", str(max(1, round(args.seconds)))]
    _say(f"  profiling into {out}")
    with out.with_suffix(".log").open("wb") as log:  # the child keeps its own handle
        return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)


def bench_model(
    spec: BenchModel,
    args: argparse.Namespace,
    variants: list[tuple[str, dict[str, str]]],
    out_dir: Path,
) -> dict[str, Any]:
    _say(f"{spec.name}: building request bodies")
    sizes = sorted(set(FLOOR_ROWS) | set(args.candidates))
    bodies = _bodies(spec, sizes, count=2 if args.quick else 8)
    budget = min(1.0, args.seconds / 2.5)  # 0.2 s with --quick
    _say(f"{spec.name}: floors")
    floors = Floors(spec)
    before = [floors.point(bodies[n][0], budget) for n in FLOOR_ROWS]
    result: dict[str, Any] = {
        "name": spec.name,
        "onnx": str(spec.onnx),
        "naive_onnx": str(spec.naive),
        "two_graphs": spec.naive != spec.onnx,
        "onnx_bytes": spec.onnx.stat().st_size,
        "floors": {"naive": [], "context": []},
        "servers": {},
        "cells": [],
    }
    grid = [(n, c) for n in args.candidates for c in args.concurrency]

    def log(name: str) -> Path:
        return out_dir / f"{spec.name}-{name}.log"

    runs: list[tuple[str, ServerProc, list[tuple[int, int]], dict[int, list[bytes]]]] = []
    for name, env in variants:
        runs.append((name, ServerProc.service(spec.onnx, env, log(name)), grid, bodies))
    if not args.no_tuned:
        runs.append(
            ("tuned", ServerProc.tuned(spec.onnx, usable_cpus(), None, log("tuned")), grid, bodies)
        )
    if not args.no_baseline:
        runs.append(
            ("baseline", ServerProc.baseline(spec.run_dir, log_path=log("baseline")), grid, bodies)
        )
    n_flat = FLAT_POINT[0]
    if not args.no_flat and n_flat in bodies:
        flat = {n_flat: [flatten(b) for b in bodies[n_flat]]}
        for name, onnx in (("flat", spec.onnx), ("flat, naive graph", spec.naive)):
            runs.append((name, ServerProc.service(onnx, None, log(name)), [FLAT_POINT], flat))
    for name, server, points, server_bodies in runs:
        _say(f"{spec.name}: {name}")
        profile = out_dir / f"profile-{spec.name}-{name.replace(', ', '-')}.svg"
        info, cells = _measure_server(
            server, name, points, server_bodies, floors, args, out_dir, profile
        )
        result["servers"][name] = info
        result["cells"].extend(cells)
    if args.protocols:
        _say(f"{spec.name}: protocols")
        result["protocols"] = protocols.measure(spec, bodies, floors.context, args, out_dir, _say)
    if args.monitoring:
        _say(f"{spec.name}: monitoring")
        result["monitoring"] = monitoring.measure(spec, bodies, floors.context, args, out_dir, _say)
    n = experiments.CANDIDATES
    if wrk_available() and not args.quick and n in bodies:
        _say(f"{spec.name}: the two load generators")
        result["generators"] = experiments.generators(
            spec.onnx, bodies[n], args.seconds, out_dir, (32, 64)
        )
    if args.experiments and n in bodies:
        rounds = 1 if args.quick else 2
        _say(f"{spec.name}: versions side by side")
        result["experiments"] = {
            "versions": experiments.versions(
                spec.onnx, bodies[n], args.client, args.seconds, rounds, out_dir
            ),
            "memory": experiments.memory(spec.onnx, out_dir),
        }
        key, held = spec.items or ("", ())
        if key:
            _say(f"{spec.name}: item features")
            result["experiments"]["items"] = experiments.items(
                spec.onnx,
                bodies[n],
                key,
                list(held),
                args.client,
                args.seconds,
                rounds,
                out_dir,
                args.redis,
            )
    # Measured again after the servers: the faster of the two is the floor (the harder one to
    # meet), and the difference shows how much the machine's speed moved during the run.
    _say(f"{spec.name}: floors again")
    after = [floors.point(bodies[n][0], budget) for n in FLOOR_ROWS]
    for graph in ("naive", "context"):
        for b, a in zip(before, after, strict=True):
            x, y = b[graph], a[graph]
            p = x if x.run_ms <= y.run_ms else y
            result["floors"][graph].append(
                p.to_dict() | {"run_ms_before": x.run_ms, "run_ms_after": y.run_ms}
            )
            _say(
                f"  {graph:>7} floor rows={p.rows:<5} run {p.run_ms:8.3f} ms  "
                f"limit {p.limit_rows_per_s:10.0f} rows/s  json {p.json_ms:.3f} ms  "
                f"decode {p.decode_ms:.3f} ms  ({p.settings}; before {x.run_ms:.3f}, "
                f"after {y.run_ms:.3f} ms)"
            )
    return result


def run(args: argparse.Namespace) -> int:
    if args.seconds is None:
        args.seconds = 0.5 if args.quick else 5.0
    if args.warmup is None:
        args.warmup = 0.2 if args.quick else 1.0
    if args.cold_starts is None:
        args.cold_starts = 1 if args.quick else 3
    if args.client == "auto":  # wrk measures whole seconds: too coarse for --quick
        args.client = "wrk" if wrk_available() and not args.quick else "python"
    elif args.client == "wrk" and not wrk_available():
        _say("error: wrk is not on PATH (apt-get install wrk), or use --client python")
        return 2
    variants = args.variant or [("service", {})]
    if args.run is not None:
        if args.onnx is None or args.data is None:
            _say("error: --run needs --onnx and --data")
            return 2
        specs = [
            BenchModel(
                args.run.name,
                args.run,
                args.onnx,
                args.data,
                tuple(x for x in args.context.split(",") if x),
                naive_onnx=args.naive_onnx,
            )
        ]
    else:
        unknown = [m for m in args.models.split(",") if m not in MODELS]
        if unknown:
            _say(f"error: unknown models {unknown}; choose from {list(MODELS)}")
            return 2
        specs = [MODELS[m] for m in args.models.split(",")]
    for spec in specs:
        prepare(spec, _say)
        refusal = monitoring.unmonitored_refusal(spec) if args.monitoring else None
        if refusal:
            _say(f"error: --monitoring: {refusal}")
            return 2

    started = time.strftime("%Y-%m-%d %H:%M:%S")
    out_dir = args.out / (time.strftime("%Y%m%d-%H%M%S") + ("-quick" if args.quick else ""))
    out_dir.mkdir(parents=True, exist_ok=True)
    import onnxruntime

    argv = sys.argv[1:]  # the bench's own arguments, after `mmoe bench` or `python -m mmoe.bench`
    results: dict[str, Any] = {
        "started": started,
        "argv": argv[1:] if argv[:1] == ["bench"] else argv,
        "client": args.client,
        "seconds": args.seconds,
        "warmup": args.warmup,
        "environment": {
            "cpus": os.cpu_count(),
            "usable_cpus": usable_cpus(),
            "cpu_model": _cpu_model(),
            "python": platform.python_version(),
            "onnxruntime": onnxruntime.__version__,
            "load_before": _load(),
        },
        "models": [],
    }
    for spec in specs:
        results["models"].append(bench_model(spec, args, variants, out_dir))
    results["environment"]["load_after"] = _load()
    (out_dir / "results.json").write_text(json.dumps(results, indent=1))
    text = report.markdown(results) + protocols.markdown(results) + monitoring.markdown(results)
    for model in results["models"]:
        if "generators" in model:
            text += "\n" + experiments.generators_report(model["generators"])
        if "experiments" in model:
            e = model["experiments"]
            text += "\n" + experiments.report(e["versions"], e["memory"], e.get("items"))
    (out_dir / "report.md").write_text(text)
    report.plot(results, out_dir / "latency_throughput.png")
    print(text)
    _say(f"results: {out_dir}/report.md, results.json, latency_throughput.png")
    return 0
