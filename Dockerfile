# medrl for GPU nodes: CUDA 12.8 runtime, Python 3.11, medrl with the CUDA build of vLLM and the W&B / MLflow
# trackers. Use it as the image of every Ray node (KubeRay, `ray up`), or as a job's `image_uri` runtime env
# (docs/ray_jobs.md). Models, runs and the judge store stay outside the image (shared storage, PostgreSQL).
#
#   docker build -t medrl:0.1.0 .
#   docker run --gpus all --rm -v /mnt/shared:/mnt/shared medrl:0.1.0 medrl pipeline \
#       --config configs/qwen3_1p7b_24gb.yaml run.root=/mnt/shared/runs model.path=/mnt/shared/models/Qwen3-1.7B
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu22.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    HF_HUB_OFFLINE=1 \
    TOKENIZERS_PARALLELISM=false \
    MPLBACKEND=Agg

# Python 3.11 (medrl needs 3.10-3.12); build-essential: Triton and DeepSpeed compile kernels at run time
RUN apt-get update \
    && apt-get install -y --no-install-recommends software-properties-common \
    && add-apt-repository -y ppa:deadsnakes/ppa \
    && apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv python3.11-dev build-essential git \
    && rm -rf /var/lib/apt/lists/*

RUN python3.11 -m venv /opt/medrl
ENV PATH=/opt/medrl/bin:$PATH

WORKDIR /opt/medrl/src
# configs/, ray_jobs/ and data/samples/ come along: `--config configs/...` works from the working directory
COPY pyproject.toml README.md ./
COPY medrl ./medrl
COPY configs ./configs
COPY ray_jobs ./ray_jobs
COPY data ./data
RUN pip install --upgrade pip \
    && pip install '.[vllm,track]' \
    && python -c "import medrl.cli, ray, torch, vllm, wandb, mlflow; print('ray', ray.__version__, 'torch', torch.__version__)"

# a non-root user; Ray's and medrl's caches in its home
RUN useradd --create-home --uid 1000 medrl && chown -R medrl /opt/medrl/src
USER medrl
CMD ["medrl", "--help"]
