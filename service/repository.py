"""A model repository on disk, laid out as Triton's, and which of its files a server loads.

    DIR/<name>/<version>/model.onnx     versions are positive integers (the folder's name)
    DIR/<name>/config.yaml              optional: the version policy
    DIR/routing.yaml                    optional: which versions take traffic (service/routing.py)

A model's name and version are those of its folders, whatever the file's own metadata says.
The version policy has Triton's names:

    version_policy: {latest: {num_versions: 1}}     the default: the highest N versions
    version_policy: {all: {}}
    version_policy: {specific: {versions: [7, 8]}}

Versions that routing names are loaded whatever the policy. Reading the repository is cheap (a
directory listing and a stat per file) and happens at start, on reload and on each poll; what
changed since the last reading is what `Wanted.diff` reports.

A single file (MMOE_MODEL_PATH) is served as a repository of one model whose name and version
are the file's own.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

MODEL_FILE = "model.onnx"
CONFIG_FILE = "config.yaml"
ROUTING_FILE = "routing.yaml"


class RepositoryError(ValueError):
    """A file of the repository that cannot be used, with the reason."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _Latest(_Strict):
    num_versions: int = Field(1, ge=1)


class _All(_Strict):
    pass


class _Specific(_Strict):
    versions: list[int] = Field(min_length=1)


class VersionPolicy(_Strict):
    """Which versions of a model are loaded (Triton's version_policy): exactly one of
    `latest`, `all`, `specific`; `latest: {num_versions: 1}` when none is given."""

    latest: _Latest | None = None
    all: _All | None = None
    specific: _Specific | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> VersionPolicy:
        given = [k for k in ("latest", "all", "specific") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"give one of latest, all, specific; got {' and '.join(given)}")
        return self

    @property
    def kind(self) -> Literal["latest", "all", "specific"]:
        if self.all is not None:
            return "all"
        return "specific" if self.specific is not None else "latest"

    def select(self, available: Iterable[int]) -> set[int]:
        """The versions of `available` this policy loads."""
        versions = sorted(set(available))
        if self.all is not None:
            return set(versions)
        if self.specific is not None:
            return set(versions) & set(self.specific.versions)
        count = self.latest.num_versions if self.latest is not None else 1
        return set(versions[-count:])


class ModelConfig(_Strict):
    """DIR/<name>/config.yaml."""

    version_policy: VersionPolicy = Field(default_factory=VersionPolicy)


def _yaml(path: Path) -> object:
    try:
        return yaml.safe_load(path.read_text()) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise RepositoryError(f"{path}: cannot be read as YAML: {err}") from None


def read_model_config(model_dir: Path) -> ModelConfig:
    path = model_dir / CONFIG_FILE
    if not path.exists():
        return ModelConfig()
    try:
        return ModelConfig.model_validate(_yaml(path))
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise RepositoryError(f"{path}: {where}: {first['msg']}") from None


@dataclass(frozen=True)
class FileStamp:
    """What tells a changed file from the one loaded: a new file (inode), size or time."""

    inode: int
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, path: Path) -> FileStamp:
        st = path.stat()
        return cls(st.st_ino, st.st_size, st.st_mtime_ns)


@dataclass(frozen=True)
class Version:
    """One version's file as found on disk."""

    name: str
    version: str
    path: Path
    stamp: FileStamp


@dataclass
class Listing:
    """What a repository holds: every version found (loaded or not), each model's policy, and
    what could not be read (by model name, or "" for the repository itself)."""

    root: Path
    versions: dict[str, dict[int, Version]] = field(default_factory=dict)
    policies: dict[str, VersionPolicy] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)

    def wanted(self, pinned: Mapping[str, Iterable[str]], skipped: Iterable[str] = ()) -> Wanted:
        """The versions to serve: each model's policy, plus the versions in `pinned` (named by
        routing), but none of the models in `skipped` (unloaded through the API)."""
        out: dict[tuple[str, str], Version] = {}
        skip = set(skipped)
        for name, found in self.versions.items():
            if name in skip:
                continue
            chosen = self.policies[name].select(found) if name in self.policies else set()
            chosen |= {int(v) for v in pinned.get(name, ()) if v.isdigit() and int(v) in found}
            out.update({(name, str(v)): found[v] for v in chosen})
        return Wanted(out)


@dataclass(frozen=True)
class Wanted:
    """The files a server should have loaded, by (name, version)."""

    files: dict[tuple[str, str], Version]

    def diff(
        self, loaded: Mapping[tuple[str, str], FileStamp]
    ) -> tuple[list[Version], list[tuple[str, str]]]:
        """(to load: new versions and changed files; to unload: versions no longer wanted)."""
        load = [v for key, v in self.files.items() if loaded.get(key) != v.stamp]
        unload = [key for key in loaded if key not in self.files]
        return sorted(load, key=lambda v: (v.name, int(v.version))), sorted(unload)


def scan(root: Path) -> Listing:
    """Read the repository at `root`. A model folder with a bad config.yaml is listed in
    `errors` and none of its versions is wanted; folders that are not a model are ignored (a
    name starting with "." or "_", a version folder that is not a positive integer, one without
    model.onnx)."""
    listing = Listing(root)
    try:
        entries = sorted(os.scandir(root), key=lambda e: e.name)
    except OSError as err:
        listing.errors[""] = f"{root}: cannot be read: {err.strerror or err}"
        return listing
    for entry in entries:
        if not entry.is_dir() or entry.name.startswith((".", "_")):
            continue
        versions: dict[int, Version] = {}
        for sub in os.scandir(entry.path):
            if not (sub.is_dir() and sub.name.isdigit() and int(sub.name) > 0):
                continue
            path = Path(sub.path) / MODEL_FILE
            try:
                versions[int(sub.name)] = Version(
                    entry.name, str(int(sub.name)), path, FileStamp.of(path)
                )
            except OSError:
                continue  # no model.onnx (yet): not a version
        if not versions:
            continue
        listing.versions[entry.name] = versions
        try:
            listing.policies[entry.name] = read_model_config(Path(entry.path)).version_policy
        except RepositoryError as err:
            listing.errors[entry.name] = str(err)
    return listing
