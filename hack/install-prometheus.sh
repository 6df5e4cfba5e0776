#!/usr/bin/env bash
# Unpacks Debian's prometheus (server + promtool, 2.42) into a cache outside the clone and prints its bin dir.
# `apt-get download` + `dpkg -x` with a private apt state: no service is started, nothing system-wide changes,
# no root needed. A machine that already has the cache skips it all (idempotent). Used by tests/observability/.
set -euo pipefail

PROM_DEB_VERSION=2.42.0+ds-5+deb12u1
CACHE_ROOT="${KUBESLOTH_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kubesloth}"
OUT="$CACHE_ROOT/prometheus-${PROM_DEB_VERSION%%+*}"

if [[ -x "$OUT/bin/prometheus" && -x "$OUT/bin/promtool" ]]; then
  echo "$OUT/bin"
  exit 0
fi

mkdir -p "$CACHE_ROOT"
WORK="$(mktemp -d "$CACHE_ROOT/prometheus-build.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WORK"/{debs,root}
log() { printf '[install-prometheus %s] %s\n' "$(date +%T)" "$*" >&2; }

# shellcheck source=hack/lib/private-apt.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/private-apt.sh"
log "apt-get update (private lists)"
private_apt "$WORK/apt"

log "downloading prometheus=$PROM_DEB_VERSION"
(cd "$WORK/debs" && apt-get "${APT_OPTS[@]}" download "prometheus=$PROM_DEB_VERSION" >/dev/null)
dpkg -x "$WORK"/debs/prometheus_*.deb "$WORK/root"

# Both are static Go binaries: copying them is the whole install. Move into place atomically-ish.
mkdir -p "$OUT.tmp/bin"
cp "$WORK/root/usr/bin/prometheus" "$WORK/root/usr/bin/promtool" "$OUT.tmp/bin/"
rm -rf "$OUT" && mv "$OUT.tmp" "$OUT"
"$OUT/bin/promtool" --version >&2
echo "$OUT/bin"
