"""What serving several versions costs, and what item features held by the server save, each
measured in one run on one model's file (`mmoe bench --experiments`; docs/experiments.md,
docs/items.md):

- versions: the file served alone from a repository (one), as two versions in a 50/50 A/B
  (ab), and as the primary with a second version scoring a 100% shadow (shadow): throughput at
  c=8 and, paced so that the cores are idle between requests, the primary's latency at c=1;
  rounds interleaved (one, ab, shadow, one, ...) as a shared machine's speed moves;
- memory: the server's RSS (every process) with 1, 2 and 4 versions loaded, and after going
  back to 1 (what unloading returns);
- items: the same requests with every item feature inline and with the item ids alone, from
  an item file and from Redis (warm cache), at c=1 and c=8, and the bodies' sizes.
"""

from __future__ import annotations

import http.client
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mmoe.bench.load import run_load
from mmoe.bench.server import ServerProc

CANDIDATES = 256


def _post(port: int, body: bytes) -> float:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        t0 = time.perf_counter()
        conn.request("POST", "/predict", body, {"Content-Type": "application/json"})
        r = conn.getresponse()
        r.read()
        if r.status != 200:
            raise RuntimeError(f"/predict answered {r.status}")
        return (time.perf_counter() - t0) * 1000
    finally:
        conn.close()


def paced_p50(port: int, bodies: list[bytes], seconds: float, gap_s: float = 0.03) -> float:
    """Median latency (ms) of one request at a time with `gap_s` idle between them: a request
    that finds the cores idle (a shadow copy, if any, scored in the gap)."""
    out = []
    until = time.perf_counter() + seconds
    k = 0
    while time.perf_counter() < until:
        out.append(_post(port, bodies[k % len(bodies)]))
        k += 1
        time.sleep(gap_s)
    return statistics.median(out)


def _repository(root: Path, model: Path, versions: int, routing: str) -> Path:
    repo = root / f"repo-{versions}-{abs(hash(routing)) % 10_000}"
    for v in range(1, versions + 1):
        (repo / "ranker" / str(v)).mkdir(parents=True, exist_ok=True)
        shutil.copy(model, repo / "ranker" / str(v) / "model.onnx")
    (repo / "ranker" / "config.yaml").write_text("version_policy: {all: {}}\n")
    (repo / "routing.yaml").write_text(routing)
    return repo


ROUTINGS = {
    "one": "",
    "ab": 'models:\n  ranker:\n    key: context.user_id\n    arms: {"1": 50, "2": 50}\n',
    "shadow": 'models:\n  ranker:\n    arms: {"1": 100}\n    shadow: {version: "2"}\n',
}


def versions(
    model: Path, bodies: list[bytes], client: str, seconds: float, rounds: int, out: Path
) -> dict[str, Any]:
    results: dict[str, dict[str, list[float]]] = {
        name: {"c8_rps": [], "c1_paced_p50_ms": [], "shed_share": []} for name in ROUTINGS
    }
    with tempfile.TemporaryDirectory(prefix="bench-experiments-") as tmp:
        repos = {
            name: _repository(Path(tmp), model, 1 if name == "one" else 2, routing)
            for name, routing in ROUTINGS.items()
        }
        for _ in range(rounds):
            for name, repo in repos.items():
                env = {"MMOE_MODEL_REPOSITORY": str(repo)}
                with ServerProc.service(repo / "unused.onnx", env, out / f"{name}.log") as server:
                    load = run_load(client, server.port, "/predict", bodies, 8, seconds, 1.0)
                    results[name]["c8_rps"].append(load.rps)
                    server.wait_idle()
                    p50 = paced_p50(server.port, bodies, seconds)
                    results[name]["c1_paced_p50_ms"].append(p50)
                    shed = _shadow_counts(server.port)
                    total = sum(shed.values())
                    results[name]["shed_share"].append(shed.get("shed", 0) / total if total else 0)
    return {name: {k: statistics.median(v) for k, v in r.items()} for name, r in results.items()}


