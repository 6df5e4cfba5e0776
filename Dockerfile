# Two images from one file:
#   operator: slim Python + kubesloth[operator] (kopf, kubernetes, prometheus-client; no torch)
#     docker build --target operator -t kubesloth-operator .
#   trainer:  a CUDA PyTorch devel base + kubesloth[trainer,gpu] (transformers, trl, unsloth 2026.10.9)
#     docker build --target trainer -t kubesloth-trainer .
# BASE / TRAINER_BASE swap the base images (a mirror, a digest, or a local Debian base as
# hack/build-operator-image.sh does without a Docker daemon). Both images run as a non-root numeric user so the
# chart's runAsNonRoot holds without a name lookup.

ARG BASE=docker.io/library/python:3.11.14-slim-bookworm
# The stack the GPU benchmarks ran on (torch 2.11 + CUDA 13.0, triton 3.6); unsloth 2026.10.9 allows torch
# >=2.4,<2.15 and transformers needs >=2.5, so any CUDA 12/13 devel tag in that range works. Its torch is kept.
ARG TRAINER_BASE=docker.io/pytorch/pytorch:2.11.0-cuda13.0-cudnn9-devel

# ---------------------------------------------------------------------------------------------------------------
# Operator: install into a virtualenv in a build stage, copy only the virtualenv into the final stage.
FROM ${BASE} AS operator-build
# A build behind a TLS-intercepting proxy passes its CA bundle (mounted read-only) by path; unset elsewhere.
ARG PIP_CERT
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python3 -m venv /opt/kubesloth
WORKDIR /src
# Only what the package needs: .dockerignore keeps tests, charts, caches and the venv out of the context.
COPY pyproject.toml README.md ./
COPY api ./api
COPY kubesloth ./kubesloth
COPY operator ./operator
COPY planner ./planner
COPY trainer ./trainer
# Install from /, not /src: a cwd holding `operator/` would shadow the standard library's `operator` module.
WORKDIR /
# Then fail if anything pulled torch in, and drop pip/setuptools: the running operator installs nothing.
RUN /opt/kubesloth/bin/pip install --no-cache-dir "/src[operator]" \
    && /opt/kubesloth/bin/python -c "import importlib.util as u, sys; sys.exit(u.find_spec('torch') is not None)" \
    && /opt/kubesloth/bin/python -m pip uninstall --yes --quiet pip setuptools

FROM ${BASE} AS operator
COPY --from=operator-build /opt/kubesloth /opt/kubesloth
ENV PATH=/opt/kubesloth/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp
# 65532: the conventional "nonroot" uid; no passwd entry is needed for a numeric USER.
USER 65532:65532
# kopf's liveness endpoint and the operator's Prometheus metrics.
EXPOSE 8080 9090
ENTRYPOINT ["kubesloth", "operator"]

# ---------------------------------------------------------------------------------------------------------------
# Trainer: the CUDA PyTorch image already holds torch, CUDA and a compiler toolchain (Triton/inductor need it).
FROM ${TRAINER_BASE} AS trainer
ARG PIP_CERT
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY api ./api
COPY kubesloth ./kubesloth
COPY operator ./operator
COPY planner ./planner
COPY trainer ./trainer
# Compile caches (Unsloth's generated kernels, inductor, Triton) and the Hugging Face cache live under one
# directory the pod mounts a volume at, so a restarted pod starts warm; the operator may point them elsewhere.
ENV KUBESLOTH_CACHE_DIR=/var/cache/kubesloth \
    UNSLOTH_COMPILE_LOCATION=/var/cache/kubesloth/unsloth_compiled_cache \
    TORCHINDUCTOR_CACHE_DIR=/var/cache/kubesloth/torchinductor \
    TRITON_CACHE_DIR=/var/cache/kubesloth/triton \
    HF_HOME=/var/cache/kubesloth/huggingface \
    HOME=/tmp
WORKDIR /
# Unsloth's declared dependencies pull xformers, diffusers, torchao, ... and, through them, possibly another torch.
# Full fine-tuning needs none of those (seen on the H200: ../shared/docs/unsloth-on-h200.md). So, in one layer:
#  1. the trainer extra and what Unsloth imports (peft, cut_cross_entropy) with their dependencies, under a
#     constraint that keeps the base image's own CUDA torch/triton;
#  2. the gpu extra (unsloth, unsloth_zoo, bitsandbytes, nvidia-ml-py; pins read from pyproject.toml) without
#     dependencies;
#  3. `import unsloth` proves the set is complete (without a GPU it falls back to CPU instead of failing; checked
#     on a CPU machine with torch 2.13: this exact set imports);
#  4. the sources, and whatever the import check left in the caches, go.
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN python -m pip freeze | grep -E '^(torch|torchvision|torchaudio|triton)==' > /tmp/keep-base.txt \
    && python -m pip install --no-cache-dir --constraint /tmp/keep-base.txt "/src[trainer]" \
        "peft==0.21.2" "cut_cross_entropy==25.1.1" \
    && python -c "import tomllib; print(*tomllib.load(open('/src/pyproject.toml', 'rb'))['project']['optional-dependencies']['gpu'], sep='\n')" > /tmp/gpu.txt \
    && python -m pip install --no-cache-dir --no-deps --requirement /tmp/gpu.txt \
    && python -c "import unsloth, kubesloth.trainer" \
    && rm -rf /src /tmp/keep-base.txt /tmp/gpu.txt /var/cache/kubesloth
RUN mkdir -p /var/cache/kubesloth/unsloth_compiled_cache /var/cache/kubesloth/torchinductor \
        /var/cache/kubesloth/triton /var/cache/kubesloth/huggingface \
    && chown -R 1000:1000 /var/cache/kubesloth
VOLUME ["/var/cache/kubesloth"]
USER 1000:1000
EXPOSE 9400
ENTRYPOINT ["python", "-m", "kubesloth.trainer"]
