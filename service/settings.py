"""Server settings: MMOE_* environment variables, overridden by `mmoe serve` flags."""

from __future__ import annotations

import importlib.metadata
import math
import os
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity, capped by a cgroup v2 CPU quota (a
    container's CPU limit, which the affinity does not show)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            return max(1, min(cpus or 1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return cpus or 1


def _gpu_build() -> bool:
    """Whether the CUDA build of onnxruntime is installed (read from its package metadata:
    importing onnxruntime here would cost a multi-process server's parent 30 MB)."""
    try:
        importlib.metadata.distribution("onnxruntime-gpu")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MMOE_", frozen=True, extra="ignore")

    # The file `make demo` builds, so that a plain `mmoe serve` after it serves something; a
    # deployment names its own (the images set /models/model.onnx).
    model_path: Path = Field(Path("models/demo.onnx"), description="the model.onnx to serve")
    # Several models and versions side by side, laid out as Triton's (service/repository.py);
    # when set, model_path is not used.
    model_repository: Path | None = Field(
        None, description="a repository DIR/<name>/<version>/model.onnx to serve instead"
    )
    repository_poll_s: float = Field(
        0, ge=0, description="read the repository again every this many seconds; 0: only on reload"
    )
    # Item features held by the server (service/items.py, docs/items.md).
    items: str | None = Field(
        None, description="item features: a Parquet/Arrow file, or redis://host:port/db"
    )
    items_key: str | None = Field(
        None, description="the item file's key column; unset: the one id column of unique values"
    )
    items_poll_s: float = Field(
        0, ge=0, description="look for a new item file (or manifest) every this many seconds"
    )
    items_cache: int = Field(100_000, ge=1, description="items cached in each worker (Redis)")
    items_ttl_s: float = Field(60.0, gt=0, description="seconds a cached item is fresh (Redis)")
    # A request can never make the server read a file outside it.
    model_dir: Path | None = Field(
        None, description="directory /admin/reload may load from; unset: the model's"
    )
    host: str = Field("127.0.0.1", description="address to listen on")
    port: int = Field(8000, ge=0, le=65535, description="port to listen on")
    # Bound with SO_REUSEPORT (grpcio's default on Linux), so that several worker processes
    # can each serve the same port.
    grpc_port: int | None = Field(
        None, ge=1, le=65535, description="port for KServe V2 over gRPC, on --host; unset: off"
    )

    provider: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="execution provider; auto: CUDA when it loads, else CPU"
    )
    # Processes rather than threads: one runtime call per core, each in its own process with
    # its own session, scored 1.2-1.5x the requests per second of one process whose threads
    # share the cores (docs/workers.md).
    workers: int = Field(
        0,
        ge=0,
        description="server processes sharing the port; 0: one per CPU this process may use "
        "(one with CUDA)",
    )
    intra_op_threads: int = Field(
        0, ge=0, description="threads per runtime call; 0: the CPUs divided among the workers"
    )
    # A request alone on the server would otherwise leave the other cores idle: it runs on a
    # second session of the file with more threads, sharing the first one's weights.
    lone_request_threads: int = Field(
        0,
        ge=0,
        description="threads of a runtime call while it is the server's only request; 0: every "
        "CPU; at most MMOE_INTRA_OP_THREADS: off",
    )
    inference_workers: int = Field(1, ge=1, description="runtime calls at once in each worker")
    max_batch_rows: int = Field(4096, ge=1, description="most rows one request may carry (413)")
    max_body_bytes: int = Field(16 * 1024 * 1024, ge=1024, description="largest request body (413)")
    # With no wait, a call takes the requests that queued while the previous one ran; waiting
    # for company only idles the cores when they are few (bench/ measures both).
    batch_max_rows: int = Field(
        0, ge=0, description="dynamic batching: most rows per merged runtime call; 0: off"
    )
    batch_wait_ms: float = Field(
        0.0, ge=0.0, description="dynamic batching: how long a call waits for company"
    )
    max_queue: int = Field(64, ge=1, description="requests waiting for the runtime before 503")
    request_timeout_ms: int = Field(
        10_000, ge=1, description="a request not scored in this time gets 503"
    )
    # So that slow or stalled clients cannot hold connections open.
    client_timeout_s: float = Field(
        10.0, gt=0, description="time to send the request head, and again the body (408)"
    )
    retry_after_s: int = Field(1, ge=1, description="Retry-After of a 503")

    api_key: SecretStr | None = Field(
        None, description="if set, /predict, KServe infer and /admin need it"
    )
    unknown_features: Literal["error", "ignore"] = Field(
        "error", description="a field the model does not take: 422, or dropped"
    )
    warmup_rows: int = Field(32, ge=1, description="rows of the warm-up run before ready")
    load_retry_s: float = Field(2.0, gt=0, description="retry interval while no model is loaded")
    # Monitoring (docs/monitoring.md): each piece exports its series and the model's training-
    # time reference for them; off, neither, and its graph outputs are not fetched.
    monitor_features: bool = Field(
        True, description="count feature values by outcome: known, out of vocabulary, default"
    )
    monitor_gates: bool = Field(True, description="sum the gate weights per task and expert")
    monitor_scores: bool = Field(True, description="a histogram of the scores per task")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="log level")
    access_log: bool = Field(True, description="one JSON line per request")

    @field_validator("workers")
    @classmethod
    def _one_per_cpu(cls, v: int, info: ValidationInfo) -> int:
        if v:
            return v
        # On a GPU the runs wait on the device rather than on cores, and each worker would hold
        # a copy of the model in GPU memory.
        provider = info.data.get("provider")
        return 1 if provider == "cuda" or (provider == "auto" and _gpu_build()) else usable_cpus()

    @field_validator("grpc_port")
    @classmethod
    def _grpc_port_not_http(cls, v: int | None, info: ValidationInfo) -> int | None:
        if v is not None and v == info.data.get("port"):
            raise ValueError(f"{v} is the HTTP port too: give gRPC a port of its own")
        return v

    @field_validator("intra_op_threads")
    @classmethod
    def _cpus_per_worker(cls, v: int, info: ValidationInfo) -> int:
        return v or max(1, usable_cpus() // info.data.get("workers", 1))

    @field_validator("lone_request_threads")
    @classmethod
    def _every_cpu(cls, v: int) -> int:
        return v or usable_cpus()

    @property
    def reload_dir(self) -> Path:
        return (self.model_dir or self.model_path.parent).resolve()
