"""The stage packages under their folder names, from a source checkout.

Installed, the project is one namespace: `mmoe.model`, `mmoe.export`, `mmoe.contract`,
`mmoe.service`, `mmoe.bench` (so that it cannot clash with a user's own `model` or `service`
module). In a checkout the folders also sit at the top level, so `import model.config` finds
`model/`: `alias()` makes that the very module `mmoe.model.config` (one class, one registry),
not a second copy of it.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
from types import CodeType, ModuleType

STAGES = ("model", "export", "contract", "service", "bench")


class _AliasFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """`model.X` -> the module `mmoe.model.X` (imported as usual, then shared)."""

    def find_spec(
        self, fullname: str, path: object = None, target: object = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname.partition(".")[0] not in STAGES:
            return None
        real = importlib.util.find_spec(f"mmoe.{fullname}")
        if real is None:
            return None
        return importlib.machinery.ModuleSpec(
            fullname,
            self,
            origin=real.origin,
            is_package=real.submodule_search_locations is not None,
        )

    def __init__(self) -> None:
        self._specs: dict[str, importlib.machinery.ModuleSpec | None] = {}

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        module = importlib.import_module(f"mmoe.{spec.name}")
        self._specs[spec.name] = module.__spec__
        return module

    def exec_module(self, module: ModuleType) -> None:
        # The import system has set the alias's spec on the shared module: give it back its own.
        alias_spec = module.__spec__
        if alias_spec is not None and alias_spec.name in self._specs:
            module.__spec__ = self._specs.pop(alias_spec.name)

    def get_code(self, fullname: str) -> CodeType | None:
        """For `python -m model.train`: the real module's code."""
        spec = importlib.util.find_spec(f"mmoe.{fullname}")
        loader = spec.loader if spec is not None else None
        return loader.get_code(f"mmoe.{fullname}") if loader is not None else None  # type: ignore[attr-defined]


_FINDER = _AliasFinder()


def alias(name: str) -> None:
    """Called by a stage package's `__init__` when it is imported by its folder name."""
    if _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)
    sys.modules[name] = importlib.import_module(f"mmoe.{name}")
