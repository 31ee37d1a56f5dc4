"""Which version of a model scores a request, and which scores a shadow copy of it.

Declared in the repository's routing.yaml (re-read with the repository; a bad file is refused
with the reason and the last good one stays):

    default: ranker                 # the model /predict scores when the body names none
    models:
      ranker:
        key: context.user_id        # what puts a caller in an arm: a stable hash of this value
        arms: {"7": 90, "8": 10}    # version: percent of callers (adding up to 100)
        shadow: {version: "9", percent: 100}

A caller lands in an arm by a stable hash of its key value (the same value, the same arm, in
every worker and replica, for as long as the weights stand), so the arms' shares of callers
match the weights; a request without the key goes to the arm with the largest weight. A model
with no `arms` serves its highest loaded version. The shadow version scores a copy of
`percent` of the requests after the answer is sent (service/shadow.py).
"""

from __future__ import annotations

import bisect
import hashlib
import random
from collections.abc import Mapping
from dataclasses import dataclass

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from mmoe.service.repository import RepositoryError

# A caller's place on [0, 1): the first 8 bytes of a hash of the model and the key value.
_SCALE = float(1 << 64)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ShadowConfig(_Strict):
    version: str
    percent: float = Field(100.0, gt=0, le=100)

    @field_validator("version", mode="before")
    @classmethod
    def _text(cls, v: object) -> object:
        return str(v) if isinstance(v, int) else v


class ModelRouting(_Strict):
    # "context.<feature>" or "<feature>": the value the request gives that feature (in
    # `context`, or the first candidate's).
    key: str | None = None
    arms: dict[str, float] = Field(default_factory=dict)
    shadow: ShadowConfig | None = None

    @field_validator("arms", mode="before")
    @classmethod
    def _version_names(cls, v: object) -> object:
        return {str(k): w for k, w in v.items()} if isinstance(v, dict) else v

    @field_validator("arms")
    @classmethod
    def _percentages(cls, v: dict[str, float]) -> dict[str, float]:
        if any(w < 0 for w in v.values()):
            raise ValueError("an arm's percent cannot be negative")
        if v and abs(sum(v.values()) - 100) > 1e-6:
            raise ValueError(f"the arms' percents add up to {sum(v.values()):g}, not 100")
        for version in v:
            if not version.isdigit():
                raise ValueError(f"{version!r} is not a version (a positive integer)")
        return v

    @property
    def feature(self) -> str | None:
        """The feature whose value is the key."""
        return self.key.removeprefix("context.") if self.key else None


class RoutingConfig(_Strict):
    default: str | None = None
    models: dict[str, ModelRouting] = Field(default_factory=dict)

    def pinned(self) -> dict[str, set[str]]:
        """The versions routing names, by model: loaded whatever the version policy."""
        out: dict[str, set[str]] = {}
        for name, r in self.models.items():
            versions = set(r.arms) | ({r.shadow.version} if r.shadow else set())
            out.setdefault(name, set()).update(versions)
        return out


def parse_routing(text: str, source: str = "routing.yaml") -> RoutingConfig:
    """RepositoryError naming the key path and the reason for anything wrong."""
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise RepositoryError(f"{source}: not YAML: {err}") from None
    try:
        return RoutingConfig.model_validate(raw)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise RepositoryError(f"{source}: {where}: {first['msg']}") from None


def caller_point(model: str, key: str) -> float:
    """Where a key value falls on [0, 1) for `model`: stable across processes, restarts and
    machines, and independent between models (the model's name is hashed with it)."""
    digest = hashlib.blake2b(f"{model}\0{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / _SCALE


@dataclass(frozen=True)
class Arms:
    """A model's versions and their weights, ready for one bisect per request."""

    model: str
    versions: tuple[str, ...]
    bounds: tuple[float, ...]  # cumulative shares, the last one 1.0
    largest: str

    @classmethod
    def of(cls, model: str, weights: Mapping[str, float]) -> Arms:
        versions = tuple(v for v, w in weights.items() if w > 0)
        total = sum(weights[v] for v in versions)
        bounds, running = [], 0.0
        for v in versions:
            running += weights[v] / total
            bounds.append(running)
        bounds[-1] = 1.0
        return cls(model, versions, tuple(bounds), max(versions, key=lambda v: weights[v]))

    def pick(self, key: str | None) -> str:
        if len(self.versions) == 1:
            return self.versions[0]
        if key is None:
            return self.largest
        return self.versions[bisect.bisect_right(self.bounds, caller_point(self.model, key))]


def version_order(version: str) -> tuple[bool, int, str]:
    """How versions sort: by number (a repository's), else by text (a file's own)."""
    return (version.isdigit(), int(version) if version.isdigit() else 0, version)


def latest(versions: set[str]) -> str:
    """The highest of `versions`."""
    return max(versions, key=version_order)


@dataclass(frozen=True)
class Route:
    """What routing decided for one request: the version that answers it and, maybe, the one
    that scores a shadow copy."""

    model: str
    version: str
    shadow: str | None = None


class Router:
    """Routing as configured, over the versions loaded (`versions`: name -> loaded versions)."""

    def __init__(self, config: RoutingConfig, versions: Mapping[str, set[str]]) -> None:
        self.config = config
        self.versions = {name: set(v) for name, v in versions.items()}
        self.arms = {name: Arms.of(name, r.arms) for name, r in config.models.items() if r.arms}
        self.keys = {name: r.feature for name, r in config.models.items() if r.feature}
        self.latest = {name: latest(v) for name, v in self.versions.items() if v}
        self._rng = random.Random()

    @property
    def default(self) -> str | None:
        """The model a request that names none is scored by: routing's `default`, or the only
        model there is."""
        if self.config.default is not None:
            return self.config.default
        return next(iter(self.versions)) if len(self.versions) == 1 else None

    def targets(self) -> set[tuple[str, str]]:
        """Every (model, version) that primary traffic may go to: the arms, and each other
        model's highest version."""
        out: set[tuple[str, str]] = set()
        for name in self.versions:
            arms = self.arms.get(name)
            if arms is not None:
                out.update((name, v) for v in arms.versions)
            elif name in self.latest:
                out.add((name, self.latest[name]))
        for name, arms in self.arms.items():
            if name not in self.versions:
                out.update((name, v) for v in arms.versions)
        return out

    def route(self, model: str, version: str | None, key: str | None) -> Route:
        """The route of a request for `model` (and `version`, if it names one); `key` is its
        key value. Naming a version bypasses the arms and the shadow."""
        if version:
            return Route(model, version)
        arms = self.arms.get(model)
        chosen = arms.pick(key) if arms is not None else self.latest.get(model, "")
        spec = self.config.models.get(model)
        wanted = spec.shadow if spec is not None else None
        if wanted is None or wanted.version == chosen:
            return Route(model, chosen)
        if wanted.percent < 100 and self._rng.random() * 100 >= wanted.percent:
            return Route(model, chosen)
        return Route(model, chosen, wanted.version)
