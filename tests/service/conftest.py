"""Fixtures of the service tests: a real redis-server for the item store."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.redis_server import RedisServer


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of this test alone, killed at its end."""
    server = RedisServer(tmp_path).start()
    yield server
    server.kill()
