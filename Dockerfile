# tuneserve image for GPU hosts: the API (with its inference engine) and training workers run
# from this one image; docker-compose.yml picks the command. Build: `docker compose build`.
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH

RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev build-essential ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/venv

# The CUDA build of torch first (the project's `torch>=2.6,<3` then accepts it as is).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
ARG TORCH_SPEC=torch
RUN pip install --index-url "$TORCH_INDEX_URL" "$TORCH_SPEC"

# Dependencies in their own layer (rebuilt only when pyproject.toml changes), then the code.
WORKDIR /app
COPY pyproject.toml README.md ./
RUN mkdir -p service workers \
 && touch service/__init__.py workers/__init__.py \
 && pip install . \
 && pip uninstall -y tuneserve
COPY service ./service
COPY workers ./workers
RUN pip install --no-deps -e .

# Unprivileged user; /data (files, SQLite fallback, checkpoints), /registry (adapters) and the
# Hugging Face cache are volumes in docker-compose.yml.
RUN useradd --create-home --uid 10001 tuneserve \
 && mkdir -p /data /registry /cache/huggingface \
 && chown -R tuneserve:tuneserve /data /registry /cache
USER tuneserve
ENV TUNESERVE_DATA_DIR=/data \
    TUNESERVE_REGISTRY_DIR=/registry \
    HF_HOME=/cache/huggingface

EXPOSE 8000
# Binding 0.0.0.0 requires TUNESERVE_API_KEYS (Settings refuses to start otherwise).
CMD ["tuneserve", "api", "--host", "0.0.0.0", "--port", "8000"]
