#!/usr/bin/env bash
# Builds the packaging tools the e2e tests validate the install with, from the Go module
# proxy, and caches them by version:
#   helm        (helm.sh/helm/v3)              renders charts/aurora (`helm template`)
#   kubeconform (github.com/yannh/kubeconform) validates rendered objects against schemas
#   crds/monitoring.coreos.com_servicemonitors.yaml  (the Prometheus Operator's CRD, from
#               its Go module, so the e2e API server publishes the ServiceMonitor schema)
# into ${AURORA_HOME:-~/.cache/aurora}/tools/<versions>/bin (crds/ beside it) and prints bin.
# A cached build returns at once; nothing is downloaded but Go modules.
set -euo pipefail

HELM_VERSION=${AURORA_HELM_VERSION:-v3.22.0}
KUBECONFORM_VERSION=${AURORA_KUBECONFORM_VERSION:-v0.8.0}
PROMETHEUS_OPERATOR_VERSION=${AURORA_PROMETHEUS_OPERATOR_VERSION:-v0.85.0}
home=${AURORA_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/aurora}

command -v go >/dev/null || { echo "tools/build.sh: go is not on PATH (install Go >= 1.26)" >&2; exit 3; }
stamp=helm-$HELM_VERSION-kubeconform-$KUBECONFORM_VERSION-po-$PROMETHEUS_OPERATOR_VERSION-$(go env GOVERSION)
bin=$home/tools/$stamp/bin
if [[ -x $bin/helm && -x $bin/kubeconform && -f $bin/.stamp ]]; then
  echo "$bin"; exit 0
fi
mkdir -p "$bin"
exec 9>"$bin/../.lock"
flock 9
if [[ -x $bin/helm && -x $bin/kubeconform && -f $bin/.stamp ]]; then
  echo "$bin"; exit 0
fi
export GOBIN=$bin GOTOOLCHAIN=local CGO_ENABLED=0 GOFLAGS=-buildvcs=false
start=$(date +%s)
echo "== building helm $HELM_VERSION and kubeconform $KUBECONFORM_VERSION into $bin" >&2
go install -trimpath -ldflags "-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION" \
  "helm.sh/helm/v3/cmd/helm@$HELM_VERSION" >&2
go install -trimpath -ldflags "-s -w" \
  "github.com/yannh/kubeconform/cmd/kubeconform@$KUBECONFORM_VERSION" >&2
for b in helm kubeconform; do test -x "$bin/$b" || { echo "tools/build.sh: $bin/$b missing" >&2; exit 1; }; done
module=github.com/prometheus-operator/prometheus-operator@$PROMETHEUS_OPERATOR_VERSION
dir=$(go mod download -json "$module" | sed -n 's/^\t"Dir": "\(.*\)",$/\1/p')
mkdir -p "$bin/../crds"
cp "$dir/example/prometheus-operator-crd/monitoring.coreos.com_servicemonitors.yaml" "$bin/../crds/"
echo "$stamp" >"$bin/.stamp"
echo "== built in $(( $(date +%s) - start ))s" >&2
echo "$bin"
