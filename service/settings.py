"""Server settings: MMOE_* environment variables, overridden by `mmoe serve` flags."""

from __future__ import annotations

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


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MMOE_", frozen=True, extra="ignore")

    # The file `make demo` builds, so that a plain `mmoe serve` after it serves something; a
    # deployment names its own (the images set /models/model.onnx).
    model_path: Path = Field(Path("models/demo.onnx"), description="the model.onnx to serve")
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
    # The runs share one thread pool: a request alone may use every core, concurrent ones split
    # them. On 2 CPUs that gave 10-40% more throughput at concurrency 8 than one run at a time
    # or one thread per run (bench/).
    intra_op_threads: int = Field(
        0, ge=0, description="threads per runtime call; 0: one per CPU this process may use"
    )
    inference_workers: int = Field(
        0, ge=0, description="runtime calls at once; 0: one per CPU this process may use"
    )
    # Spinning threads busy-wait between operators while a run is in progress: lower latency
    # with several intra-op threads on idle cores, far slower when runs or processes share the
    # cores. `idle` spins only in a run that has the machine to itself (no other request in
    # progress), on a second session: 15% lower latency for a lone 256-row request of the
    # EasyRec-sized model, the same throughput under load, one more copy of the weights in
    # memory (bench/).
    intra_op_spinning: Literal["off", "on", "idle"] = Field(
        "idle",
        description="idle: spin only in a request that has the server to itself (a second "
        "session: one more copy of the weights; CPU only, off on a GPU); on: always; off: never",
    )

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

    @field_validator("intra_op_spinning", mode="before")
    @classmethod
    def _spinning_flag(cls, v: object) -> object:
        flags = {"0": "off", "false": "off", "no": "off", "1": "on", "true": "on", "yes": "on"}
        if isinstance(v, bool):
            return "on" if v else "off"
        return flags.get(v.lower(), v.lower()) if isinstance(v, str) else v

    @field_validator("grpc_port")
    @classmethod
    def _grpc_port_not_http(cls, v: int | None, info: ValidationInfo) -> int | None:
        if v is not None and v == info.data.get("port"):
            raise ValueError(f"{v} is the HTTP port too: give gRPC a port of its own")
        return v

    @field_validator("intra_op_threads", "inference_workers")
    @classmethod
    def _one_per_cpu(cls, v: int) -> int:
        return v or usable_cpus()

    @property
    def reload_dir(self) -> Path:
        return (self.model_dir or self.model_path.parent).resolve()
