"""The model being served, swapped atomically on reload.

A request takes `holder.current` once and uses that model (its decoder, its runner) to the end,
so a reload never mixes two models in one answer. A new file is loaded, warmed up and checked
against its golden rows beside the old one; only if that succeeds does it replace it. The old
runner then drains what it accepted.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from mmoe.service.batching import DirectRunner, MicroBatcher, Runner
from mmoe.service.errors import ApiError
from mmoe.service.metrics import ServiceMetrics
from mmoe.service.payload import RequestDecoder
from mmoe.service.predictor import ModelLoadError, Predictor, ProviderError
from mmoe.service.settings import Settings

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
    def __init__(self, settings: Settings, metrics: ServiceMetrics, executor: ThreadPoolExecutor):
        self.settings = settings
        self.metrics = metrics
        self.executor = executor
        self.current: LoadedModel | None = None
        self.not_ready_reason = "model not loaded yet"
        self._lock = asyncio.Lock()
        # Called with each newly swapped-in model, e.g. to refresh the OpenAPI schema.
        self.on_swap: list[Callable[[LoadedModel], object]] = []

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
            path, s.provider, s.intra_op_threads, s.warmup_rows, s.intra_op_spinning
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
                if log_failure:
                    log.error(
                        "model load failed",
                        extra={"event": "model_load_failed", "reason": str(err)},
                    )
                raise
            runner: Runner
            common = dict(
                workers=s.inference_workers,
                max_queue=s.max_queue,
                observe=self.metrics.observe_run,
                active_requests=lambda: self.metrics.active_requests,
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
            self.metrics.model_info.clear()
            self.metrics.model_info.labels(
                new.name, new.version, predictor.provider, str(path)
            ).set(1)
            for callback in self.on_swap:
                callback(new)
            if old is not None:
                await old.runner.close()
            return new

    async def keep_loading(self) -> None:
        """At start-up: try the configured file until it loads (it may not exist yet), logging
        each distinct reason once. A ProviderError (a setting to fix) is raised, not retried."""
        last_reason = None
        while self.current is None:
            try:
                await self.load(self.settings.model_path, log_failure=False)
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
