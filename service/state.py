"""The model being served, swapped atomically on reload; and the app's shared things, for the
routes (get_settings, get_holder, get_metrics).

A request takes `holder.current` once and uses that model (its decoder, its runner) to the end,
so a reload never mixes two models in one answer. A new file is loaded, warmed up and checked
against its golden rows beside the old one; only if that succeeds does it replace it. The old
runner then drains what it accepted.
In a multi-process server (service/workers.py) each worker holds its own model; a reload asked
of one worker reaches the others through its WorkerLink.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from fastapi import Request

from mmoe.service.batching import Admission, DirectRunner, MicroBatcher, Runner
from mmoe.service.cpu_share import CpuShare
from mmoe.service.errors import ApiError
from mmoe.service.metrics import ServiceMetrics
from mmoe.service.payload import RequestDecoder
from mmoe.service.predictor import ModelLoadError, Predictor, ProviderError
from mmoe.service.settings import Settings
from mmoe.service.workers import WorkerLink, WorkerState

log = logging.getLogger("mmoe.service")


@dataclass
class LoadedModel:
    predictor: Predictor
    decoder: RequestDecoder
    runner: Runner
    loaded_at: float

    @property
    def name(self) -> str:
        return self.predictor.meta.name

    @property
    def version(self) -> str:
        return self.predictor.meta.version


class ModelHolder:
    def __init__(
        self,
        settings: Settings,
        metrics: ServiceMetrics,
        executor: ThreadPoolExecutor,
        share: CpuShare,
        link: WorkerLink | None = None,
    ):
        self.settings = settings
        self.metrics = metrics
        self.executor = executor
        self.share = share  # handed to each model's runner
        self.link = link
        self.current: LoadedModel | None = None
        self.not_ready_reason = "model not loaded yet"
        self._lock = asyncio.Lock()
        # Called with each newly swapped-in model, e.g. to refresh the OpenAPI schema.
        self.on_swap: list[Callable[[LoadedModel], object]] = []
        metrics.monitoring.serve_model(
            lambda: self.current.predictor.meta if self.current is not None else None
        )
        metrics.serve_models(self.served_models)

    def ready(self) -> tuple[bool, str]:
        """Whether this server can score (with workers: every one of them), and if not, why."""
        if self.current is None:
            return False, self.not_ready_reason
        return self.link.ready() if self.link is not None else (True, "")

    def served_models(self) -> list[dict[str, str]]:
        """The models being served (with workers: by any of them)."""
        if self.link is not None:
            return self.link.models()
        state = self._state()
        return [state["model"]] if state["model"] else []

    def _state(self) -> WorkerState:
        model = self.current
        return {
            "ready": model is not None,
            "reason": self.not_ready_reason,
            "model": None
            if model is None
            else {
                "name": model.name,
                "version": model.version,
                "provider": model.predictor.provider,
                "path": str(model.predictor.path),
            },
        }

    def _report(self) -> None:
        if self.link is not None:
            self.link.report(self._state())

    def require(self) -> LoadedModel:
        model = self.current
        if model is None:
            raise ApiError(
                503,
                "not_ready",
                self.not_ready_reason,
                None,
                {"Retry-After": str(self.settings.retry_after_s)},
            )
        return model

    def resolve(self, path: str | None) -> Path:
        """The file to (re)load: the configured one, or a path inside the model directory."""
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

    def _prepare(self, path: Path) -> tuple[Predictor, RequestDecoder]:
        """Load and warm up `path`, then run its golden rows through the decoder requests will
        use: a file that no longer computes what was exported is refused like one that does not
        load (ModelLoadError)."""
        s = self.settings
        predictor = Predictor(
            path, s.provider, s.intra_op_threads, s.warmup_rows, s.lone_request_threads
        )
        decoder = RequestDecoder(predictor.meta, s.max_batch_rows, s.unknown_features)
        predictor.check_golden(decoder)
        return predictor, decoder

    async def load(self, path: Path, log_failure: bool = True) -> LoadedModel:
        """Load, warm up and swap in `path`; on any failure the current model stays."""
        async with self._lock:
            s = self.settings
            loop = asyncio.get_running_loop()
            try:
                predictor, decoder = await loop.run_in_executor(None, self._prepare, path)
            except ModelLoadError as err:
                self.metrics.reloads.labels("failed").inc()
                if self.current is None:
                    self.not_ready_reason = str(err)
                    self._report()
                if log_failure:
                    log.error(
                        "model load failed",
                        extra={"event": "model_load_failed", "reason": str(err)},
                    )
                raise
            runner: Runner
            monitor = self.metrics.monitoring.monitor(predictor.meta)
            common = dict(
                workers=s.inference_workers,
                admission=Admission.of(s),
                metrics=self.metrics,
                monitor=monitor if monitor.active else None,
                share=self.share,
            )
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
            new = LoadedModel(predictor, decoder, runner, time.time())
            old, self.current = self.current, new
            self.metrics.reloads.labels("ok").inc()
            self._report()
            for callback in self.on_swap:
                callback(new)
            if old is not None:
                await old.runner.close()
            return new

    async def reload(self, path: Path) -> LoadedModel:
        """`load` here, then in every other worker: an ApiError names a worker that failed."""
        new = await self.load(path)
        if self.link is not None:
            failed = await self.link.reload_others(path)
            if failed:
                reasons = "; ".join(f"worker {i}: {why}" for i, why in sorted(failed.items()))
                raise ApiError(
                    422,
                    "model_rejected",
                    f"{reasons}; those workers still serve the previous model",
                    "path",
                )
        return new

    async def load_for_sibling(self, path: Path) -> str | None:
        """`load` for a reload another worker has done: None, or why it failed here."""
        try:
            await self.load(path)
        except ModelLoadError as err:
            return str(err)
        return None

    async def keep_loading(self, path: Path) -> None:
        """At start-up: try `path` until it loads (it may not exist yet), logging each distinct
        reason once. A ProviderError (a setting to fix) is raised, not retried."""
        last_reason = None
        self._report()
        while self.current is None:
            try:
                await self.load(path, log_failure=False)
            except ProviderError:
                raise
            except ModelLoadError as err:
                if str(err) != last_reason:
                    last_reason = str(err)
                    log.error(
                        "model load failed; retrying until it loads",
                        extra={
                            "event": "model_load_failed",
                            "reason": last_reason,
                            "retry_s": self.settings.load_retry_s,
                        },
                    )
                await asyncio.sleep(self.settings.load_retry_s)

    async def close(self) -> None:
        if self.current is not None:
            await self.current.runner.close()


# Routes read these from their request rather than declaring them with Depends(): FastAPI runs a
# plain-def dependency in its thread pool, a thread hop per request.


def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def get_holder(request: Request) -> ModelHolder:
    holder: ModelHolder = request.app.state.holder
    return holder


def get_metrics(request: Request) -> ServiceMetrics:
    metrics: ServiceMetrics = request.app.state.metrics
    return metrics
