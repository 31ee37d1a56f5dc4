"""One loaded model.onnx: an onnxruntime session, its metadata, and a warmed-up run() for the
service to call."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from mmoe.contract.metadata import FeatureInfo, MetadataError, ModelMetadata, read_metadata

log = logging.getLogger("mmoe.service")

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


class ModelLoadError(RuntimeError):
    """The file cannot be served: missing, not ONNX, not ours, or failing its warm-up."""


class ProviderError(ModelLoadError):
    """The configured execution provider cannot be used: a setting to change, not a file to
    wait for, so the server stops instead of retrying."""


def choose_providers(requested: str) -> list[str]:
    available = ort.get_available_providers()
    if requested == "cpu":
        return [PROVIDERS["cpu"]]
    if requested == "cuda":
        if PROVIDERS["cuda"] not in available:
            raise ProviderError(
                "MMOE_PROVIDER=cuda but this onnxruntime build has no CUDAExecutionProvider "
                f"(available: {available}); install onnxruntime-gpu or use MMOE_PROVIDER=auto"
            )
        return [PROVIDERS["cuda"], PROVIDERS["cpu"]]
    if PROVIDERS["cuda"] in available:
        return [PROVIDERS["cuda"], PROVIDERS["cpu"]]
    return [PROVIDERS["cpu"]]


def warmup_feeds(features: list[FeatureInfo], n: int) -> dict[str, np.ndarray]:
    """A synthetic batch exercising every input (missing values, empty tags); context inputs
    have one row, as /predict sends them."""
    feeds: dict[str, np.ndarray] = {}
    for f in features:
        n_rows = 1 if f.context else n
        if f.kind == "numeric":
            feeds[f.name] = np.linspace(0, 10, n_rows, dtype=np.float32)
        elif f.kind == "tags":
            assert f.max_len is not None
            arr = np.full((n_rows, f.max_len), "", dtype=object)
            arr[::2, 0] = "warmup"
            feeds[f.name] = arr
        else:
            feeds[f.name] = np.array([f"warmup{i % 3}" for i in range(n_rows)], dtype=object)
    return feeds


class Predictor:
    """Thread-safe: onnxruntime sessions may be run from several threads at once."""

    def __init__(
        self,
        path: str | Path,
        provider: str = "auto",
        intra_op_threads: int = 0,
        warmup_rows: int = 32,
    ) -> None:
        self.path = Path(path)
        t0 = time.perf_counter()
        if not self.path.is_file():
            raise ModelLoadError(f"model file not found: {self.path}")
        providers = choose_providers(provider)
        self.session = self._session(providers, intra_op_threads)
        self.provider = self.session.get_providers()[0]
        if self.provider != providers[0]:  # onnxruntime falls back silently; say so
            reason = (
                f"onnxruntime fell back from {providers[0]} to {self.provider} "
                "(CUDA/cuDNN libraries missing or no GPU visible)"
            )
            if provider == "cuda":
                raise ProviderError(f"MMOE_PROVIDER=cuda but {reason}")
            log.warning(reason, extra={"event": "provider_fallback", "provider": self.provider})
        try:
            self.meta: ModelMetadata = read_metadata(
                self.session.get_modelmeta().custom_metadata_map
            )
        except MetadataError as err:
            raise ModelLoadError(f"{self.path}: {err}") from None
        self._check_io()
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.load_seconds = time.perf_counter() - t0
        t1 = time.perf_counter()
        feeds = warmup_feeds(self.meta.features, warmup_rows)
        try:
            out = self.run(feeds)
        except Exception as err:
            raise ModelLoadError(f"{self.path}: warm-up run failed: {err}") from None
        for name, arr in out.items():
            if not np.isfinite(arr).all():
                raise ModelLoadError(f"{self.path}: warm-up produced non-finite {name}")
        self.warmup_seconds = time.perf_counter() - t1
        log.info(
            "model loaded",
            extra={
                "event": "model_loaded",
                "path": str(self.path),
                "model": self.meta.name,
                "version": self.meta.version,
                "provider": self.provider,
                "load_s": round(self.load_seconds, 3),
                "warmup_s": round(self.warmup_seconds, 3),
            },
        )

    def _session(self, providers: list[str], intra_op_threads: int) -> ort.InferenceSession:
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if intra_op_threads:
            opts.intra_op_num_threads = intra_op_threads
        opts.inter_op_num_threads = 1
        # onnxruntime's threads busy-wait for work by default, taking CPU from the event loop,
        # from the other workers and from anything else on the machine: on 2 shared cores a
        # 256-row request then costs about twice the CPU time (bench/).
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.log_severity_level = 3
        try:
            return ort.InferenceSession(str(self.path), opts, providers=providers)
        except Exception as err:  # onnxruntime raises several unrelated types here
            raise ModelLoadError(f"onnxruntime cannot load {self.path}: {err}") from None

    def _check_io(self) -> None:
        inputs = {i.name for i in self.session.get_inputs()}
        declared = {f.name for f in self.meta.features}
        if inputs != declared:
            raise ModelLoadError(
                f"{self.path}: graph inputs {sorted(inputs)} do not match the metadata's "
                f"features {sorted(declared)}"
            )
        outputs = {o.name for o in self.session.get_outputs()}
        missing = [t.output for t in self.meta.tasks if t.output not in outputs]
        if missing:
            raise ModelLoadError(f"{self.path}: metadata names outputs {missing} the graph lacks")

    def run(
        self, feeds: dict[str, np.ndarray], outputs: list[str] | None = None
    ) -> dict[str, np.ndarray]:
        names = outputs or self.outputs
        return dict(zip(names, self.session.run(names, feeds), strict=True))

    @property
    def task_outputs(self) -> dict[str, str]:
        return {t.name: t.output for t in self.meta.tasks}
