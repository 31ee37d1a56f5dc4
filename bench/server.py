"""Server processes under test: start one on a free loopback port, time its cold start, and read
its CPU time and memory from /proc, summed over the server's processes (a multi-process server's
parent and workers; Linux; elsewhere those numbers are reported as missing)."""

from __future__ import annotations

import http.client
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _status_ok(port: int, path: str) -> bool:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
    try:
        conn.request("GET", path)
        return conn.getresponse().status == 200
    except OSError:
        return False
    finally:
        conn.close()


@dataclass
class Usage:
    """CPU seconds (user + system, all threads) and resident memory of a process and its
    descendants, summed (the peak is the sum of each process's own peak)."""

    cpu_s: float | None
    rss_mb: float | None
    peak_rss_mb: float | None
    processes: int = 1


def _descendants(pid: int) -> list[int]:
    out = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            for child in (task / "children").read_text().split():
                out += [int(child), *_descendants(int(child))]
    except OSError:  # gone meanwhile
        pass
    return out


def process_usage(pid: int) -> Usage:
    """`pid` and every process below it. CPU time of children that have exited (and been
    waited for) is included: /proc counts it in the parent's cutime and cstime."""
    cpu = rss = peak = 0.0
    pids = [pid, *_descendants(pid)]
    for k, p in enumerate(pids):
        try:
            stat = Path(f"/proc/{p}/stat").read_text()
            status = Path(f"/proc/{p}/status").read_text()
        except OSError:
            if k == 0:
                return Usage(None, None, None)
            continue  # a child that just exited
        fields = stat[stat.rindex(")") + 2 :].split()
        cpu += sum(int(f) for f in fields[11:15]) / _TICKS  # utime, stime, cutime, cstime
        for line in status.splitlines():
            key, _, value = line.partition(":")
            if key == "VmRSS":
                rss += int(value.split()[0]) / 1024
            elif key == "VmHWM":
                peak += int(value.split()[0]) / 1024
    return Usage(cpu, rss, peak, len(pids))


class ServerProc:
    """A server command on 127.0.0.1:`port`; `start()` returns the cold start: seconds from
    process start until GET `ready_path` answers 200."""

    def __init__(
        self,
        argv: list[str],
        port: int,
        env: dict[str, str] | None = None,
        log_path: Path | None = None,
        ready_path: str = "/readyz",
    ) -> None:
        self.argv = argv
        self.port = port
        self.env_overrides = dict(env or {})
        self.env = {**os.environ, **self.env_overrides}
        self.log_path = log_path
        self.ready_path = ready_path
        self.proc: subprocess.Popen[bytes] | None = None

    @classmethod
    def service(
        cls, model: Path, env: dict[str, str] | None = None, log_path: Path | None = None
    ) -> ServerProc:
        port = free_port()
        argv = [sys.executable, "-m", "mmoe", "serve", "--model", str(model)]
        argv += ["--host", "127.0.0.1", "--port", str(port)]
        env = {"MMOE_ACCESS_LOG": "false", "MMOE_LOG_LEVEL": "warning", **(env or {})}
        return cls(argv, port, env, log_path)

    @classmethod
    def tuned(
        cls,
        model: Path,
        workers: int,
        env: dict[str, str] | None = None,
        log_path: Path | None = None,
    ) -> ServerProc:
        port = free_port()
        argv = [sys.executable, "-m", "mmoe.bench.tuned", "--model", str(model)]
        argv += ["--port", str(port), "--workers", str(workers)]
        return cls(argv, port, env, log_path)

    @classmethod
    def baseline(
        cls, run_dir: Path, env: dict[str, str] | None = None, log_path: Path | None = None
    ) -> ServerProc:
        port = free_port()
        argv = [sys.executable, "-m", "mmoe.bench.baseline", "--run", str(run_dir)]
        argv += ["--port", str(port)]
        # Idle OpenMP threads sleep instead of spinning (as the service's onnxruntime threads do
        # between runs): spinning would slow the baseline down on a busy machine, flattering the
        # service.
        env = {"OMP_WAIT_POLICY": "PASSIVE", **(env or {})}
        return cls(argv, port, env, log_path)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 120) -> float:
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(self.argv, env=self.env, stdout=out, stderr=subprocess.STDOUT)
        deadline = t0 + timeout
        while time.perf_counter() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{' '.join(self.argv)} exited with {self.proc.returncode}: {self.log()}"
                )
            if _status_ok(self.port, self.ready_path):
                return time.perf_counter() - t0
            time.sleep(0.005)
        self.stop()
        raise TimeoutError(f"{self.ready_path} not 200 within {timeout}s: {self.log()}")

    def usage(self) -> Usage:
        return process_usage(self.pid)

    def wait_idle(self, timeout: float = 60, interval: float = 0.05) -> None:
        """Until the process uses (almost) no CPU: it has finished the requests a load
        generator left behind. Without /proc this waits one interval."""
        deadline = time.perf_counter() + timeout
        last = self.usage().cpu_s
        quiet = 0
        while quiet < 2 and time.perf_counter() < deadline:
            time.sleep(interval)
            now = self.usage().cpu_s
            if now is None or last is None:
                return
            quiet = quiet + 1 if now - last < 0.1 * interval else 0
            last = now

    def log(self) -> str:
        if self.log_path and self.log_path.exists():
            return self.log_path.read_text(errors="replace")[-3000:]
        return ""

    def stop(self, timeout: float = 30) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> ServerProc:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
