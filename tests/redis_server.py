"""A real redis-server (Debian's package; `make test` installs it) on a free loopback port, with
no persistence, for the tests of the item store."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.server import free_port


class RedisServer:
    def __init__(self, workdir: Path) -> None:
        path = shutil.which("redis-server")
        if path is None:
            pytest.fail(
                "redis-server not found: the item store cannot be tested. Install it "
                "(apt-get install redis-server; `make test` does)"
            )
        self.binary = path
        self.workdir = workdir
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        """Starts it (again, on the same port) and waits until it answers PING."""
        args = ["--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly"]
        log = open(self.workdir / "redis.log", "ab")  # noqa: SIM115 (the process keeps it)
        self.proc = subprocess.Popen(
            [self.binary, *args, "no", "--dir", str(self.workdir)], stdout=log, stderr=log
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"redis-server exited: {(self.workdir / 'redis.log').read_text()}"
                )
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return self
            except OSError:
                time.sleep(0.02)
        raise RuntimeError("redis-server did not answer within 10 s")

    def kill(self) -> None:
        """Kills it as a crash would (SIGKILL); what it held is gone."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.proc = None

    def calls(self, command: str) -> int:
        """How many times it ran `command` (INFO commandstats)."""
        import redis

        client = redis.Redis.from_url(self.url, decode_responses=True)
        try:
            stats = client.info("commandstats")
        finally:
            client.close()
        return int(stats.get(f"cmdstat_{command.lower()}", {}).get("calls", 0))
