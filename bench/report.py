"""The benchmark's results: Markdown tables (with the targets of issue 13, docs/benchmarks.md)
and a latency-vs-throughput plot."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

TARGET_ROWS = 256  # the targets are stated for 256 candidates per request
RSS_LIMIT_MB = 400.0


def _f(x: float | None, digits: int = 1) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    return f"{x:.{digits}f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


def _cell(cells: list[dict[str, Any]], server: str, rows: int, c: int) -> dict[str, Any] | None:
    for x in cells:
        if x["server"] == server and x["candidates"] == rows and x["concurrency"] == c:
            return x
    return None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def targets(model: dict[str, Any], server: str) -> list[dict[str, Any]]:
    """The issue's targets for one service variant of one model (at 256 candidates, the user
    fields as context), each against the floor measured around the point it judges."""
    cells = model["cells"]
    c1, c8, c32 = (_cell(cells, server, TARGET_ROWS, c) for c in (1, 8, 32))
    tuned8 = _cell(cells, "tuned", TARGET_ROWS, 8)
    flat = _cell(cells, "flat", TARGET_ROWS, 8)
    flat_naive = _cell(cells, "flat, naive graph", TARGET_ROWS, 8)
    out: list[dict[str, Any]] = []

    def add(name: str, value: float | None, goal: str, limit: float | None, ok: bool) -> None:
        out.append({"target": name, "value": value, "goal": goal, "limit": limit, "ok": ok})

    if c8:
        naive = c8["floors"]["naive"]
        limit = naive["limit_rows_per_s"]
        add(
            "c=8 throughput (rows/s)",
            c8["rows_per_s"],
            ">= 1.0 x the naive floor's throughput limit",
            limit,
            c8["rows_per_s"] >= limit,
        )
    if c8 and tuned8:
        ratio = _ratio(c8["rps"], tuned8["rps"])
        add(
            "c=8 throughput / hand-tuned peer",
            ratio,
            ">= 1.5",
            1.5,
            ratio is not None and ratio >= 1.5,
        )
    if c1:
        naive = c1["floors"]["naive"]
        limit = naive["run_ms"] + naive["json_ms"]
        add(
            "c=1 p50 latency (ms)",
            c1["p50_ms"],
            "<= 1.0 x (naive floor + JSON decode)",
            limit,
            c1["p50_ms"] <= limit,
        )
    if c32:
        ratio = _ratio(c32["p99_ms"], c32["p50_ms"])
        add("c=32 p99 / p50", ratio, "<= 2", 2.0, ratio is not None and ratio <= 2)
        add("c=32 errors", c32["errors"], "0", 0, c32["errors"] == 0)
        rss = c32["server_rss_mb"]
        add(
            "c=32 RSS, all serving processes (MB)",
            rss,
            f"<= {RSS_LIMIT_MB:.0f}",
            RSS_LIMIT_MB,
            rss is not None and rss <= RSS_LIMIT_MB,
        )
    if flat and flat_naive:
        ratio = _ratio(flat["rps"], flat_naive["rps"])
        add(
            "flat request, c=8: this graph / the naive graph",
            ratio,
            ">= 0.95 (no slower than today's graph)",
            0.95,
            ratio is not None and ratio >= 0.95,
        )
    return out


def _floor_table(points: list[dict[str, Any]]) -> list[str]:
    return _table(
        [
            "rows",
            "run() ms",
            "fastest session settings",
            "one run at a time rows/s",
            "a 1-thread run per core rows/s",
            "limit rows/s",
            "run() ms before / after the servers",
            "JSON decode ms",
            "service decode ms",
            "body KB",
        ],
        [
            [
                str(p["rows"]),
                _f(p["run_ms"], 3),
                p["settings"],
                _f(p["rows_per_s"], 0),
                _f(p["parallel_rows_per_s"], 0),
                _f(p["limit_rows_per_s"], 0),
                f"{_f(p.get('run_ms_before'), 3)} / {_f(p.get('run_ms_after'), 3)}",
                _f(p["json_ms"], 3),
                _f(p["decode_ms"], 3),
                _f(p["body_bytes"] / 1024, 1),
            ]
            for p in points
        ],
    )


def markdown(results: dict[str, Any]) -> str:
    env = results["environment"]
    loads = [
        float(x["load"].split()[0])
        for m in results["models"]
        for x in m["cells"]
        if x.get("load", "-") != "-"
    ]
    during = (
        f" (1-minute load {min(loads):.1f} to {max(loads):.1f} while measuring)" if loads else ""
    )
    lines = [
        f"# Benchmark {results['started']}",
        "",
        f"{env['cpus']} CPUs ({env['cpu_model']}), load average {env['load_before']} before and "
        f"{env['load_after']} after{during}; Python {env['python']}, onnxruntime "
        f"{env['onnxruntime']}; load generator: {results['client']}; {results['seconds']} s "
        f"per point after {results['warmup']} s warm-up. A load above the CPU count means "
        "other processes competed for the cores: compare ratios within this run, not absolute "
        "numbers across runs.",
        "",
    ]
    for model in results["models"]:
        lines += [f"## {model['name']}", ""]
        if not model["two_graphs"]:
            lines += [
                "The exporter builds one graph here: the naive and the context-once floor are "
                "the same file.",
                "",
            ]
        lines += ["### Floor, naive graph (every row recomputes the context)", ""]
        lines += _floor_table(model["floors"]["naive"])
        lines += ["", "### Floor, context-once graph (the one served)", ""]
        lines += _floor_table(model["floors"]["context"])
        lines += ["", "### Servers under load", ""]
        peers = {
            (peer, x["candidates"], x["concurrency"]): x
            for x in model["cells"]
            for peer in ("tuned", "baseline")
            if x["server"] == peer
        }
        rows = []
        for x in model["cells"]:
            naive, context = x["floors"]["naive"], x["floors"]["context"]
            vs = {
                peer: _ratio(
                    x["rps"],
                    (peers.get((peer, x["candidates"], x["concurrency"])) or {}).get("rps"),
                )
                if x["server"] != peer
                else None
                for peer in ("tuned", "baseline")
            }
            rows.append(
                [
                    x["server"],
                    str(x["candidates"]),
                    str(x["concurrency"]),
                    _f(x["rps"]),
                    _f(x["rows_per_s"], 0),
                    _f(x["p50_ms"], 2),
                    _f(x["p90_ms"], 2),
                    _f(x["p99_ms"], 2),
                    str(x["errors"]),
                    _f(x["server_cpu"], 2),
                    _f(x.get("server_cpu_ms_per_request"), 2),
                    _f(x["server_rss_mb"], 0),
                    _f(x["client_cpu"], 2),
                    _f(_ratio(x["rows_per_s"], naive["limit_rows_per_s"]), 2),
                    _f(_ratio(x["rows_per_s"], context["limit_rows_per_s"]), 2),
                    _f(vs["tuned"], 2),
                    _f(vs["baseline"], 1),
                ]
            )
        lines += _table(
            [
                "server",
                "candidates",
                "c",
                "req/s",
                "rows/s",
                "p50 ms",
                "p90 ms",
                "p99 ms",
                "errors",
                "server CPU (cores)",
                "server CPU ms/request",
                "server RSS MB (all processes)",
                "generator CPU (cores)",
                "x naive floor limit",
                "x context-once floor limit",
                "x tuned",
                "x baseline",
            ],
            rows,
        )
        lines += ["", "### Start-up and memory", ""]
        lines += _table(
            [
                "server",
                "processes",
                "cold start s (median)",
                "cold starts s",
                "RSS ready MB",
                "RSS peak MB (sum of each process's)",
            ],
            [
                [
                    server,
                    str(s.get("processes", "-")),
                    _f(s["cold_start_s"], 2),
                    ", ".join(_f(t, 2) for t in s["cold_starts_s"]),
                    _f(s["ready_rss_mb"], 0),
                    _f(s["peak_rss_mb"], 0),
                ]
                for server, s in model["servers"].items()
            ],
        )
        for server in model["servers"]:
            if server in ("tuned", "baseline") or server.startswith("flat"):
                continue
            checks = targets(model, server)
            if not checks:
                continue
            lines += ["", f"### Targets ({server}, {TARGET_ROWS} candidates)", ""]
            lines += _table(
                ["target", "measured", "goal", "limit", "met"],
                [
                    [
                        t["target"],
                        _f(t["value"], 2),
                        t["goal"],
                        _f(t["limit"], 2),
                        "yes" if t["ok"] else "**no**",
                    ]
                    for t in checks
                ],
            )
        lines.append("")
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], path: Path) -> None:
    """Per model and candidate count: p50 (solid) and p99 (dashed) latency against rows/s, one
    line per server through concurrency 1, 8, 32; the floors' throughput limits as dotted
    lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    models = results["models"]
    sizes = sorted({x["candidates"] for m in models for x in m["cells"]})
    fig, axes = plt.subplots(
        len(models), len(sizes), figsize=(4.2 * len(sizes), 3.6 * len(models)), squeeze=False
    )
    for i, model in enumerate(models):
        servers = list(dict.fromkeys(x["server"] for x in model["cells"]))
        for j, n in enumerate(sizes):
            ax = axes[i][j]
            for k, server in enumerate(servers):
                pts = sorted(
                    (
                        x
                        for x in model["cells"]
                        if x["server"] == server and x["candidates"] == n and x["requests"] > 0
                    ),
                    key=lambda x: x["concurrency"],
                )
                if len(pts) < 2:  # the flat servers' single point
                    continue
                color = f"C{k}"
                xs = [p["rows_per_s"] for p in pts]
                ax.plot(xs, [p["p50_ms"] for p in pts], "o-", color=color, label=f"{server} p50")
                ax.plot(xs, [p["p99_ms"] for p in pts], "x--", color=color, label=f"{server} p99")
                for p in pts:
                    ax.annotate(
                        f"c={p['concurrency']}",
                        (p["rows_per_s"], p["p50_ms"]),
                        fontsize=7,
                        textcoords="offset points",
                        xytext=(3, 3),
                    )
            for graph, style in (("naive", ":"), ("context", "-.")):
                floor = {p["rows"]: p for p in model["floors"][graph]}
                if n in floor:
                    ax.axvline(
                        floor[n]["limit_rows_per_s"],
                        color="grey",
                        linestyle=style,
                        label=f"{graph} floor limit",
                    )
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_title(f"{model['name']}, {n} candidates", fontsize=9)
            ax.set_xlabel("throughput (rows/s)")
            ax.set_ylabel("latency (ms)")
            ax.grid(True, which="both", alpha=0.3)
            if i == 0 and j == 0:
                ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
