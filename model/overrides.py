"""`key.path=value` overrides of a config mapping, as `mmoe train ... train.epochs=1` takes them.

A key path is dotted names, with list items by index: `model.experts`, `tasks[1].weight` (or
`tasks.1.weight`), `features[0].vocab.min_count`. The value is read as YAML, so `8`, `0.5`,
`true`, `null`, `[64, 32]` and `{min_count: 2}` mean what they would in the file. Sections and
mapping keys that the file leaves out are created; list items must exist. The result is
validated like the file itself, so a key the config does not have fails naming its path.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence
from typing import Any

import yaml

from mmoe.model.config import ConfigError

_SEGMENT = re.compile(r"([A-Za-z_][A-Za-z0-9_]*|\d+)((?:\[\d+\])*)")


def parse_key(key: str) -> list[str | int]:
    """`tasks[1].weight` -> ["tasks", 1, "weight"]; raises ConfigError on a malformed path."""
    parts: list[str | int] = []
    for segment in key.split("."):
        match = _SEGMENT.fullmatch(segment)
        if match is None:
            raise ConfigError(f"override {key!r}: {segment!r} is not a key name or a list index")
        name, indexes = match.groups()
        parts.append(int(name) if name.isdigit() else name)
        parts.extend(int(i) for i in re.findall(r"\d+", indexes))
    return parts


def _path_text(parts: Sequence[str | int]) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else p)
    return out


def apply_override(data: dict[str, Any], override: str) -> None:
    """Sets one `key=value` in `data` (in place)."""
    key, sep, raw = override.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {override!r}: expected KEY=VALUE, e.g. train.epochs=1")
    parts = parse_key(key.strip())
    if not isinstance(parts[0], str):
        raise ConfigError(f"override {override!r}: the config is a mapping; start with a key")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as err:
        raise ConfigError(f"override {override!r}: the value is not valid YAML: {err}") from None
    node: Any = data
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        here = _path_text(parts[: i + 1])
        if isinstance(part, int):
            if not isinstance(node, list):
                raise ConfigError(f"override {override!r}: {_path_text(parts[:i])} is not a list")
            if part >= len(node):
                raise ConfigError(
                    f"override {override!r}: {here}: no such item "
                    f"({_path_text(parts[:i])} has {len(node)})"
                )
        elif not isinstance(node, dict):
            raise ConfigError(f"override {override!r}: {_path_text(parts[:i])} is not a mapping")
        if last:
            node[part] = value
        else:
            if isinstance(node, dict) and node.get(part) is None:
                node[part] = [] if isinstance(parts[i + 1], int) else {}
            node = node[part]


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """A copy of `data` with each `key=value` applied in order; raises ConfigError."""
    out = copy.deepcopy(data)
    for override in overrides:
        apply_override(out, override)
    return out