def _metrics(port: int) -> str:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", "/metrics")
        return conn.getresponse().read().decode()
    finally:
        conn.close()


def _shadow_counts(port: int) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    for family in text_string_to_metric_families(_metrics(port)):
        for s in family.samples:
            if s.name == "mmoe_shadow_requests_total":
                out[s.labels["outcome"]] = out.get(s.labels["outcome"], 0.0) + s.value
    return out


def memory(model: Path, out: Path) -> dict[str, float]:
    """RSS (MB, every process of the server) with 1, 2 and 4 versions loaded, then 1 again."""
    rss: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        repo = _repository(Path(tmp), model, 1, "")
        env = {"MMOE_MODEL_REPOSITORY": str(repo)}
        with ServerProc.service(repo / "unused.onnx", env, out / "memory.log") as server:
            for count in (1, 2, 4):
                for v in range(2, count + 1):
                    folder = repo / "ranker" / str(v)
                    folder.mkdir(parents=True, exist_ok=True)
                    shutil.copy(model, folder / "model.onnx")
                _reload(server.port)
                time.sleep(1.0)
                rss[f"{count} versions"] = server.usage().rss_mb or 0.0
            for v in (2, 3, 4):
                shutil.rmtree(repo / "ranker" / str(v))
            _reload(server.port)
            time.sleep(1.0)
            rss["back to 1"] = server.usage().rss_mb or 0.0
    return rss


def _reload(port: int) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        conn.request("POST", "/admin/reload", b"{}", {"Content-Type": "application/json"})
        r = conn.getresponse()
        body = r.read()
        if r.status != 200 or json.loads(body).get("failed"):
            raise RuntimeError(f"reload: {r.status} {body[:300]!r}")
    finally:
        conn.close()


def item_bodies(
    bodies: list[bytes], key: str, item_features: list[str]
) -> tuple[list[bytes], pa.Table]:
    """Each body with its candidates' item features left out (the ids alone), and the item
    table of every item the bodies name, from their own values."""
    rows: dict[str, dict[str, Any]] = {}
    slim = []
    for raw in bodies:
        body = json.loads(raw)
        cands = body["candidates"]
        for j, item in enumerate(cands[key]):
            rows[str(item)] = {f: cands[f][j] for f in item_features if f in cands}
        body["candidates"] = {k: v for k, v in cands.items() if k not in item_features or k == key}
        slim.append(json.dumps(body, separators=(",", ":")).encode())
    columns: dict[str, list[Any]] = {key: list(rows)}
    for f in item_features:
        columns[f] = [r.get(f) for r in rows.values()]
    return slim, pa.table(columns)


def items(
    model: Path,
    bodies: list[bytes],
    key: str,
    item_features: list[str],
    client: str,
    seconds: float,
    rounds: int,
    out: Path,
    redis_url: str | None,
) -> dict[str, Any]:
    slim, table = item_bodies(bodies, key, item_features)
    results: dict[str, dict[str, list[float]]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-items-") as tmp:
        path = Path(tmp) / "items.parquet"
        pq.write_table(table, path)
        setups: dict[str, tuple[dict[str, str], list[bytes]]] = {
            "inline": ({}, bodies),
            "ids, file": ({"MMOE_ITEMS": str(path), "MMOE_ITEMS_KEY": key}, slim),
        }
        if redis_url is not None:
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "mmoe",
                    "items",
                    "push",
                    "--data",
                    str(path),
                    "--key",
                    key,
                    "--redis",
                    redis_url,
                ],
                check=True,
                capture_output=True,
            )
            setups["ids, Redis"] = ({"MMOE_ITEMS": redis_url, "MMOE_ITEMS_TTL_S": "3600"}, slim)
        for _ in range(rounds):
            for name, (env, sent) in setups.items():
                r = results.setdefault(name, {"c8_rps": [], "c1_p50_ms": []})
                with ServerProc.service(model, env, out / f"items-{name}.log") as server:
                    run_load(client, server.port, "/predict", sent, 8, 2.0, 0.5)  # warm caches
                    load = run_load(client, server.port, "/predict", sent, 8, seconds, 1.0)
                    r["c8_rps"].append(load.rps)
                    single = run_load(client, server.port, "/predict", sent, 1, seconds, 1.0)
                    r["c1_p50_ms"].append(single.p50_ms)
    summary: dict[str, Any] = {
        name: {k: statistics.median(v) for k, v in r.items()} for name, r in results.items()
    }
    summary["body_bytes"] = {
        "inline": float(np.median([len(b) for b in bodies])),
        "ids": float(np.median([len(b) for b in slim])),
    }
    return summary


