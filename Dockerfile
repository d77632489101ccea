# litlab on a CUDA PyTorch runtime image. The image's torch satisfies litlab's `torch>=2.3`, so pip
# installs no second torch.
#   docker build -t litlab .
#   docker run --gpus all -v "$PWD/mlruns:/opt/litlab/mlruns" litlab \
#       run experiments/mlp/mlp_digits.yaml trainer.accelerator=gpu trainer.precision=bf16-mixed
ARG BASE_IMAGE=pytorch/pytorch:2.9.1-cuda12.8-cudnn9-runtime
FROM ${BASE_IMAGE}

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN apt-get update && apt-get install -y --no-install-recommends git \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/litlab
COPY pyproject.toml README.md ./
COPY platform ./platform
RUN pip install .
COPY experiments ./experiments
COPY sweeps ./sweeps

# The tracking store (mlruns/mlflow.db, artifacts, checkpoints) lives here: mount it to keep runs.
VOLUME ["/opt/litlab/mlruns"]
EXPOSE 5000
ENTRYPOINT ["litlab"]
CMD ["--help"]
