#!/usr/bin/env bash
# Builds kube-apiserver, kube-controller-manager and kube-scheduler v1.20.2 from Debian bookworm's own source package, and unpacks
# Debian's etcd, into a cache outside the clone keyed by version. A machine that already has the cache skips it all.
# Why this way: no cluster, no Docker and no GitHub downloads are possible here; Debian's archive is reachable.
# Facts and pitfalls: ../shared/docs/test-control-plane.md.
set -euo pipefail
HACK_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

KUBE_VERSION=v1.20.2
DEB_SRC_VERSION=1.20.5+really1.20.2-1.1+deb12u1
ETCD_DEB=etcd-server
CACHE_ROOT="${KUBESLOTH_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kubesloth}"
OUT="$CACHE_ROOT/control-plane-$KUBE_VERSION"

if [[ -x "$OUT/bin/kube-apiserver" && -x "$OUT/bin/kube-controller-manager" && -x "$OUT/bin/kube-scheduler" &&
      -x "$OUT/bin/etcd" ]]; then
  echo "control plane binaries cached in $OUT/bin"
  exit 0
fi

WORK="$CACHE_ROOT/build-$KUBE_VERSION"
rm -rf "$WORK"
mkdir -p "$WORK"/{debs,root,gopath/src/k8s.io} "$OUT/bin"
cd "$WORK"

log() { printf '[build-control-plane %s] %s\n' "$(date +%T)" "$*"; }

# A private apt state: the system's sources and lists stay untouched.
# shellcheck source=hack/lib/private-apt.sh
source "$HACK_DIR/lib/private-apt.sh"
log "apt-get update (private lists)"
private_apt "$WORK/apt" "deb deb-src"

log "downloading the toolchain and etcd debs"
(cd debs && apt-get "${APT_OPTS[@]}" download golang-1.19-go golang-1.19-src rsync libpopt0 \
    golang-github-modern-go-reflect2-dev golang-github-json-iterator-go-dev "$ETCD_DEB" >/dev/null)
for deb in debs/*.deb; do dpkg -x "$deb" root; done

log "downloading the kubernetes source package $DEB_SRC_VERSION"
mkdir -p src && (cd src && apt-get "${APT_OPTS[@]}" source --download-only "kubernetes=$DEB_SRC_VERSION" >/dev/null)
orig=$(ls src/kubernetes_*.orig.tar.* | head -n1)
mkdir -p tree && tar -xf "$orig" -C tree --strip-components=1

# Go 1.19 crashes in the vendored reflect2 1.0.1 (SIGSEGV when a custom resource is created): use Debian's.
rm -rf tree/vendor/github.com/modern-go/reflect2 tree/vendor/github.com/json-iterator/go
cp -r root/usr/share/gocode/src/github.com/modern-go/reflect2 tree/vendor/github.com/modern-go/reflect2
cp -r root/usr/share/gocode/src/github.com/json-iterator/go tree/vendor/github.com/json-iterator/go

export GOROOT="$WORK/root/usr/lib/go-1.19"
export PATH="$GOROOT/bin:$WORK/root/usr/bin:$PATH"
export LD_LIBRARY_PATH="$WORK/root/usr/lib/x86_64-linux-gnu:$WORK/root/lib/x86_64-linux-gnu:${LD_LIBRARY_PATH:-}"
export GOPATH="$WORK/gopath" GO111MODULE=off CGO_ENABLED=0 GOFLAGS= GOCACHE="$WORK/gocache"
ln -s "$WORK/tree" "$GOPATH/src/k8s.io/kubernetes"
cd "$GOPATH/src/k8s.io/kubernetes"

log "make generated_files"
make generated_files >"$WORK/generated.log" 2>&1 || { tail -50 "$WORK/generated.log"; exit 1; }

stamp=""
for pkg in k8s.io/kubernetes/vendor/k8s.io/component-base/version k8s.io/kubernetes/vendor/k8s.io/client-go/pkg/version; do
  stamp+=" -X $pkg.gitVersion=$KUBE_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=20 -X $pkg.gitTreeState=clean"
done
for cmd in kube-apiserver kube-controller-manager kube-scheduler; do
  log "go build $cmd"
  go build -ldflags "-s -w$stamp" -o "$OUT/bin/$cmd" "./cmd/$cmd"
done
cp "$WORK/root/usr/bin/etcd" "$OUT/bin/etcd"

cd /
rm -rf "$WORK"
log "done: $(ls "$OUT/bin" | tr '\n' ' ') in $OUT/bin"
