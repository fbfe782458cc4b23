#!/usr/bin/env bash
# Builds the e2e test cluster from Go modules and caches it by version:
#   kube-apiserver, kube-controller-manager, kubectl  (k8s.io/kubernetes@$K8S_VERSION, with every
#   staging module k8s.io/* replaced by its matching v0.x.y release)
#   etcd                                             (tests/e2e/cluster/etcd: embeds go.etcd.io/etcd/server/v3)
# into ${AURORA_HOME:-~/.cache/aurora}/e2e/<k8s-version>/bin and prints that folder.
# A cached build returns at once; nothing is downloaded but Go modules.
# Usage: tests/e2e/cluster/build.sh [--print-bin]
set -euo pipefail

K8S_VERSION=${AURORA_E2E_K8S_VERSION:-v1.37.2}
# The etcd release k8s.io/kubernetes itself requires, so the build shares one dependency graph.
ETCD_VERSION=${AURORA_E2E_ETCD_VERSION:-v3.7.0}
here=$(cd "$(dirname "$0")" && pwd)
home=${AURORA_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/aurora}
dest=$home/e2e/$K8S_VERSION
bin=$dest/bin
binaries=(kube-apiserver kube-controller-manager kubectl etcd)

command -v go >/dev/null || { echo "build.sh: go is not on PATH (install Go >= 1.26)" >&2; exit 3; }
# What the cached binaries were built from: the versions and the etcd program.
stamp=$K8S_VERSION-$ETCD_VERSION-$(go env GOVERSION)-$(sha256sum <"$here/etcd/main.go" | cut -c1-16)
if [[ -f $bin/.stamp && $(cat "$bin/.stamp") == "$stamp" ]]; then
  echo "$bin"; exit 0
fi
mkdir -p "$dest"
exec 9>"$dest/.lock"
flock 9  # another session building the same version: wait for it, then use its binaries
if [[ -f $bin/.stamp && $(cat "$bin/.stamp") == "$stamp" ]]; then
  echo "$bin"; exit 0
fi

staging=v0.${K8S_VERSION#v1.}
src=$dest/src
rm -rf "$src" && mkdir -p "$src/etcd" "$bin"
cp "$here/etcd/main.go" "$src/etcd/main.go"
export GOFLAGS=-mod=mod GOTOOLCHAIN=local CGO_ENABLED=0
cd "$src"
start=$(date +%s)
echo "== building k8s.io/kubernetes@$K8S_VERSION (staging $staging) and etcd $ETCD_VERSION in $src" >&2
go mod init aurora.local/e2e-cluster >/dev/null 2>&1
# The staging modules: the ones k8s.io/kubernetes replaces with ./staging/src/... in its own
# go.mod (ignored in a dependency), each pinned here to the release published with it.
kmod=$(go mod download -json "k8s.io/kubernetes@$K8S_VERSION" | sed -n 's/^\t"GoMod": "\(.*\)",$/\1/p')
mapfile -t modules < <(sed -n 's#^\t\(k8s\.io/[a-z0-9-]*\) => \./staging/src/.*#\1#p' "$kmod")
(( ${#modules[@]} > 10 )) || { echo "build.sh: found no staging modules in $kmod" >&2; exit 1; }
for module in "${modules[@]}"; do go mod edit -replace "$module=$module@$staging"; done
go get "k8s.io/kubernetes@$K8S_VERSION" "go.etcd.io/etcd/server/v3@$ETCD_VERSION" >&2
pkg=k8s.io/component-base/version cli=k8s.io/client-go/pkg/version
major=1 minor=${K8S_VERSION#v1.}; minor=${minor%%.*}
flags="-s -w"
for p in $pkg $cli; do
  flags+=" -X $p.gitVersion=$K8S_VERSION -X $p.gitMajor=$major -X $p.gitMinor=$minor"
  flags+=" -X $p.gitTreeState=clean -X $p.buildDate=1970-01-01T00:00:00Z"
done
go build -trimpath -ldflags "$flags" -o "$bin/" \
  k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager \
  k8s.io/kubernetes/cmd/kubectl ./etcd >&2
for b in "${binaries[@]}"; do test -x "$bin/$b" || { echo "build.sh: $bin/$b missing" >&2; exit 1; }; done
echo "$stamp" >"$bin/.stamp"
echo "== built in $(( $(date +%s) - start ))s" >&2
echo "$bin"
