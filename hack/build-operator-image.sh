#!/usr/bin/env bash
# Builds the Dockerfile's `operator` target with no Docker daemon and no registry: Debian's buildah (chroot
# isolation) on a Debian bookworm base made here with mmdebstrap, then checks the operator starts inside the image.
#   bash hack/build-operator-image.sh            # image: localhost/kubesloth-operator:dev
# Env: IMAGE (the tag), BASE_IMAGE (skip mmdebstrap and use this base), STORAGE_DRIVER (default vfs: works in any
# container or VM; overlay is faster where the kernel allows it), KEEP_BASE=1 (reuse a base built earlier).
# Why: only PyPI and Debian are reachable here, so `docker build` with the default python:slim base cannot run.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
IMAGE="${IMAGE:-localhost/kubesloth-operator:dev}"
BASE_TAG="localhost/kubesloth-base:bookworm"
STORAGE_DRIVER="${STORAGE_DRIVER:-vfs}"
WORK="${WORK:-${XDG_CACHE_HOME:-$HOME/.cache}/kubesloth/operator-image}"
# The host's CA bundle: pip inside the build trusts what the host trusts (a TLS-intercepting proxy's CA included).
HOST_CA="${HOST_CA:-/etc/ssl/certs/ca-certificates.crt}"

log() { printf '[build-operator-image %s] %s\n' "$(date +%T)" "$*"; }
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
  log "mmdebstrap: Debian bookworm minbase + python3 (the stand-in for python:3.11-slim-bookworm)"
  rm -f "$WORK/base.tar"
  mmdebstrap --quiet --variant=minbase --include=python3,python3-venv,ca-certificates \
    --aptopt='Acquire::Languages "none"' \
    --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' \
    bookworm "$WORK/base.tar" http://deb.debian.org/debian
  ctr=$("${BUILDAH[@]}" from scratch)
  "${BUILDAH[@]}" add "$ctr" "$WORK/base.tar" / >/dev/null
  "${BUILDAH[@]}" config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin --cmd python3 "$ctr"
  "${BUILDAH[@]}" commit --quiet --rm "$ctr" "$BASE_TAG" >/dev/null
  rm -f "$WORK/base.tar"
fi
log "base ready: $BASE_TAG ($(( $(date +%s) - start ))s)"

log "buildah bud --isolation chroot --target operator"
"${BUILDAH[@]}" bud --isolation chroot --layers=false --target operator \
  --build-arg "BASE=$BASE_TAG" --build-arg PIP_CERT=/run/host-ca.crt \
  --volume "$HOST_CA:/run/host-ca.crt:ro" \
  -f "$REPO_ROOT/Dockerfile" -t "$IMAGE" "$REPO_ROOT"
log "image built: $IMAGE ($(( $(date +%s) - start ))s)"

# The image's own entry point, as the image's user: the chart's kopf options are accepted, the operator's modules
# import (handlers included), and torch is absent.
ctr=$("${BUILDAH[@]}" from "$IMAGE")
trap '"${BUILDAH[@]}" rm "$ctr" >/dev/null 2>&1 || true' EXIT
"${BUILDAH[@]}" run --isolation chroot "$ctr" -- kubesloth operator -- --help >"$WORK/help.txt"
for option in --liveness --namespace --all-namespaces --standalone; do
  grep -q -- "$option" "$WORK/help.txt" || { cat "$WORK/help.txt"; log "operator --help lacks $option"; exit 1; }
done
"${BUILDAH[@]}" run --isolation chroot "$ctr" -- python3 -c \
  "import importlib.util as u, kopf, kubesloth.operator.handlers; assert u.find_spec('torch') is None, 'torch in operator image'"
# Python runs on jemalloc (the loader only warns when LD_PRELOAD names a library it cannot find).
"${BUILDAH[@]}" run --isolation chroot "$ctr" -- python3 -c \
  "import ctypes, sys; sys.exit(0 if getattr(ctypes.CDLL(None), 'mallctl', None) else 'jemalloc is not loaded')"
user=$("${BUILDAH[@]}" inspect --format '{{.OCIv1.Config.User}}' "$IMAGE")
entrypoint=$("${BUILDAH[@]}" inspect --format '{{.OCIv1.Config.Entrypoint}}' "$IMAGE")
[[ "$user" == "65532:65532" ]] || { log "image user is '$user', not non-root 65532"; exit 1; }
[[ "$entrypoint" == '[kubesloth operator]' ]] || { log "entrypoint is $entrypoint"; exit 1; }
size=$("${BUILDAH[@]}" images --format '{{.Size}}' "$IMAGE" | head -1)
# vfs keeps full copies: drop the untagged images earlier builds left behind.
"${BUILDAH[@]}" rmi --prune >/dev/null 2>&1 || true
log "OK: $IMAGE (user $user, entrypoint $entrypoint, size $size) in $(( $(date +%s) - start ))s"
