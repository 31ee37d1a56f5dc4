"""The models a server serves, side by side, and which one answers each request.

Two sources, one registry:
- one file (MMOE_MODEL_PATH): one model, named and versioned by its own metadata; a reload
  replaces it (`load_file`);
- a repository (MMOE_MODEL_REPOSITORY, service/repository.py): every version its policies and
  its routing.yaml (service/routing.py) ask for, each named by its folders; `sync` reads it
  again and loads what is new or changed, then unloads what is no longer wanted.

A version is loaded, warmed up and checked against its golden rows beside the ones serving
(ModelLoadError if any of that fails: it is recorded with the reason and never takes traffic);
then the whole picture (`Serving`: the loaded models and the router over them) is swapped at
once, so a request takes one picture and uses it to the end, and a version being removed
drains what it accepted before it is dropped.

In a multi-process server each worker holds its own models; a change asked of one worker
reaches the others through its WorkerLink (`Action`), and /readyz answers for all of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mmoe.service.batching import Admission, DirectRunner, MicroBatcher, Runner
from mmoe.service.cpu_share import CpuShare
from mmoe.service.errors import ApiError
from mmoe.service.held_items import HeldItems, ItemSourceError, features_key
from mmoe.service.metrics import ModelMetrics, ServiceMetrics
from mmoe.service.payload import Decoded, ItemFields, RequestDecoder, RequestHead
from mmoe.service.predictor import (
    GoldenMismatchError,
    ModelLoadError,
    Predictor,
    ProviderError,
    return_freed_memory,
)
from mmoe.service.repository import (
    ROUTING_FILE,
    FileStamp,
    Listing,
    RepositoryError,
    Version,
    scan,
)
from mmoe.service.routing import Router, RoutingConfig, parse_routing, version_order
from mmoe.service.settings import Settings
from mmoe.service.workers import Action, WorkerLink, WorkerState

if TYPE_CHECKING:
    from mmoe.service.items import ItemSource

log = logging.getLogger("mmoe.service")

Key = tuple[str, str]  # (model name, version)


@dataclass
class LoadedModel:
    """One version being served: its file's session, the decoder of its requests, the runner
    that admits them, and its metrics."""

    name: str
    version: str
    predictor: Predictor
    decoder: RequestDecoder
    runner: Runner
    metrics: ModelMetrics
    loaded_at: float
    stamp: FileStamp | None = None  # the repository file it was loaded from, as it was
    items: ItemSource | None = None  # the item features held for it (MMOE_ITEMS)
    item_fields: ItemFields | None = None  # what `items` fills in, for the decoders

    def __post_init__(self) -> None:
        self.attach_items(self.items)

    def attach_items(self, items: ItemSource | None) -> None:
        """Serve `items` from now on (a request takes them once: `fill_items`)."""
        self.item_fields = (
            None
            if items is None
            else ItemFields(items.key, frozenset(f.name for f in items.features))
        )
        self.items = items

    @property
    def key(self) -> Key:
        return (self.name, self.version)

    async def fill_items(self, decoded: Decoded) -> None:
        """Complete `decoded`'s feeds with the item features it left out (a lookup of its
        ids), counting the lookups by outcome."""
        items = self.items
        if not decoded.fill or items is None or decoded.ids is None:
            return
        rows = await items.alookup(decoded.ids)
        decoded.fill_items(rows.columns)
        self.metrics.count_items(rows.counts())

    @property
    def path(self) -> Path:
        return self.predictor.path


class Serving:
    """What is served, as one picture: swapped whole, never changed."""

    def __init__(self, models: dict[Key, LoadedModel], router: Router) -> None:
        self.models = models
        self.router = router
        # The one model, when there is one version of one model and no routing: a request
        # that names none needs no reading of its body to know where it goes.
        self.single = (
            next(iter(models.values())) if len(models) == 1 and not router.config.models else None
        )
        # What routing reads of a /predict body.
        self.head = RequestHead(sorted(set(router.keys.values())))


@dataclass
class Failure:
    """A version wanted but not served: why, and the file as it was when it failed (it is not
    tried again until it changes)."""

    reason: str
    stamp: FileStamp | None = None


@dataclass
class SyncReport:
    loaded: list[Key] = field(default_factory=list)
    unloaded: list[Key] = field(default_factory=list)
    failed: dict[Key, str] = field(default_factory=dict)
    routing_error: str | None = None


class ModelRegistry:
    def __init__(
        self,
        settings: Settings,
        metrics: ServiceMetrics,
        executor: ThreadPoolExecutor,
        share: CpuShare,
        link: WorkerLink | None = None,
        model_path: Path | None = None,
        unloaded: Iterable[str] = (),
    ) -> None:
        """`model_path` (one-file mode: the file to start with, else the configured one) and
        `unloaded` (repository mode: models unloaded through the API) are where a worker
        restarted by its supervisor starts from, to serve what its siblings serve."""
        self.settings = settings
        self.model_path = model_path or settings.model_path
        self.metrics = metrics
        self.executor = executor
        self.share = share  # handed to each model's runner
        self.link = link
        self.repository = settings.model_repository
        self.serving = Serving({}, Router(RoutingConfig(), {}))
        self.items = HeldItems(settings)
        self.failures: dict[Key, Failure] = {}
        self.routing_error: str | None = None
        self.listing: Listing | None = None
        # Models unloaded through the repository API: not loaded again until asked.
        self.unloaded: set[str] = set(unloaded)
        self.not_ready_reason = "model not loaded yet"
        self._lock = asyncio.Lock()
        # Called after each change of what is served, e.g. to refresh the OpenAPI schema.
        self.on_swap: list[Callable[[Serving], object]] = []
        metrics.monitoring.serve_models(
            lambda: [(m.name, m.version, m.predictor.meta) for m in self.serving.models.values()]
        )
        metrics.serve_models(self.served_models)

    # ---------------------------------------------------------------------------- requests

    def resolve(
        self, name: str | None, version: str | None, key: str | None = None
    ) -> tuple[LoadedModel, LoadedModel | None]:
        """The model that answers a request naming `name` and `version` (either may be None:
        routing decides), with `key` its routing key's value; and the one that scores a shadow
        copy, if any. ApiError 404 for a model or version not served, 503 while a routed one is
        not loaded, 422 if the request must name a model."""
        serving = self.serving
        if name is None:
            name = serving.router.default
            if name is None:
                raise self._no_default(serving)
        route = serving.router.route(name, version, key)
        model = serving.models.get((route.model, route.version))
        if model is None:
            raise self._not_served(serving, name, version, route.version)
        shadow = serving.models.get((name, route.shadow)) if route.shadow else None
        return model, shadow

    def for_predict(self, body: bytes) -> tuple[LoadedModel, LoadedModel | None]:
        """`resolve` for a /predict body: the model and version it names, else routing's, with
        its key read from the body."""
        serving = self.serving
        if serving.single is not None and b'"model"' not in body and b'"version"' not in body:
            return serving.single, None
        head = serving.head.decode(body)
        feature = serving.router.keys.get(head.model or serving.router.default or "")
        key = head.keys.get(feature) if feature is not None else None
        return self.resolve(head.model, head.version, key)

    def find(self, name: str, version: str | None = None) -> LoadedModel:
        """The model a KServe V2 metadata or readiness call names: that version, or the one
        routing sends a caller without a key to."""
        return self.resolve(name, version or None)[0]

    def versions(self, name: str) -> list[str]:
        """The versions of `name` loaded here, in order."""
        return sorted((v for n, v in self.serving.models if n == name), key=version_order)

    def in_repository(self, name: str) -> bool:
        """Whether the repository has a folder for model `name`."""
        if self.repository is None or not name or name.startswith((".", "_")) or "/" in name:
            return False
        return (self.repository / name).is_dir()

    def index(self) -> list[dict[str, str]]:
        """Triton's repository index: every version in the repository (one-file mode: the file
        served), with its state, READY or UNAVAILABLE and why."""
        served = self.serving.models
        if self.repository is None or self.listing is None:
            return [{"name": n, "version": v, "state": "READY", "reason": ""} for n, v in served]
        out = []
        wanted = self.listing.wanted(self.serving.router.config.pinned(), self.unloaded)
        for name, found in sorted(self.listing.versions.items()):
            for number in sorted(found):
                key = (name, str(number))
                state, reason = "UNAVAILABLE", ""
                if key in served:
                    state = "READY"
                elif name in self.unloaded:
                    reason = "unloaded"
                elif name in self.listing.errors:
                    reason = self.listing.errors[name]
                elif key in self.failures:
                    reason = self.failures[key].reason
                elif key not in wanted.files:
                    reason = "not selected by the version policy"
                else:
                    reason = "loading"
                out.append({"name": name, "version": key[1], "state": state, "reason": reason})
        return out

    def key_feature(self, name: str | None) -> str | None:
        """The feature whose value routes requests for `name` (None: the default model)."""
        router = self.serving.router
        return router.keys.get(name or router.default or "")

    def default_model(self) -> LoadedModel | None:
        """What /predict scores for a caller without a key naming no model (for /metadata and
        the OpenAPI document)."""
        with contextlib.suppress(ApiError):
            return self.resolve(None, None)[0]
        return None

    def _no_default(self, serving: Serving) -> ApiError:
        if not serving.models:
            return self._unavailable(self.not_ready_reason)
        names = sorted({n for n, _ in serving.models})
        return ApiError(
            422,
            "model_required",
            f"name the model (`model` in the body): this server serves {names} and routing "
            "names no default",
            "model",
        )

    def _not_served(self, serving: Serving, name: str, asked: str | None, routed: str) -> ApiError:
        versions = sorted({v for n, v in serving.models if n == name})
        if not versions and name not in serving.router.arms:
            served = sorted({n for n, _ in serving.models})
            if not served:
                return self._unavailable(self.not_ready_reason)
            listed = ", ".join(map(repr, served))
            return ApiError(404, "unknown_model", f"unknown model {name!r}; serving {listed}")
        if asked:
            loaded = ", ".join(f"version {v!r}" for v in versions)
            failure = self.failures.get((name, asked))
            why = f"; it failed to load: {failure.reason}" if failure else ""
            return ApiError(
                404,
                "unknown_version",
                f"model {name!r} has no version {asked!r} ({loaded} loaded){why}",
            )
        failure = self.failures.get((name, routed))
        why = f": {failure.reason}" if failure else ""
        return self._unavailable(f"routing sends this request to {name} {routed}, not loaded{why}")

    def _unavailable(self, reason: str) -> ApiError:
        retry = {"Retry-After": str(self.settings.retry_after_s)}
        return ApiError(503, "not_ready", reason, None, retry)

    # --------------------------------------------------------------------------- readiness

    def ready_here(self) -> tuple[bool, str]:
        """Whether this worker serves every model that routing sends traffic to."""
        serving = self.serving
        if not serving.models:
            return False, self.not_ready_reason
        for name, version in sorted(serving.router.targets()):
            if (name, version) not in serving.models:
                failure = self.failures.get((name, version))
                why = f": {failure.reason}" if failure else ""
                return False, f"routing sends traffic to {name} {version}, not loaded{why}"
        return True, ""

    def ready(self) -> tuple[bool, str]:
        """Whether the server (with workers: every one of them) can answer, and if not, why."""
        ready, reason = self.ready_here()
        if not ready or self.link is None:
            return ready, reason
        return self.link.ready()

    def served_models(self) -> list[dict[str, str]]:
        """The models being served (with workers: by any of them), for mmoe_model_info."""
        if self.link is not None:
            return self.link.models()
        return self._state()["models"]

    def _state(self) -> WorkerState:
        ready, reason = self.ready_here()
        return {
            "ready": ready,
            "reason": reason,
            "models": [
                {
                    "name": m.name,
                    "version": m.version,
                    "provider": m.predictor.provider,
                    "path": str(m.path),
                }
                for m in sorted(self.serving.models.values(), key=lambda m: m.key)
            ],
        }

    def _report(self) -> None:
        if self.link is not None:
            self.link.report(self._state())

    # ----------------------------------------------------------------------------- loading

    def _prepare(self, path: Path) -> tuple[Predictor, RequestDecoder]:
        """Load and warm up `path`, then run its golden rows through the decoder requests will
        use (in a thread: it takes a second or more)."""
        s = self.settings
        predictor = Predictor(
            path, s.provider, s.intra_op_threads, s.warmup_rows, s.lone_request_threads
        )
        decoder = RequestDecoder(predictor.meta, s.max_batch_rows, s.unknown_features)
        predictor.check_golden(decoder)
        return predictor, decoder

    async def _load(
        self, path: Path, name: str | None = None, version: str | None = None
    ) -> LoadedModel:
        """A new LoadedModel for `path` (named by its metadata unless `name`, `version` say),
        not yet served. ModelLoadError says why it cannot be."""
        loop = asyncio.get_running_loop()
        try:
            predictor, decoder = await loop.run_in_executor(None, self._prepare, path)
        except ModelLoadError as err:
            golden = "mismatch" if isinstance(err, GoldenMismatchError) else None
            self._count_load("failed", name or "", version or "", golden)
            raise
        name = name or predictor.meta.name
        version = version or predictor.meta.version
        try:
            items = await self.items.source_for(predictor.meta.features)
        except ItemSourceError as err:
            self._count_load("failed", name, version, None)
            raise ModelLoadError(f"{path}: {err}") from None
        s = self.settings
        metrics = self.metrics.for_model(name, version)
        monitor = self.metrics.monitoring.monitor(predictor.meta, name, version)
        common: dict[str, Any] = dict(
            workers=s.inference_workers,
            admission=Admission.of(s),
            metrics=metrics,
            share=self.share,
            monitor=monitor if monitor.active else None,
        )
        runner: Runner
        if s.batch_max_rows > 0:
            runner = MicroBatcher(
                predictor,
                self.executor,
                max_rows=s.batch_max_rows,
                wait_s=s.batch_wait_ms / 1000,
                **common,
            )
        else:
            runner = DirectRunner(predictor, self.executor, **common)
        rows = predictor.meta.golden.rows if predictor.meta.golden is not None else []
        self._count_load("ok", name, version, "ok" if rows else "missing")
        return LoadedModel(
            name, version, predictor, decoder, runner, metrics, time.time(), items=items
        )

    def _count_load(self, result: str, name: str, version: str, golden: str | None) -> None:
        self.metrics.reloads.labels(result, name, version).inc()
        if golden is not None:
            self.metrics.golden_checks.labels(name, version, golden).inc()

    async def _swap(self, models: dict[Key, LoadedModel], routing: RoutingConfig) -> None:
        """Serve `models` with `routing` from now on; the models no longer served drain what
        they accepted, then are dropped."""
        old = self.serving
        versions: dict[str, set[str]] = {}
        for name, version in models:
            versions.setdefault(name, set()).add(version)
        self.serving = Serving(models, Router(routing, versions))
        if models:
            self.not_ready_reason = "model not loaded yet"
        self._report()
        for callback in self.on_swap:
            callback(self.serving)
        self.items.forget_unused({features_key(m.predictor.meta.features) for m in models.values()})
        gone = [m for key, m in old.models.items() if models.get(key) is not m]
        for model in gone:
            await model.runner.close()
            log.info(
                "model unloaded",
                extra={"event": "model_unloaded", "model": model.name, "version": model.version},
            )
        if gone:
            del gone, old
            gc.collect()
            return_freed_memory()

    async def load_file(self, path: Path, log_failure: bool = True) -> LoadedModel:
        """One-file mode: load `path` and serve it in place of what was served; on any failure
        what was served stays (ModelLoadError)."""
        async with self._lock:
            try:
                new = await self._load(path)
            except ModelLoadError as err:
                if not self.serving.models:
                    self.not_ready_reason = str(err)
                    self._report()
                if log_failure:
                    log.error(
                        "model load failed",
                        extra={"event": "model_load_failed", "reason": str(err)},
                    )
                raise
            await self._swap({new.key: new}, RoutingConfig())
            return new

    async def sync(self, only: str | None = None) -> SyncReport:
        """Repository mode: read the repository (and routing.yaml) again; load what is new or
        changed (every model, or `only` that one), beside what serves; swap; unload what is
        no longer wanted. A version that fails is reported and not served; the others are."""
        assert self.repository is not None
        async with self._lock:
            report = SyncReport()
            listing = scan(self.repository)
            self.listing = listing
            routing = self._read_routing(report)
            wanted = listing.wanted(routing.pinned(), self.unloaded)
            current = {k: m.stamp for k, m in self.serving.models.items() if m.stamp is not None}
            to_load, to_unload = wanted.diff(current)
            if only is not None:
                to_load = [v for v in to_load if v.name == only]
                to_unload = [k for k in to_unload if k[0] == only or k[0] in self.unloaded]
            models = dict(self.serving.models)
            for version in to_load:
                failure = self.failures.get((version.name, version.version))
                if failure is not None and failure.stamp == version.stamp and only is None:
                    continue  # the same broken file: not tried again until it changes
                loaded = await self._load_version(version, report)
                if loaded is not None:
                    models[loaded.key] = loaded
            for key in to_unload:
                models.pop(key, None)
                report.unloaded.append(key)
            for name, error in listing.errors.items():
                log.error(
                    "repository entry refused",
                    extra={"event": "repository_error", "model": name, "reason": error},
                )
            wanted_keys = set(wanted.files)
            self.failures = {k: f for k, f in self.failures.items() if k in wanted_keys}
            if not models:
                self.not_ready_reason = self._empty_reason(listing, report)
            await self._swap(models, routing)
            return report

    async def _load_version(self, version: Version, report: SyncReport) -> LoadedModel | None:
        key = (version.name, version.version)
        try:
            loaded = await self._load(version.path, version.name, version.version)
        except ModelLoadError as err:
            self.failures[key] = Failure(str(err), version.stamp)
            report.failed[key] = str(err)
            log.error(
                "model version refused",
                extra={
                    "event": "model_load_failed",
                    "model": version.name,
                    "version": version.version,
                    "reason": str(err),
                },
            )
            return None
        loaded.stamp = version.stamp
        self.failures.pop(key, None)
        report.loaded.append(key)
        return loaded

    def _read_routing(self, report: SyncReport) -> RoutingConfig:
        """routing.yaml as now on disk, or, if it is bad, the one in force (the error is kept
        for /metadata and the repository index)."""
        assert self.repository is not None
        path = self.repository / ROUTING_FILE
        current = self.serving.router.config
        try:
            text = path.read_text() if path.exists() else ""
            routing = parse_routing(text, str(path))
        except (OSError, UnicodeDecodeError, RepositoryError) as err:
            self.routing_error = str(err)
            report.routing_error = str(err)
            log.error(
                "routing file refused; the last good one stays",
                extra={"event": "routing_refused", "reason": str(err)},
            )
            return current
        self.routing_error = None
        return routing

    def _empty_reason(self, listing: Listing, report: SyncReport) -> str:
        if "" in listing.errors:
            return listing.errors[""]
        if report.failed:
            (name, version), reason = next(iter(sorted(report.failed.items())))
            return f"no model loaded: {name} {version}: {reason}"
        return (
            f"no model in the repository {self.repository} (expected <name>/<version>/model.onnx)"
        )

    async def load_model(self, name: str) -> SyncReport:
        """The repository API's load: the model `name` as its folder and policy say now (again
        if it was unloaded)."""
        assert self.repository is not None
        self.unloaded.discard(name)
        return await self.sync(only=name)

    async def unload_model(self, name: str) -> SyncReport:
        """The repository API's unload: every version of `name`, until it is loaded again."""
        assert self.repository is not None
        self.unloaded.add(name)
        return await self.sync(only=name)

    async def apply(self, action: Action) -> str | None:
        """Make a change (an Action: asked of this worker, or made by another) here: None, or
        why it failed. A reload ("file", "sync") reads the item features again too (a refused
        item source is kept in `items.error`, not a failure of the reload)."""
        try:
            if action.kind in ("file", "sync"):
                await self.refresh_items()
                if action.kind == "file":
                    await self.load_file(Path(action.arg))
                    return None
                return _failed(await self.sync())
            elif action.kind == "load":
                return _failed(await self.load_model(action.arg))
            elif action.kind == "unload":
                await self.unload_model(action.arg)
        except ModelLoadError as err:
            return str(err)
        return None

    async def apply_everywhere(self, action: Action) -> str | None:
        """`action` here, then in every other worker: None, or what failed, where."""
        here = await self.apply(action)
        if self.link is None:
            return here
        failed = await self._apply_elsewhere(action)
        if here is not None:
            failed[self.link.index] = here
        return _where(failed)

    async def apply_elsewhere(self, action: Action) -> str | None:
        """`action`, made here already, in every other worker: None, or what failed, where."""
        return _where(await self._apply_elsewhere(action))

    async def _apply_elsewhere(self, action: Action) -> dict[int, str]:
        return await self.link.broadcast(action) if self.link is not None else {}

    async def keep_loading(self) -> None:
        """At start-up: load what is configured, retrying (it may not exist yet) until the
        server is ready, logging each distinct reason once; then, with a repository and a
        poll interval, read it again every interval (an unexpected failure of one reading is
        logged, and the next one comes). A ProviderError (a setting to fix) is raised, not
        retried."""
        last_reason = None
        self._report()
        while True:
            try:
                if self.repository is not None:
                    await self.sync()
                else:
                    await self.load_file(self.model_path, log_failure=False)
            except ProviderError:
                raise
            except ModelLoadError as err:
                self.not_ready_reason = str(err)
            ready, reason = self.ready_here()
            if ready:
                break
            if reason != last_reason:
                last_reason = reason
                log.error(
                    "not ready; retrying until it is",
                    extra={
                        "event": "model_load_failed",
                        "reason": reason,
                        "retry_s": self.settings.load_retry_s,
                    },
                )
            await asyncio.sleep(self.settings.load_retry_s)
        await self.poll()

    async def poll(self) -> None:
        """Read the repository every MMOE_REPOSITORY_POLL_S seconds, and the item features
        every MMOE_ITEMS_POLL_S, where set (an unexpected failure of one reading is logged,
        and the next one comes)."""
        s = self.settings
        every = {
            "repository": s.repository_poll_s if self.repository is not None else 0,
            "items": s.items_poll_s if s.items is not None else 0,
        }
        due = {what: time.monotonic() + t for what, t in every.items() if t > 0}
        while due:
            what, at = min(due.items(), key=lambda item: item[1])
            await asyncio.sleep(max(0.0, at - time.monotonic()))
            due[what] = time.monotonic() + every[what]
            try:
                if what == "repository":
                    await self.sync()
                else:
                    await self.refresh_items()
            except Exception:  # a bug: the server keeps serving what it has
                log.exception("poll failed", extra={"event": "poll_failed", "what": what})

    async def refresh_items(self) -> str | None:
        """Item features read again where they changed (see HeldItems), each new source
        swapped into the models that use it; None, or why the new ones were refused (the old
        ones keep serving)."""
        if self.items.spec is None:
            return None
        try:
            fresh = await self.items.refresh()
        except ItemSourceError as err:
            self.metrics.item_reloads.labels("failed").inc()
            log.error(
                "item features refused; the old ones keep serving",
                extra={"event": "items_refused", "reason": str(err)},
            )
            return str(err)
        if fresh:
            self.metrics.item_reloads.labels("ok").inc()
            for model in self.serving.models.values():
                source = self.items.current(model.predictor.meta.features)
                if source is not None:
                    model.attach_items(source)
        return None

    def resolve_file(self, path: str | None) -> Path:
        """The file /admin/reload loads: the configured one, or a path inside the model
        directory (never outside it, symlinks resolved)."""
        if path is None:
            return self.settings.model_path
        root = self.settings.reload_dir
        candidate = Path(path)
        try:  # resolve() follows symlinks, so a link pointing outside the directory is refused
            target = (candidate if candidate.is_absolute() else root / candidate).resolve()
        except (ValueError, OSError, RuntimeError) as err:  # a NUL byte; a symlink loop
            raise ApiError(422, "invalid_path", f"not a usable path: {err}", "path") from None
        if not target.is_relative_to(root):
            raise ApiError(403, "path_not_allowed", f"reload paths must be inside {root}", "path")
        return target

    async def close(self) -> None:
        for model in self.serving.models.values():
            await model.runner.close()
        await self.items.close()


def _where(failed: dict[int, str]) -> str | None:
    if not failed:
        return None
    return "; ".join(f"worker {i}: {why}" for i, why in sorted(failed.items()))


def _failed(report: SyncReport) -> str | None:
    if not report.failed:
        return None
    return "; ".join(f"{n} {v}: {why}" for (n, v), why in sorted(report.failed.items()))
