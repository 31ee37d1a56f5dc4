# Images for the three stages of the project, one target each:
#
#   runtime (the default)  serves a model.onnx on :8000: onnxruntime (CPU) + FastAPI, no torch
#   gpu                    the same server on an NVIDIA CUDA base with onnxruntime-gpu
#   train                  torch (CPU build) for `mmoe data`, `mmoe train`, `mmoe export`
#
#   docker build -t mmoe-ranking:serve .
#   docker build --target gpu -t mmoe-ranking:gpu .
#   docker build --target train -t mmoe-ranking:train .
#
# The model is not baked in: mount it at /models/model.onnx (or set MMOE_MODEL_PATH).

# The gpu target's base (see that stage).
ARG CUDA_IMAGE=nvidia/cuda:13.0.2-cudnn-runtime-ubuntu24.04

# ---- build: the project's two wheels (the project alone; dependencies come from the index) -
# mmoe_ranking: the command, the contract and the server; mmoe_ranking_train (training/): the
# training code, export and bench. Each pyproject.toml maps its stage folders into the mmoe
# namespace (model/ -> mmoe.model, ...): the wheels install them there.
FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
WORKDIR /src
COPY pyproject.toml README.md ./
COPY mmoe ./mmoe
COPY training ./training
COPY model ./model
COPY export ./export
COPY contract ./contract
COPY service ./service
COPY bench ./bench
RUN pip wheel --no-deps --wheel-dir /wheels . ./training

# ---- train: torch (CPU build) for data -> train -> export ----------------------------------
FROM python:3.11-slim AS train
# torch's CPU wheels. pip takes the highest version over both indexes, and the CPU build's local
# version (2.x+cpu) ranks above PyPI's CUDA build of the same release.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore \
    PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 ORT_DISABLE_TELEMETRY=1
COPY --from=build /wheels /tmp/wheels
RUN pip install --extra-index-url "$TORCH_INDEX_URL" \
      "$(ls /tmp/wheels/mmoe_ranking-*.whl)" "$(ls /tmp/wheels/mmoe_ranking_train-*.whl)" \
 && rm -rf /tmp/wheels \
 && python -c "import sys, torch; sys.exit('got a CUDA build of torch' if torch.version.cuda else 0)"
RUN useradd --uid 10001 --user-group --create-home --shell /usr/sbin/nologin mmoe \
 && mkdir -p /models /app \
 && chown mmoe:mmoe /models /app
WORKDIR /app
COPY configs ./configs
USER 10001:10001
CMD ["mmoe", "--help"]

# ---- gpu: the server on CUDA + cuDNN --------------------------------------------------------
# onnxruntime-gpu from PyPI is built for one CUDA major (13 at the time of writing, so the host
# driver must support CUDA 13). For a CUDA 12 host, build with
#   --build-arg CUDA_IMAGE=nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04
#   --build-arg ONNXRUNTIME_GPU='onnxruntime-gpu==1.23.*'
FROM ${CUDA_IMAGE} AS gpu
ARG ONNXRUNTIME_GPU=onnxruntime-gpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /wheels /tmp/wheels
# The distribution's Python is externally managed: the server gets a virtualenv.
RUN python3 -m venv /opt/venv \
 && /opt/venv/bin/pip install "$ONNXRUNTIME_GPU" "$(ls /tmp/wheels/mmoe_ranking-*.whl)[serve-gpu]" \
 && rm -rf /tmp/wheels
RUN useradd --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin mmoe \
 && mkdir -p /models && chown mmoe:mmoe /models
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 ORT_DISABLE_TELEMETRY=1 \
    MMOE_HOST=0.0.0.0 MMOE_PORT=8000 MMOE_MODEL_PATH=/models/model.onnx MMOE_PROVIDER=cuda
USER 10001:10001
EXPOSE 8000
# CUDA session start-up and warm-up take longer than on CPU.
HEALTHCHECK --start-period=60s --interval=10s --timeout=3s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/readyz' % os.environ.get('MMOE_PORT', '8000'), timeout=2)"]
# uvicorn turns SIGTERM into a graceful shutdown: no new connections, in-flight requests
# finish (up to 30 s). Give `docker stop` more than that: `docker stop -t 35`.
STOPSIGNAL SIGTERM
CMD ["mmoe", "serve"]

# ---- runtime: the CPU server (the default target) -------------------------------------------
# Only the serving wheel: every dependency is a binary wheel, so no compiler, no torch, and no
# training code.
FROM python:3.11-slim AS runtime
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
COPY --from=build /wheels /tmp/wheels
RUN pip install --only-binary=:all: "$(ls /tmp/wheels/mmoe_ranking-*.whl)[serve]" \
 && rm -rf /tmp/wheels
RUN useradd --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin mmoe \
 && mkdir -p /models && chown mmoe:mmoe /models
# ORT_DISABLE_TELEMETRY: a server has no business calling out (and no home to keep an id in).
ENV PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 ORT_DISABLE_TELEMETRY=1 \
    MMOE_HOST=0.0.0.0 MMOE_PORT=8000 MMOE_MODEL_PATH=/models/model.onnx
USER 10001:10001
EXPOSE 8000
# /readyz is 503 until the model is loaded and warmed up; the start period covers that.
HEALTHCHECK --start-period=30s --interval=10s --timeout=3s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/readyz' % os.environ.get('MMOE_PORT', '8000'), timeout=2)"]
# uvicorn turns SIGTERM into a graceful shutdown: no new connections, in-flight requests
# finish (up to 30 s). Give `docker stop` more than that: `docker stop -t 35`.
STOPSIGNAL SIGTERM
CMD ["mmoe", "serve"]
