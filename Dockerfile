# Training image: CUDA 13 runtime, the project with its pinned dependencies (PyTorch, DALI, DeepSpeed),
# a non-root user, and an entrypoint that runs torchrun (launch/entrypoint.sh -> launch/torchrun.sh).
#   docker build -t contrastive-pipeline:0.1.0 .
#   docker run --gpus all --shm-size=16g -v /data:/data contrastive-pipeline:0.1.0 \
#       --config configs/cifar10_simclr.yaml data.train_shards=/data/shards run.output_dir=/data/runs/simclr
# PyTorch wheels carry their own CUDA libraries; the base image supplies the CUDA 13 user-space driver
# compatibility that nvidia-dali-cuda130 needs. DeepSpeed is installed without pre-built ops (DS_BUILD_OPS=0):
# the engine uses PyTorch optimizers, so no op is compiled at run time.
FROM nvidia/cuda:13.0.1-runtime-ubuntu24.04

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# procps: launch/torchrun.sh hands SIGTERM to the trainer processes with pkill -P
# build-essential + python3-dev: train.compile=true; Triton compiles its kernel launcher with the system C
# compiler against Python.h on first use, and the runtime base image has neither
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev build-essential \
        procps ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv \
    && groupadd --gid 10001 trainer \
    && useradd --uid 10001 --gid 10001 --create-home --shell /bin/bash trainer

WORKDIR /app

# torch first and on its own layer: DeepSpeed's setup imports it (hence --no-build-isolation below),
# and the dependency layers stay cached while the source changes
RUN pip install --no-cache-dir --extra-index-url "${TORCH_INDEX_URL}" torch==2.14.1 torchvision==0.29.1

COPY pyproject.toml README.md ./
COPY pipeline ./pipeline
COPY data_prep ./data_prep
COPY launch ./launch
COPY bench ./bench
COPY configs ./configs
RUN DS_BUILD_OPS=0 pip install --no-cache-dir --no-build-isolation --extra-index-url "${TORCH_INDEX_URL}" './[gpu]' \
    && chmod 0755 launch/entrypoint.sh launch/torchrun.sh

# numeric, so Kubernetes can check runAsNonRoot; W&B and caches write under its home
USER 10001:10001
ENV HOME=/home/trainer
EXPOSE 29400

ENTRYPOINT ["/app/launch/entrypoint.sh"]
CMD ["--help"]
