# stn: the inference service (`stn serve`) and batch jobs (`stn batch`) on onnxruntime. No torch.
#
#   GPU (default):  docker build -t stn .
#   CPU only:       docker build --build-arg VARIANT=cpu -t stn:cpu .
#   Other base:     docker build --build-arg BASE_IMAGE=localhost/stn-base:bookworm ...
#
# The base image needs python3 (3.11 or later) with the venv module, and useradd. The GPU variant
# takes CUDA and cuDNN from NVIDIA's pip wheels (onnxruntime-gpu[cuda,cudnn]), so a slim Python
# base is enough: no CUDA base image. The host needs the NVIDIA driver and the NVIDIA Container
# Toolkit; the README's deploy section says why this base and how big each variant is.

ARG BASE_IMAGE=python:3.11-slim-bookworm

# ---------------------------------------------------------------------------- builder
FROM ${BASE_IMAGE} AS builder

# gpu: onnxruntime-gpu with CUDA and cuDNN from pip; cpu: plain onnxruntime.
ARG VARIANT=gpu
# onnxruntime version of both variants (1.31 is built for CUDA 13: NVIDIA driver 580 or later).
ARG ONNXRUNTIME_VERSION=1.31.1
# Optional, for pip: a CA bundle (builds behind a TLS-inspecting proxy: mount it with -v and name it
# here) and an index mirror. Unset, pip uses its own bundle and PyPI.
ARG PIP_CERT
ARG PIP_INDEX_URL
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# Dependencies first, from pyproject.toml alone (project dependencies + the `runtime` extra), so
# that this layer is rebuilt only when they change, not when the code does.
WORKDIR /src
COPY pyproject.toml ./
RUN set -eu; \
    case "$VARIANT" in \
      gpu) ort="onnxruntime-gpu[cuda,cudnn]==${ONNXRUNTIME_VERSION}" ;; \
      cpu) ort="onnxruntime==${ONNXRUNTIME_VERSION}" ;; \
      *) echo "VARIANT must be gpu or cpu, got '$VARIANT'" >&2; exit 2 ;; \
    esac; \
    python3 -c 'import tomllib; p = tomllib.load(open("pyproject.toml", "rb"))["project"]; \
print("\n".join(p["dependencies"] + p["optional-dependencies"]["runtime"]))' > requirements.txt; \
    pip install -q -r requirements.txt "$ort"

