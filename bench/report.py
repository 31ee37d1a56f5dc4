"""The benchmark's results: Markdown tables (with the targets of DESIGN.md section 5) and a
latency-vs-throughput plot."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

TARGET_ROWS = 256  # the targets are stated for 256 candidates per request


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


def _floor_of(model: dict[str, Any], cell: dict[str, Any]) -> tuple[float, float, float] | None:
    """(run ms, rows/s, JSON decode ms) of the floor measured next to this cell, or else of the
    floor table."""
    if "floor_run_ms" in cell:
        return cell["floor_run_ms"], cell["floor_rows_per_s"], cell["floor_json_ms"]
    p = {p["rows"]: p for p in model["floor"]}.get(cell["candidates"])
    return (p["run_ms"], p["rows_per_s"], p["json_ms"]) if p else None


def targets(model: dict[str, Any], server: str) -> list[dict[str, Any]]:
    """The issue's targets for one server variant of one model (at 256 candidates), each
    against the floor measured next to the point it judges."""
    cells = model["cells"]
    c1 = _cell(cells, server, TARGET_ROWS, 1)
    c8 = _cell(cells, server, TARGET_ROWS, 8)
    b8 = _cell(cells, "baseline", TARGET_ROWS, 8)
    start = model["servers"].get(server, {})
    out: list[dict[str, Any]] = []

    def add(
        name: str, value: float | None, goal: str, limit: float | None, ok: bool | None
    ) -> None:
        out.append({"target": name, "value": value, "goal": goal, "limit": limit, "ok": ok})

    floor1 = _floor_of(model, c1) if c1 else None
    if c1 and floor1:
        limit = 1.5 * (floor1[0] + floor1[2])
        add(
            "c=1 p50 latency (ms)",
            c1["p50_ms"],
            "<= 1.5 x (floor + JSON decode)",
            limit,
            c1["p50_ms"] <= limit,
        )
    floor8 = _floor_of(model, c8) if c8 else None
    if c8 and floor8:
        limit = 0.8 * floor8[1]
        add(
            "c=8 throughput (rows/s)",
            c8["rows_per_s"],
            ">= 0.8 x floor rows/s",
            limit,
            c8["rows_per_s"] >= limit,
        )
    if c8:
        add(
            "c=8 p99 / p50",
            c8["p99_ms"] / c8["p50_ms"],
            "<= 2",
            2.0,
            c8["p99_ms"] <= 2 * c8["p50_ms"],
        )
    if c8 and b8:
        ratio = c8["rps"] / b8["rps"] if b8["rps"] else float("inf")
        add("c=8 throughput / baseline", ratio, ">= 3", 3.0, ratio >= 3)
    if start:
        add("cold start (s)", start["cold_start_s"], "<= 3", 3.0, start["cold_start_s"] <= 3)
        peak = start.get("peak_rss_mb")
        add("server RSS, peak (MB)", peak, "<= 300", 300.0, None if peak is None else peak <= 300)
    return out


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
        name = model["name"]
        lines += [f"## {name}", "", "### Floor: onnxruntime run() in-process", ""]
        lines += _table(
            [
                "rows",
                "run() ms",
                "rows/s",
                "fastest session settings",
                "run() ms before / after the servers",
                "JSON decode ms",
                "service decode ms",
                "body KB",
            ],
            [
                [
                    str(p["rows"]),
                    _f(p["run_ms"], 3),
                    _f(p["rows_per_s"], 0),
                    p["settings"],
                    f"{_f(p.get('run_ms_before'), 3)} / {_f(p.get('run_ms_after'), 3)}",
                    _f(p["json_ms"], 3),
                    _f(p["decode_ms"], 3),
                    _f(p["body_bytes"] / 1024, 1),
                ]
                for p in model["floor"]
            ],
        )
        lines += ["", "### Servers under load", ""]
        rows = []
        baseline = {
            (x["candidates"], x["concurrency"]): x
            for x in model["cells"]
            if x["server"] == "baseline"
        }
        for x in model["cells"]:
            near = _floor_of(model, x)
            b = baseline.get((x["candidates"], x["concurrency"]))
            vs_floor = x["rows_per_s"] / near[1] if near else None
            vs_base = x["rps"] / b["rps"] if b and b["rps"] and x["server"] != "baseline" else None
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
                    _f(near[0], 2) if near else "-",
                    _f(vs_floor, 2),
                    _f(vs_base, 1),
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
                "server RSS MB",
                "generator CPU (cores)",
                "floor ms (around)",
                "rows/s / floor",
                "x baseline",
            ],
            rows,
        )
        lines += ["", "### Start-up and memory", ""]
        lines += _table(
            ["server", "cold start s (median)", "cold starts s", "RSS ready MB", "RSS peak MB"],
            [
                [
                    server,
                    _f(s["cold_start_s"], 2),
                    ", ".join(_f(t, 2) for t in s["cold_starts_s"]),
                    _f(s["ready_rss_mb"], 0),
                    _f(s["peak_rss_mb"], 0),
                ]
                for server, s in model["servers"].items()
            ],
        )
        for server in model["servers"]:
            if server == "baseline":
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
                        "-" if t["ok"] is None else ("yes" if t["ok"] else "**no**"),
                    ]
                    for t in checks
                ],
            )
        lines.append("")
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], path: Path) -> None:
    """Per model and candidate count: p50 (solid) and p99 (dashed) latency against rows/s, one
    line per server through concurrency 1, 8, 32; the floor's rows/s as a dotted line."""
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
        floor = {p["rows"]: p for p in model["floor"]}
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
                if not pts:
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
            if n in floor:
                ax.axvline(floor[n]["rows_per_s"], color="grey", linestyle=":", label="floor")
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
