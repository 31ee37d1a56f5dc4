"""The item features one worker holds for its models (MMOE_ITEMS; docs/items.md): the sources of
service/items.py, loaded when a model loads and refreshed without a restart.

A source is checked against, and converted for, the features of the model it serves; versions
with the same candidate features share one. A refresh (SIGHUP, /admin/reload, the repository's
reading, every MMOE_ITEMS_POLL_S seconds) builds each new source beside the one serving (for a
file: only if the file changed; for Redis: the manifest read again, a new cache) and swaps it
in; a new source that fails is refused with the reason and the old one keeps serving.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from mmoe.contract.metadata import FeatureInfo
from mmoe.service.settings import Settings

if TYPE_CHECKING:
    from mmoe.service.items import ItemSource

log = logging.getLogger("mmoe.service")

# The features a source is built for: a version with the same ones shares it.
FeaturesKey = tuple[str, ...]


class ItemSourceError(RuntimeError):
    """The item source cannot be used for a model (bad file or manifest, Redis not reached)."""


def features_key(features: Sequence[FeatureInfo]) -> FeaturesKey:
    return tuple(f.model_dump_json() for f in features if not f.context)


class HeldItems:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.spec = settings.items
        self._sources: dict[FeaturesKey, ItemSource] = {}
        self._features: dict[FeaturesKey, list[FeatureInfo]] = {}
        self._locks: dict[FeaturesKey, asyncio.Lock] = {}
        self.error: str | None = None  # why the last refresh was refused, if it was

    @property
    def is_redis(self) -> bool:
        return self.spec is not None and self.spec.startswith(("redis://", "rediss://", "unix://"))

    async def source_for(self, features: Sequence[FeatureInfo]) -> ItemSource | None:
        """The source for a model of `features` (None when no items are configured): the one
        such models share, or a new one (ItemSourceError if it cannot be used)."""
        if self.spec is None:
            return None
        key = features_key(features)
        async with self._locks.setdefault(key, asyncio.Lock()):
            if key not in self._sources:
                self._sources[key] = await self._open(features)
                self._features[key] = list(features)
            return self._sources[key]

    async def _open(self, features: Sequence[FeatureInfo]) -> ItemSource:
        from mmoe.service.items import (
            ItemStoreUnavailable,
            ItemTable,
            ItemTableError,
            RedisItemStore,
        )

        assert self.spec is not None
        try:
            if self.is_redis:
                s = self.settings
                return await RedisItemStore.connect(
                    self.spec, features, cache_items=s.items_cache, ttl_s=s.items_ttl_s
                )
            loop = asyncio.get_running_loop()
            key = self.settings.items_key
            return await loop.run_in_executor(None, ItemTable.load, self.spec, features, key)
        except (ItemTableError, ItemStoreUnavailable) as err:
            raise ItemSourceError(f"item features: {err}") from None

    async def refresh(self) -> dict[FeaturesKey, ItemSource]:
        """Each source built again where its data changed, beside the one serving; returns the
        new ones (by features key) once all are ready. ItemSourceError, and the old sources
        stay, if one cannot be used."""
        from mmoe.service.items import (
            ItemStoreUnavailable,
            ItemTable,
            ItemTableError,
            file_signature,
        )

        fresh: dict[FeaturesKey, ItemSource] = {}
        try:
            for key, old in list(self._sources.items()):
                if isinstance(old, ItemTable):
                    try:
                        changed = file_signature(self.spec or "") != old.signature()
                    except OSError:
                        changed = True  # gone: loading it says so
                    if changed:
                        fresh[key] = await self._open(self._features[key])
                else:
                    await old.open()  # type: ignore[attr-defined]
        except (ItemTableError, ItemStoreUnavailable) as err:
            self.error = f"item features: {err}"
            raise ItemSourceError(self.error) from None
        except ItemSourceError as err:
            self.error = str(err)
            raise
        self.error = None
        self._sources.update(fresh)
        if fresh:
            log.info("item features reloaded", extra={"event": "items_loaded", "source": self.spec})
        return fresh

    def current(self, features: Sequence[FeatureInfo]) -> ItemSource | None:
        return self._sources.get(features_key(features))

    def forget_unused(self, in_use: set[FeaturesKey]) -> None:
        """Drop the sources no loaded model uses any more."""
        for key in list(self._sources):
            if key not in in_use:
                del self._sources[key], self._features[key]

    def describe(self) -> dict[str, Any] | None:
        if self.spec is None:
            return None
        return {"error": self.error}

    async def close(self) -> None:
        for source in self._sources.values():
            closing = getattr(source, "aclose", None)
            if closing is not None:
                await closing()
