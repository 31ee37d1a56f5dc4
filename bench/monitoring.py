"""`mmoe bench --monitoring`: what watching the model (docs/monitoring.md) costs, as throughput
ratios measured interleaved in one run, on the same request bodies:

- in process, one intra-op thread, in the calling thread's CPU time (what a busy machine
  disturbs least): run() of the model file against the same run exported with `--no-monitor`
  (every output fetched, as the service does with all of monitoring on), and the service's
  recording of one call's series (ModelMonitor.record, every piece on) beside that run();
- service: `mmoe serve` over HTTP under the closed-loop load generator, three servers up at
  once and measured in turn: monitoring on (the defaults), every MMOE_MONITOR_* piece off (the
  same file: what the service itself adds), and the `--no-monitor` file with every piece off
  (nothing of monitoring at all); in requests/s and in requests per CPU second of the server.

Each round measures every variant once, in rotating order; a variant's ratio is the median of
its rounds' ratios to the monitored one, so that a machine whose speed moves during the run
moves both sides of each ratio. The `--no-monitor` file is exported from the model's run the
first time (beside the model file, or in the results folder for `--run`) and again whenever it
is older than the model file.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import onnxruntime as ort
from prometheus_client import CollectorRegistry

from mmoe.bench.floor import Floor, median_seconds, session
from mmoe.bench.load import LoadResult, run_load
from mmoe.bench.models import MODELS, BenchModel
from mmoe.bench.server import ServerProc
from mmoe.contract.metadata import read_metadata
from mmoe.service.monitoring import MonitoringMetrics, Watched

GRAPH_ROUNDS = 10
SERVICE_ROUNDS = 6
_ALL_OFF = {f"MMOE_MONITOR_{piece}": "false" for piece in ("FEATURES", "GATES", "SCORES")}
# (name, whether it serves the --no-monitor file, its settings); the first is the reference.
SERVERS: tuple[tuple[str, bool, dict[str, str]], ...] = (
    ("monitoring on", False, {}),
    ("settings off", False, _ALL_OFF),
    ("no-monitor file", True, _ALL_OFF),
)


def unmonitored_file(spec: BenchModel, out_dir: Path, say: Callable[[str], None]) -> Path:
    """The model's run exported with `--no-monitor`: `<model>.no-monitor.onnx` beside the model
    file where it is there and newer than the model; else exported now (beside the bench's own
    models, into `out_dir` for any other)."""
    beside = spec.onnx.parent / f"{spec.onnx.stem}.no-monitor.onnx"
    if beside.exists() and beside.stat().st_mtime >= spec.onnx.stat().st_mtime:
        return beside
    path = beside if spec in MODELS.values() else out_dir / beside.name
    if not path.exists() or path.stat().st_mtime < spec.onnx.stat().st_mtime:
        from mmoe.export.exporter import export_run

        say(f"{spec.name}: exporting {spec.run_dir} with --no-monitor -> {path}")
        export_run(spec.run_dir, path, monitor=False)
    return path


def unmonitored_refusal(spec: BenchModel) -> str | None:
    """Why the comparison cannot run on this model, or None."""
    sess = ort.InferenceSession(str(spec.onnx), providers=["CPUExecutionProvider"])
    if read_metadata(sess.get_modelmeta().custom_metadata_map).monitor is None:
        return f"{spec.onnx} has no monitoring outputs (exported with --no-monitor?)"
    return None


def _ratios(rounds: list[dict[str, float]], reference: str) -> dict[str, dict[str, float]]:
    """The reference's throughput over each other variant's: the median of the rounds, and
    their range (1 - ratio is what the reference's extra work costs)."""
    out = {}
    for name in rounds[0]:
        if name == reference:
            continue
        per_round = [r[reference] / r[name] for r in rounds]
        out[name] = {
            "ratio": statistics.median(per_round),
            "low": min(per_round),
            "high": max(per_round),
        }
    return out


def _graph(
    floor: Floor, files: dict[bool, Path], body: bytes, budget_s: float, say: Callable[[str], None]
) -> dict[str, Any]:
    """Rows per CPU second of run() on the monitored file and on the --no-monitor one, and of
    the service's recording of a call's monitoring series (ModelMonitor.record, every piece
    on) beside run() on the monitored file, interleaved. With one intra-op thread run() works
    on the calling thread, so that thread's CPU time is the work, which other processes on a
    busy machine disturb far less than the wall time."""
    feeds = floor.decoder.decode(body).feeds
    rows = max(len(v) for v in feeds.values())
    calls = {}
    for name, path in (("monitoring on", files[False]), ("no-monitor file", files[True])):
        sess = session(path, 1, False)
        calls[name] = partial(sess.run, [o.name for o in sess.get_outputs()], feeds)
    sess = session(files[False], 1, False)
    names = [o.name for o in sess.get_outputs()]
    outputs = dict(zip(names, sess.run(names, feeds), strict=True))
    metrics = MonitoringMetrics(CollectorRegistry(), Watched())
    monitor = metrics.monitor(floor.decoder.meta, "bench", "1")
    record = partial(monitor.record, feeds, outputs)
    rounds, recording = [], []
    for k in range(GRAPH_ROUNDS):
        order = list(calls) if k % 2 == 0 else list(reversed(calls))
        seconds = {n: median_seconds(calls[n], budget_s, clock=time.thread_time) for n in order}
        rounds.append({n: rows / s for n, s in seconds.items()})
        recorded = median_seconds(record, budget_s / 4, clock=time.thread_time)
        # As a throughput ratio: run() alone over run() and the recording.
        on = seconds["monitoring on"]
        recording.append({"recording": rows / (on + recorded), "run() alone": rows / on})
    ratios = _ratios(rounds, "monitoring on")
    recorded_ratio = _ratios(recording, "recording")["run() alone"]
    say(
        f"  run() n={rows:<5} rows per CPU second, monitored over --no-monitor: "
        f"{ratios['no-monitor file']['ratio']:.3f}; with the recording over without: "
        f"{recorded_ratio['ratio']:.3f}"
    )
    return {
        "rows": rows,
        "rounds": rounds,
        "ratios": ratios,
        "recording_rounds": recording,
        "recording": recorded_ratio,
    }


def _point(
    server: ServerProc, bodies: list[bytes], concurrency: int, args: argparse.Namespace
) -> tuple[LoadResult, float | None]:
    """One measured window on one server, and the server's CPU ms per request over it (None
    without /proc)."""
    edges: dict[str, float | None] = {}

    def window(edge: str) -> None:
        edges[edge] = server.usage().cpu_s

    res = run_load(
        args.client,
        server.port,
        "/predict",
        bodies,
        concurrency,
        args.seconds,
        args.warmup,
        settle=server.wait_idle,
        on_window=window,
    )
    server.wait_idle()
    start, end = edges["start"], edges["end"]
    if start is None or end is None or not res.requests:
        return res, None
    return res, 1e3 * (end - start) / res.requests


def _service(
    files: dict[bool, Path],
    bodies: list[bytes],
    rows: int,
    concurrency: int,
    args: argparse.Namespace,
    out_dir: Path,
    name: str,
    say: Callable[[str], None],
) -> dict[str, Any]:
    """Requests/s of each of SERVERS, up at once and measured in turn."""
    servers = {
        label: ServerProc.service(
            files[plain], env, out_dir / f"{name}-monitoring-{label.replace(' ', '-')}.log"
        )
        for label, plain, env in SERVERS
    }
    rounds: list[dict[str, float]] = []  # requests/s
    cpu_rounds: list[dict[str, float]] = []  # the server's CPU ms per request
    errors = dict.fromkeys(servers, 0)
    try:
        for server in servers.values():
            server.start()
        for k in range(SERVICE_ROUNDS):
            order = list(servers)[k % len(servers) :] + list(servers)[: k % len(servers)]
            rps, cpu_ms = {}, {}
            for label in order:
                res, cpu_per_request = _point(servers[label], bodies, concurrency, args)
                rps[label] = res.rps
                if cpu_per_request is not None:
                    cpu_ms[label] = cpu_per_request
                errors[label] += res.errors
            rounds.append(rps)
            cpu_rounds.append(cpu_ms)
    finally:
        for server in servers.values():
            server.stop()
    ratios = _ratios(rounds, SERVERS[0][0])
    # Requests per CPU second: the throughput of a server that has the cores to itself, which
    # a busy machine disturbs less than requests/s. Without /proc there is none.
    per_cpu = [{k: 1 / v for k, v in r.items()} for r in cpu_rounds if len(r) == len(servers)]
    cpu_ratios = _ratios(per_cpu, SERVERS[0][0]) if len(per_cpu) == len(rounds) else {}
    for label, r in ratios.items():
        cpu = cpu_ratios.get(label)
        say(
            f"  service n={rows:<5} c={concurrency:<3} monitoring on over {label}: requests/s "
            f"{r['ratio']:.3f} (cost {100 * (1 - r['ratio']):.1f}%)"
            + (f", requests per CPU second {cpu['ratio']:.3f}" if cpu else "")
        )
    return {
        "candidates": rows,
        "concurrency": concurrency,
        "rounds": rounds,
        "cpu_ms_rounds": cpu_rounds,
        "errors": errors,
        "ratios": ratios,
        "cpu_ratios": cpu_ratios,
    }


def measure(
    spec: BenchModel,
    bodies: dict[int, list[bytes]],
    floor: Floor,
    args: argparse.Namespace,
    out_dir: Path,
    say: Callable[[str], None],
) -> dict[str, Any]:
    """The graph and service comparisons at each of `args.candidates` (the service's at each
    of `args.concurrency` too)."""
    plain = unmonitored_file(spec, out_dir, say)
    files = {False: spec.onnx, True: plain}
    t0 = time.perf_counter()
    budget = min(0.5, args.seconds / 5)  # 0.1 s with --quick
    graph = [_graph(floor, files, bodies[n][0], budget, say) for n in args.candidates]
    service = [
        _service(files, bodies[n], n, c, args, out_dir, spec.name, say)
        for n in args.candidates
        for c in args.concurrency
    ]
    return {
        "plain_onnx": str(plain),
        "graph": graph,
        "service": service,
        "seconds": time.perf_counter() - t0,
    }


def _cost(ratio: dict[str, float]) -> str:
    """The throughput lost to monitoring, from its ratio: the median, and the rounds' range."""
    return (
        f"{100 * (1 - ratio['ratio']):.1f}% "
        f"({100 * (1 - ratio['high']):.1f} to {100 * (1 - ratio['low']):.1f})"
    )


def markdown(results: dict[str, Any]) -> str:
    """The monitoring cost tables of a run (empty without --monitoring)."""
    lines: list[str] = []
    for model in results["models"]:
        found = model.get("monitoring")
        if not found:
            continue
        lines += [
            "",
            f"### {model['name']}: what monitoring costs (interleaved)",
            "",
            "Throughput lost with monitoring on: the median of the rounds (their range). Server "
            "CPU: in requests per CPU second of the server, what a server with the cores to "
            "itself would lose.",
            "",
            "| measured | candidates | c | against | cost: throughput | cost: server CPU |",
            "|---|---|---|---|---|---|",
        ]
        for g in found["graph"]:
            lines.append(
                f"| run() in process, 1 thread | {g['rows']} | - | no-monitor file | - "
                f"| {_cost(g['ratios']['no-monitor file'])} |"
            )
            lines.append(
                f"| the service's recording, beside run() | {g['rows']} | - | run() alone | - "
                f"| {_cost(g['recording'])} |"
            )
        for s in found["service"]:
            for label, ratio in s["ratios"].items():
                cpu = s["cpu_ratios"].get(label)
                lines.append(
                    f"| service over HTTP | {s['candidates']} | {s['concurrency']} "
                    f"| {label} | {_cost(ratio)} | {_cost(cpu) if cpu else '-'} |"
                )
    return "\n".join(lines) + ("\n" if lines else "")
