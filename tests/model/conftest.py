"""Fixtures for the model tests: config dicts to vary, and one torch thread per test process
(the suite's models are tiny; more threads only contend on a shared machine)."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from tests.conftest import TINY_CONFIG


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tiny_dict() -> dict[str, Any]:
    """tests/data/tiny.yaml as a dict, a fresh copy per test."""
    return copy.deepcopy(yaml.safe_load(Path(TINY_CONFIG).read_text()))