def report(
    versions_: dict[str, Any], memory_: dict[str, float], items_: dict[str, Any] | None
) -> str:
    lines = ["## Experiments: versions side by side", ""]
    one = versions_["one"]
    lines += [
        "| | c=8 req/s | vs one | c=1 paced p50 ms | vs one | shadow shed |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in versions_.items():
        lines.append(
            f"| {name} | {r['c8_rps']:.0f} | {r['c8_rps'] / one['c8_rps']:.3f} | "
            f"{r['c1_paced_p50_ms']:.2f} | {r['c1_paced_p50_ms'] / one['c1_paced_p50_ms']:.3f} | "
            f"{r['shed_share']:.0%} |"
        )
    lines += ["", "| versions loaded | RSS MB |", "|---|---|"]
    lines += [f"| {k} | {v:.0f} |" for k, v in memory_.items()]
    if items_ is None:
        return "\n".join(lines) + "\n"
    lines += ["", "## Item features: ids alone against every feature inline", ""]
    inline = items_["inline"]
    lines += ["| | c=8 req/s | vs inline | c=1 p50 ms | vs inline |", "|---|---|---|---|---|"]
    for name, r in items_.items():
        if name == "body_bytes":
            continue
        lines.append(
            f"| {name} | {r['c8_rps']:.0f} | {r['c8_rps'] / inline['c8_rps']:.2f} | "
            f"{r['c1_p50_ms']:.2f} | {r['c1_p50_ms'] / inline['c1_p50_ms']:.2f} |"
        )
    sizes = items_["body_bytes"]
    lines += ["", f"Body: {sizes['inline']:.0f} bytes inline, {sizes['ids']:.0f} with ids alone."]
    return "\n".join(lines) + "\n"


def generators(
    model: Path, bodies: list[bytes], seconds: float, out: Path, concurrency: tuple[int, ...]
) -> list[dict[str, Any]]:
    """The service at each concurrency under both load generators, wrk (2 threads) and the
    built-in asyncio client, one after the other on one server: their p50 and p99 side by
    side (docs/benchmarks.md says why they may differ)."""
    rows = []
    with ServerProc.service(model, None, out / "generators.log") as server:
        run_load("python", server.port, "/predict", bodies, 8, 2.0, 0.5)  # warm
        for c in concurrency:
            for client in ("python", "wrk"):
                server.wait_idle()
                r = run_load(client, server.port, "/predict", bodies, c, seconds, 1.0)
                rows.append(
                    {
                        "concurrency": c,
                        "client": client,
                        "rps": r.rps,
                        "p50_ms": r.p50_ms,
                        "p99_ms": r.p99_ms,
                        "errors": r.errors,
                    }
                )
    return rows


def generators_report(rows: list[dict[str, Any]]) -> str:
    lines = ["## The two load generators side by side", ""]
    lines += ["| c | generator | req/s | p50 ms | p99 ms | p99/p50 | errors |"]
    lines += ["|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['concurrency']} | {r['client']} | {r['rps']:.0f} | {r['p50_ms']:.1f} | "
            f"{r['p99_ms']:.1f} | {r['p99_ms'] / r['p50_ms']:.2f} | {r['errors']} |"
        )
    return "\n".join(lines) + "\n"
