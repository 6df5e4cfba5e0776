# Two images from one file:
#   operator: slim Python + kubesloth[operator] (kopf, kubernetes, prometheus-client; no torch)
#     docker build --target operator -t kubesloth-operator .
#   trainer:  Python 3.11 + gcc + exactly requirements/trainer.lock (CUDA 13.0 torch from PyPI with the NVIDIA
#             runtime wheels, transformers, trl, unsloth 2026.10.9) + kubesloth
#     docker build --target trainer -t kubesloth-trainer .
# BASE / TRAINER_BASE swap the base images (a mirror, a digest, or a local Debian base as hack/build-*-image.sh do
# without a Docker daemon). Both images run as a non-root numeric user so the chart's runAsNonRoot holds without a
# name lookup.

ARG BASE=docker.io/library/python:3.11.14-slim-bookworm
# The trainer's base: any Debian-family Python 3.11 with its headers (torch, CUDA and everything else come from
# requirements/trainer.lock).
ARG TRAINER_BASE=docker.io/library/python:3.11.14-slim-bookworm

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
# Python on jemalloc, every object in it (PYTHONMALLOC=malloc): after a burst of thousands of FineTuneJobs comes
# and goes, CPython's own allocator keeps each 1 MiB arena that a few survivors hold, and glibc the fragments of its
# heaps. One arena and no thread caches (the GIL serialises allocation anyway) leave freed runs in one place for
# jemalloc to return. Operator RSS after deleting 1000 FineTuneJobs, over idle: +26.5 % with CPython's allocator,
# +14.9 % glibc's, +10.3 % jemalloc's defaults, +2.5–2.7 % this (docs/benchmarks.md, Scale). LD_PRELOAD by soname:
# the loader finds it in its own multiarch directory. The base's Debian suite decides jemalloc's version.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends libjemalloc2 \
    && rm -rf /var/lib/apt/lists/*
COPY --from=operator-build /opt/kubesloth /opt/kubesloth
ENV PATH=/opt/kubesloth/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    LD_PRELOAD=libjemalloc.so.2 \
    PYTHONMALLOC=malloc \
    MALLOC_CONF=background_thread:true,narenas:1,tcache:false
# 65532: the conventional "nonroot" uid; no passwd entry is needed for a numeric USER.
USER 65532:65532
# kopf's liveness endpoint and the operator's Prometheus metrics.
EXPOSE 8080 9090
ENTRYPOINT ["kubesloth", "operator"]

# ---------------------------------------------------------------------------------------------------------------
# Trainer: no CUDA base image. The CUDA user-space libraries come as PyPI wheels with torch (nvidia-*, pinned in
# requirements/trainer.lock); the driver (libcuda) comes from the node (the NVIDIA container toolkit mounts it).
# The base needs Python 3.11 with its headers and a C compiler: Triton compiles its CUDA launcher (a Python
# extension) with gcc at run time, so gcc + libc6-dev + Python.h are the only toolchain kept. hack/build-trainer-
# image.sh passes a Debian bookworm base with python3-dev + gcc made by mmdebstrap; the default (python:slim, which
# has the headers) gets gcc from Debian here.
FROM ${TRAINER_BASE} AS trainer
ARG PIP_CERT
# Extra package indexes holding the same files as PyPI (a local mirror); the lock's hashes decide what is installed.
ARG PIP_EXTRA_INDEX_URL
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# The base's own Debian suite decides the compiler's version (pinning a point release breaks on the next one).
# hadolint ignore=DL3008
RUN if ! command -v gcc >/dev/null || [ ! -e /usr/include/stdio.h ]; then \
        apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && python3 -c "import os, sysconfig; h = sysconfig.get_paths()['include'] + '/Python.h'; \
assert os.path.exists(h), 'TRAINER_BASE lacks ' + h + ' (python3-dev): Triton compiles its launcher against it'"
COPY requirements/trainer.lock /tmp/trainer.lock
WORKDIR /src
COPY pyproject.toml README.md ./
COPY api ./api
COPY kubesloth ./kubesloth
COPY operator ./operator
COPY planner ./planner
COPY trainer ./trainer
# Compile caches (Unsloth's generated kernels, inductor, Triton) and the Hugging Face cache live under the one
# directory the pod mounts a volume at (api/contract.py CACHE_DIR; the operator sets the same, operator/builders.py
# CACHE_ENV), so a restarted pod starts warm and nothing writes into the image (the pod's root is read-only).
ENV PATH=/opt/kubesloth/bin:$PATH \
    KUBESLOTH_CACHE_DIR=/var/cache/kubesloth \
    UNSLOTH_COMPILE_LOCATION=/var/cache/kubesloth/unsloth_compiled_cache \
    TORCHINDUCTOR_CACHE_DIR=/var/cache/kubesloth/torchinductor \
    TRITON_CACHE_DIR=/var/cache/kubesloth/triton \
    HF_HOME=/var/cache/kubesloth/huggingface \
    XDG_CACHE_HOME=/var/cache/kubesloth/xdg \
    MPLCONFIGDIR=/tmp/matplotlib \
    HOME=/tmp
WORKDIR /
# In one layer (install from /, not /src: a cwd holding `operator/` would shadow the standard library's module):
#  1. exactly the lock: every package pinned and hashed, no resolver (--no-deps), so what Unsloth declares but full
#     fine-tuning never uses (torchvision, xformers, diffusers, torchao: requirements/trainer.in) stays out;
#  2. kubesloth itself, without dependencies (they are all in the lock) and with the lock's setuptools;
#  3. Unsloth Studio (the wheel's top-level studio/: a web UI, 26 MB; `import unsloth` never touches it) goes;
#  4. `import unsloth` and the trainer import (without a GPU Unsloth falls back to CPU), then pip (the image
#     installs nothing at run time), the sources and what the import wrote to the caches go.
RUN python3 -m venv /opt/kubesloth \
    && pip install --no-deps --require-hashes --only-binary=:all: --requirement /tmp/trainer.lock \
    && pip install --no-deps --no-build-isolation /src \
    && site=$(python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])") \
    && rm -rf "$site/studio" \
    && python -c "import unsloth, kubesloth.trainer" \
    && python -m pip uninstall --yes --quiet pip \
    && rm -rf /src /tmp/trainer.lock /tmp/* /var/cache/kubesloth \
    && mkdir -p /var/cache/kubesloth \
    && chown 1000:1000 /var/cache/kubesloth
VOLUME ["/var/cache/kubesloth"]
USER 1000:1000
EXPOSE 9400
ENTRYPOINT ["python", "-m", "kubesloth.trainer"]
