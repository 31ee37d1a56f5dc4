"""One loaded model.onnx: an onnxruntime session, its metadata, a warmed-up run() for the service
to call, and the check that the file still computes what was exported (its golden rows)."""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from mmoe.contract.metadata import (
    FeatureInfo,
    GoldenMismatch,
    MetadataError,
    ModelMetadata,
    read_metadata,
)
from mmoe.contract.values import graph_inputs
from mmoe.service.cpu_share import CpuShare
from mmoe.service.errors import PayloadError
from mmoe.service.payload import RequestDecoder
from mmoe.service.weights import large_initializers

log = logging.getLogger("mmoe.service")

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


class ModelLoadError(RuntimeError):
    """The file cannot be served: missing, not ONNX, not ours, or failing its warm-up."""


class GoldenMismatchError(ModelLoadError):
    """The file loads but does not compute what was exported (its golden rows)."""


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


# A constant tensor at least this large is loaded once and handed to both sessions of a file
# (smaller ones, such as shapes, are not worth it, and onnxruntime wants those of its own).
_SHARED_MIN_BYTES = 1 << 16


def shared_initializers(path: Path) -> dict[str, ort.OrtValue]:
    """The file's large constants as values that several sessions of it can use
    (`SessionOptions.add_initializer`), so that two sessions hold the weights in memory once."""
    return {
        name: ort.OrtValue.ortvalue_from_numpy(array)  # a value holds on to its array
        for name, array in large_initializers(path, _SHARED_MIN_BYTES).items()
    }


def return_freed_memory() -> None:
    """Hand the heap's free pages back to the system (glibc keeps them by default, so the
    transient copies of a large file would stay in the process's RSS)."""
    with contextlib.suppress(OSError, AttributeError):  # not glibc
        ctypes.CDLL(None).malloc_trim(0)


def warmup_columns(features: list[FeatureInfo], n: int) -> dict[str, list[Any]]:
    """N rows of raw values exercising every rule: missing values (where a default allows),
    integer ids, empty, separated and over-long tags."""
    columns: dict[str, list[Any]] = {}
    for f in features:
        if f.kind == "numeric":
            values: list[Any] = [float(v) for v in np.linspace(0, 10, n)]
        elif f.kind == "tags":
            long = [f"warmup{j}" for j in range((f.max_len or 1) + 2)]
            joined = (f.separator or "|").join(["warmup", "x", "", "y"])
            forms: list[Any] = [["warmup"], [], joined, long]
            values = [forms[i % len(forms)] for i in range(n)]
        else:
            values = [i if i % 5 == 4 else f"warmup{i % 3}" for i in range(n)]
        if not f.required:
            values = [None if i % 4 == 3 else v for i, v in enumerate(values)]
        columns[f.name] = values
    return columns


def warmup_feeds(features: list[FeatureInfo], n: int) -> dict[str, np.ndarray]:
    """A synthetic batch of N rows exercising every input, built by the contract's rules;
    context inputs have one row, as /predict sends them."""
    feeds = graph_inputs(features, warmup_columns(features, n), n)
    return {f.name: feeds[f.name][:1] if f.context else feeds[f.name] for f in features}


