#!/usr/bin/env bash
# Builds the Dockerfile's `trainer` target with no Docker daemon and no registry: Debian's buildah (chroot
# isolation) on a Debian bookworm base made here with mmdebstrap (Debian's Python 3.11 with its headers, gcc,
# libc6-dev: Triton compiles its launcher at run time), installing exactly requirements/trainer.lock (the CUDA
# 13.0 build of torch and the NVIDIA runtime wheels from the package index or this machine's local mirror).
#   bash hack/build-trainer-image.sh       # image: ghcr.io/kubesloth/trainer:<chart appVersion> (the chart's default)
# Env: IMAGE (the tag), BASE_IMAGE (skip mmdebstrap and use this base), STORAGE_DRIVER (default vfs), KEEP_BASE=1
# (reuse a base built earlier), PIP_EXTRA_INDEX_URL (default: /opt/pypi-more and /opt/pypi where they exist; the
# lock's hashes decide what is installed, so a mirror can only serve PyPI's own files).
# tests/chart/test_trainer_image.py runs the built image (imports, CPU training, read-only root, the lock).
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
APP_VERSION=$(sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\}$/\1/p' "$REPO_ROOT/charts/kubesloth/Chart.yaml")
IMAGE="${IMAGE:-ghcr.io/kubesloth/trainer:$APP_VERSION}"
BASE_TAG="localhost/kubesloth-trainer-base:bookworm"
STORAGE_DRIVER="${STORAGE_DRIVER:-vfs}"
WORK="${WORK:-${XDG_CACHE_HOME:-$HOME/.cache}/kubesloth/trainer-image}"
HOST_CA="${HOST_CA:-/etc/ssl/certs/ca-certificates.crt}"

log() { printf '[build-trainer-image %s] %s\n' "$(date +%T)" "$*"; }
start=$(date +%s)
BUILDAH=(buildah --storage-driver "$STORAGE_DRIVER")

need=()
command -v buildah >/dev/null || need+=(buildah)
command -v mmdebstrap >/dev/null || need+=(mmdebstrap)
if ((${#need[@]})); then
  log "installing ${need[*]} from Debian"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" uidmap >/dev/null
fi

mkdir -p "$WORK"
if [[ -n "${BASE_IMAGE:-}" ]]; then
  BASE_TAG="$BASE_IMAGE"
elif [[ "${KEEP_BASE:-0}" == 1 ]] && "${BUILDAH[@]}" inspect --type image "$BASE_TAG" >/dev/null 2>&1; then
  log "reusing base $BASE_TAG"
else
  # libpython3.11-dev for Python.h only: its static libpython (20 MB) is never linked by an extension module.
  log "mmdebstrap: Debian bookworm minbase + python3, python3-venv, Python headers, gcc, libc6-dev"
  rm -f "$WORK/base.tar"
  mmdebstrap --quiet --variant=minbase \
    --include=python3,python3-venv,libpython3.11-dev,gcc,libc6-dev,ca-certificates \
    --aptopt='Acquire::Languages "none"' \
    --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/info/*' --dpkgopt='path-exclude=/usr/share/locale/*' \
    --dpkgopt='path-exclude=/usr/lib/python3.11/config-3.11-x86_64-linux-gnu/*.a' \
    --dpkgopt='path-exclude=/usr/lib/x86_64-linux-gnu/libpython3.11.a' \
    bookworm "$WORK/base.tar" http://deb.debian.org/debian
  ctr=$("${BUILDAH[@]}" from scratch)
  "${BUILDAH[@]}" add "$ctr" "$WORK/base.tar" / >/dev/null
  "${BUILDAH[@]}" config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin --cmd python3 "$ctr"
  "${BUILDAH[@]}" commit --quiet --rm "$ctr" "$BASE_TAG" >/dev/null
  rm -f "$WORK/base.tar"
fi
log "base ready: $BASE_TAG ($(( $(date +%s) - start ))s)"

args=(--build-arg "TRAINER_BASE=$BASE_TAG" --build-arg PIP_CERT=/run/host-ca.crt
      --volume "$HOST_CA:/run/host-ca.crt:ro")
if [[ -z "${PIP_EXTRA_INDEX_URL+set}" ]]; then
  PIP_EXTRA_INDEX_URL=""
  for index in /opt/pypi-more /opt/pypi; do
    [[ -d "$index/simple" ]] && PIP_EXTRA_INDEX_URL+="${PIP_EXTRA_INDEX_URL:+ }file://$index/simple"
  done
fi
if [[ -n "$PIP_EXTRA_INDEX_URL" ]]; then
  args+=(--build-arg "PIP_EXTRA_INDEX_URL=$PIP_EXTRA_INDEX_URL")
  for url in $PIP_EXTRA_INDEX_URL; do
    [[ "$url" == file://* ]] && dir=$(dirname "${url#file://}") && args+=(--volume "$dir:$dir:ro")
  done
  log "extra package indexes: $PIP_EXTRA_INDEX_URL"
fi

log "buildah bud --isolation chroot --target trainer"
"${BUILDAH[@]}" bud --isolation chroot --layers=false --target trainer "${args[@]}" \
  -f "$REPO_ROOT/Dockerfile" -t "$IMAGE" "$REPO_ROOT"
built=$(date +%s)
log "image built: $IMAGE ($(( built - start ))s)"

user=$("${BUILDAH[@]}" inspect --format '{{.OCIv1.Config.User}}' "$IMAGE")
entrypoint=$("${BUILDAH[@]}" inspect --format '{{.OCIv1.Config.Entrypoint}}' "$IMAGE")
[[ "$user" == "1000:1000" ]] || { log "image user is '$user', not non-root 1000"; exit 1; }
[[ "$entrypoint" == '[python -m kubesloth.trainer]' ]] || { log "entrypoint is $entrypoint"; exit 1; }
size=$("${BUILDAH[@]}" images --format '{{.Size}}' "$IMAGE" | head -1)
# vfs keeps full copies: drop the untagged images earlier builds left behind.
"${BUILDAH[@]}" rmi --prune >/dev/null 2>&1 || true
log "OK: $IMAGE (user $user, entrypoint $entrypoint, size $size) in $(( built - start ))s;" \
    "push: buildah push $IMAGE docker://REGISTRY/kubesloth-trainer:TAG"
