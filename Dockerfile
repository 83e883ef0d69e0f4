# syntax=docker/dockerfile:1
#
# torchgate's image. Three stages: `build` makes a wheel of torchgate, `deps` installs that
# wheel and its runtime dependencies into /opt/venv, `runtime` copies only the venv and the
# models: no compiler, pip cache, sources or tests end up in the image.
#
#   CPU (default):  docker build -t torchgate:0.1.0 .
#   CUDA:           docker build --build-arg VARIANT=cuda -t torchgate:0.1.0-cuda .
#
# TORCH_INDEX_URL is the package index torch is installed from. The CPU variant uses
# PyTorch's CPU-only wheel index (the default index's Linux x86_64 torch is the CUDA
# build, several GB larger). The CUDA variant takes torch from the default index (its
# wheels bundle the CUDA runtime; the node's driver comes in through the NVIDIA container
# toolkit), or from a CUDA-specific PyTorch index given the same way.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src/ src/
RUN python -m pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM ${PYTHON_IMAGE} AS deps
ARG VARIANT=cpu
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=""
ARG TORCH_CPU_INDEX_URL=https://download.pytorch.org/whl/cpu
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# torch first, from its own index, so that installing torchgate finds it satisfied and
# never pulls a second, larger build from the default index.
RUN case "$VARIANT" in \
        cpu) TORCH_INDEX_URL="${TORCH_INDEX_URL:-$TORCH_CPU_INDEX_URL}" ;; \
        cuda) ;; \
        *) echo "VARIANT must be cpu or cuda, not '$VARIANT'" >&2; exit 1 ;; \
    esac \
    && if [ -n "$TORCH_INDEX_URL" ]; then export PIP_INDEX_URL="$TORCH_INDEX_URL"; fi \
    && pip install --no-cache-dir "torch==${TORCH_VERSION}"
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/torchgate-*.whl \
    && python -c "import torch, torchgate; print('torch', torch.__version__)"

FROM ${PYTHON_IMAGE} AS runtime
ARG VARIANT=cpu
LABEL org.opencontainers.image.title="torchgate" \
      org.opencontainers.image.description="Production model server for TorchScript models" \
      org.opencontainers.image.licenses="Apache-2.0" \
      io.torchgate.variant="${VARIANT}"
# A fixed numeric uid/gid, so that Kubernetes' runAsNonRoot can verify it without a name.
RUN groupadd --system --gid 10001 torchgate \
    && useradd --system --uid 10001 --gid torchgate --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin torchgate
COPY --from=deps /opt/venv /opt/venv
# Models are owned by root and only readable by the server; mount a volume at /models to
# serve others without rebuilding.
COPY models/ /models/
# The root filesystem is read-only in Kubernetes: anything torch or Python caches goes
# under /tmp, where the pod mounts an emptyDir.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    XDG_CACHE_HOME=/tmp/.cache \
    TORCH_HOME=/tmp/torch \
    TORCHGATE_MODELS=/models \
    TORCHGATE_HOST=0.0.0.0 \
    TORCHGATE_PORT=8000
USER 10001:10001
WORKDIR /tmp
EXPOSE 8000
# No curl in a slim image: the venv's Python does the probe. urlopen raises on a non-2xx
# answer or a refused connection, which exits non-zero.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as r; r.urlopen('http://127.0.0.1:' + os.environ.get('TORCHGATE_PORT', '8000') + '/health', timeout=4)"]
CMD ["torchgate", "serve"]