class Predictor:
    """Thread-safe: onnxruntime sessions may be run from several threads at once.

    With `lone_threads` above `intra_op_threads` (on the CPU), the file has a second session on
    that many threads, for a call that is the server's only work (`run(..., lone=True)`): one
    thread per call keeps every core busy when requests come together, and leaves all but one
    idle for a request that comes alone. Both sessions use one copy of the weights."""

    def __init__(
        self,
        path: str | Path,
        provider: str = "auto",
        intra_op_threads: int = 0,
        warmup_rows: int = 32,
        lone_threads: int = 0,
    ) -> None:
        self.path = Path(path)
        t0 = time.perf_counter()
        if not self.path.is_file():
            raise ModelLoadError(f"model file not found: {self.path}")
        providers = choose_providers(provider)
        lone = 0 < intra_op_threads < lone_threads and providers[0] == PROVIDERS["cpu"]
        # Kept for as long as the sessions that use them.
        self._shared = shared_initializers(self.path) if lone else {}
        self.session = self._session(providers, intra_op_threads)
        self.lone_session: ort.InferenceSession | None = None
        # Threads of a call that is the server's only work; 0: no such session.
        self.lone_threads = lone_threads if lone else 0
        if lone:
            self.lone_session = self._session(providers, lone_threads, spin=True)
            return_freed_memory()  # reading the file for its weights took a copy or two
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
        # Per-row outputs (scores, logits); the monitoring ones are fetched by who watches them.
        self.monitor_outputs = self.meta.monitor.outputs if self.meta.monitor else []
        self.outputs = [
            o.name for o in self.session.get_outputs() if o.name not in self.monitor_outputs
        ]
        self.load_seconds = time.perf_counter() - t0
        t1 = time.perf_counter()
        feeds = warmup_feeds(self.meta.features, warmup_rows)
        for lone in self._modes:
            try:
                out = self.run(feeds, self.outputs + self.monitor_outputs, lone)
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
                "lone_request_threads": self.lone_threads,
                "load_s": round(self.load_seconds, 3),
                "warmup_s": round(self.warmup_seconds, 3),
            },
        )

    def runs_alone(self, share: CpuShare) -> bool:
        """Whether a call made now takes the lone-request session: the file has one, and the
        call would be the only work on the whole server (`share`)."""
        return self.lone_session is not None and share.alone()

    @property
    def _modes(self) -> list[bool]:
        """`lone` for each session: every check of the file runs on both."""
        return [False, True] if self.lone_session is not None else [False]

    def _session(
        self, providers: list[str], intra_op_threads: int, spin: bool = False
    ) -> ort.InferenceSession:
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if intra_op_threads:
            opts.intra_op_num_threads = intra_op_threads
        for name, value in self._shared.items():
            opts.add_initializer(name, value)
        opts.inter_op_num_threads = 1
        # onnxruntime's threads busy-wait for work by default, and keep at it for a while after
        # run() returns, taking CPU from the event loop, from the other workers and from
        # anything else on the machine: on 2 shared cores a 256-row request then costs about
        # twice the CPU time (bench/). The lone-request session spins during its run only
        # (its threads hand work to each other between operators faster) and stops when the
        # run returns: 3.8 against 4.0 ms per 256-row run, measured in-process.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
        if spin:
            opts.add_session_config_entry("session.force_spinning_stop", "1")
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
        named = [t.output for t in self.meta.tasks]
        named += self.meta.monitor.outputs if self.meta.monitor else []
        missing = [name for name in named if name not in outputs]
        if missing:
            raise ModelLoadError(f"{self.path}: metadata names outputs {missing} the graph lacks")

    def golden_mismatches(self, decoder: RequestDecoder) -> list[GoldenMismatch]:
        """The file's golden rows decoded by `decoder` (the server's own decoding path, from the
        JSON a caller would send) and run: every output value that differs from what export
        recorded by more than it allows. Empty if all match or the file has no golden rows
        (exported before metadata format 1.1). ModelLoadError if the rows cannot be run."""
        golden = self.meta.golden
        if golden is None or not golden.rows:
            return []
        missing = sorted(set(golden.outputs) - set(self.outputs))
        if missing:
            raise ModelLoadError(f"{self.path}: golden rows name outputs {missing} the graph lacks")
        names = list(golden.outputs)
        feeds = []
        for start in range(0, len(golden.rows), decoder.max_rows):
            rows = golden.rows[start : start + decoder.max_rows]
            try:
                feeds.append(decoder.decode(json.dumps({"instances": rows}).encode()).feeds)
            except PayloadError as err:
                raise ModelLoadError(
                    f"{self.path}: golden rows {start}..{start + len(rows) - 1} are not a valid "
                    f"request: {err}"
                ) from None
        for lone in self._modes:  # the first session that differs is the one reported
            parts: dict[str, list[np.ndarray]] = {name: [] for name in names}
            for part in feeds:
                try:
                    outputs = self.run(part, names, lone)
                except Exception as err:  # onnxruntime raises several unrelated types here
                    raise ModelLoadError(f"{self.path}: golden rows failed to run: {err}") from None
                for name, value in outputs.items():
                    parts[name].append(value)
            got = {name: np.concatenate(values) for name, values in parts.items()}
            try:
                found = golden.mismatches(got)
            except ValueError as err:
                raise ModelLoadError(f"{self.path}: golden rows: {err}") from None
            if found:
                return found
        return []

    def check_golden(self, decoder: RequestDecoder) -> None:
        """Raises ModelLoadError, naming the outputs and their differences, if the file does not
        reproduce its golden rows; a file without them is served with a warning."""
        if self.meta.golden is None or not self.meta.golden.rows:
            log.warning(
                "model has no golden rows: not verified",
                extra={"event": "golden_missing", "path": str(self.path)},
            )
            return
        found = self.golden_mismatches(decoder)
        if found:
            shown = "; ".join(map(str, found[:3]))
            more = f"; and {len(found) - 3} more values" if len(found) > 3 else ""
            raise GoldenMismatchError(
                f"{self.path}: not served, the file does not compute what was exported "
                f"(edited, corrupted, or a runtime that computes differently): {shown}{more}"
            )

    def run(
        self, feeds: dict[str, np.ndarray], outputs: list[str] | None = None, lone: bool = False
    ) -> dict[str, np.ndarray]:
        """`outputs` (default: the per-row ones) for `feeds`; `lone`: the call is the server's
        only work, and runs on every thread of the lone-request session where there is one."""
        names = outputs or self.outputs
        session = self.lone_session if lone and self.lone_session is not None else self.session
        return dict(zip(names, session.run(names, feeds), strict=True))

    @property
    def task_outputs(self) -> dict[str, str]:
        return {t.name: t.output for t in self.meta.tasks}