# The code as a wheel (with the bundled default model, models/default/*.onnx), installed in the
# runtime stage on top of the dependencies: a code change rebuilds (and a pull downloads) only a
# small layer, not the venv.
# The native sampler library is compiled here (g++ and onnxruntime's headers, builder only): the
# wheel carries native/libstn_sampler.so; the runtime image has no compiler.
RUN apt-get update -qq && apt-get install -y -qq --no-install-recommends g++ && rm -rf /var/lib/apt/lists/*
COPY native/fetch-ort-headers.sh native/
RUN sh native/fetch-ort-headers.sh
COPY . .
RUN set -eu; \
    ls models/default/*.onnx >/dev/null 2>&1 || { echo "no bundled model: models/default/*.onnx is missing" >&2; exit 1; }; \
    pip wheel -q --no-deps -w /wheels . ; \
    python3 -c 'import glob, sys, zipfile; sys.exit(not any(n.endswith("native/libstn_sampler.so") \
for n in zipfile.ZipFile(glob.glob("/wheels/*.whl")[0]).namelist()))' \
      || { echo "the native sampler library was not built into the wheel" >&2; exit 1; }; \
    mkdir -p /opt/models && cp models/default/*.onnx /opt/models/ \
    && if [ -f models/default/DEFAULT ]; then cp models/default/DEFAULT /opt/models/; fi

# ---------------------------------------------------------------------------- runtime
FROM ${BASE_IMAGE} AS runtime

ARG VARIANT=gpu
ARG ONNXRUNTIME_VERSION=1.31.1
LABEL org.opencontainers.image.title="stn" \
      org.opencontainers.image.description="Spatial Transformer Networks: rectification service and batch jobs (onnxruntime)" \
      io.github.stn.variant="${VARIANT}" \
      io.github.stn.onnxruntime="${ONNXRUNTIME_VERSION}"

RUN groupadd --gid 10001 stn \
 && useradd --uid 10001 --gid stn --home-dir /home/stn --create-home --shell /usr/sbin/nologin stn \
 && mkdir -p /models /data/input /data/output \
 && chown stn:stn /data/input /data/output

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

# The dependencies (the builder's venv before the code went in).
COPY --from=builder /opt/venv /opt/venv

# The CUDA/cuDNN libraries of the nvidia-* wheels, for the dynamic loader (onnxruntime's CUDA
# provider links them by soname and has no RPATH to site-packages). Nothing to add on cpu.
RUN find /opt/venv -path '*/site-packages/nvidia/*/lib' -type d | sort > /etc/ld.so.conf.d/stn-nvidia.conf \
 && ldconfig

# The code, and the default model where STN_MODEL_DIR points. (COPY, not RUN --mount=from: a
# COPY layer's cache key is its content, so a code change is never served from a stale layer.)
COPY --from=builder /wheels/ /tmp/wheels/
RUN set -eu; \
    pip install -q --no-deps --no-index /tmp/wheels/*.whl; \
    rm -rf /tmp/wheels; \
    if python3 -c 'import torch' 2>/dev/null; then echo "torch must not be in the runtime image" >&2; exit 1; fi; \
    stn --help >/dev/null
COPY --from=builder --chown=stn:stn /opt/models/ /models/

# Settings: every STN_* variable of service/settings.py is read from the environment (the README
# has the settings table). The image changes only these defaults; set any of the others with -e / environment:
#   STN_DEFAULT_MODEL STN_PROVIDERS STN_MAX_BATCH_SIZE STN_MAX_QUEUE_DELAY_MS STN_MAX_QUEUE_SIZE STN_WORK_WINDOW
#   STN_REQUEST_TIMEOUT_S STN_MAX_UPLOAD_BYTES STN_MAX_IMAGE_PIXELS STN_MAX_FILES STN_MAX_OUTPUT_PIXELS
#   STN_INTRA_OP_THREADS STN_INTER_OP_THREADS STN_WORKERS STN_MALLOC_KEEP_MB STN_NATIVE_SAMPLER STN_WARMUP
#   STN_STRICT_READINESS
#   STN_ACCESS_LOG STN_API_KEYS STN_CORS_ORIGINS STN_LOG_LEVEL
#   STN_MEMORY_BUDGET_MB STN_MAX_UPLOADS STN_BODY_TIMEOUT_S STN_MAX_HEADER_BYTES STN_MAX_HEADERS
#   STN_ROOT_PATH STN_MAX_PIPELINED STN_KEEP_ALIVE_S STN_HEAD_TIMEOUT_S STN_MAX_CONNECTIONS
#   STN_SHUTDOWN_GRACE_S (on SIGTERM, `stn serve` drains for up to this long: give `docker stop -t` as much)
#   STN_MODEL_POLL_S (look at /models for new, changed and removed models every that many seconds; 0: off)
#   STN_IMAGE_FORMATS (JPEG,PNG,WEBP,BMP; add TIFF to decode it)
ENV STN_MODEL_DIR=/models \
    STN_HOST=0.0.0.0 \
    STN_PORT=8000

USER 10001:10001
WORKDIR /data
EXPOSE 8000

# Ready = every model loaded and warmed up (GET /readyz answers 200; 503 while loading or broken).
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
  CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/readyz' % os.environ.get('STN_PORT', '8000'), timeout=4)"]

STOPSIGNAL SIGTERM
ENTRYPOINT ["stn"]
CMD ["serve"]
