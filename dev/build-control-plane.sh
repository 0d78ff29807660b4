#!/usr/bin/env bash
# Builds kube-apiserver, kube-controller-manager, kubectl and etcd from the Go module proxy and
# caches them outside the clone, keyed by version, so that later runs rebuild nothing.
#
# Usage: dev/build-control-plane.sh        prints the folder that contains the four binaries
#
# Environment:
#   ACRPULL_CONTROL_PLANE_CACHE  cache folder (default: $HOME/.cache/acrpull/control-plane)
#   KUBERNETES_VERSION           k8s.io/kubernetes release (default below)
#   ETCD_VERSION                 go.etcd.io/etcd/server/v3 release (default below)
#
# Why a consuming module: k8s.io/kubernetes requires every k8s.io/* staging module at v0.0.0 and
# replaces it with a local folder, so `go install k8s.io/kubernetes/cmd/...@version` is refused.
# A small module that requires k8s.io/kubernetes and pins each staging module to the matching
# v0.x release builds the same commands. etcd's server module has replace lines too, so it is
# built the same way.
#
# Versions: Kubernetes 1.37 is the newest release that k8s-openapi 0.29 supports, and it moved to
# etcd 3.7. Debian's etcd 3.4 cannot serve watches with sendInitialEvents=true (streaming lists),
# so it is no fallback.
set -euo pipefail

kubernetes_version=${KUBERNETES_VERSION:-v1.37.2}
etcd_version=${ETCD_VERSION:-v3.7.3}
cache_root=${ACRPULL_CONTROL_PLANE_CACHE:-$HOME/.cache/acrpull/control-plane}
out_dir="$cache_root/kubernetes-$kubernetes_version-etcd-$etcd_version"

binaries=(kube-apiserver kube-controller-manager kubectl etcd)

all_present() {
  for binary in "${binaries[@]}"; do
    [[ -x "$out_dir/bin/$binary" ]] || return 1
  done
}

if all_present; then
  echo "$out_dir/bin"
  exit 0
fi

command -v go >/dev/null || { echo "error: the Go toolchain is required to build the control plane (go not found in PATH)" >&2; exit 1; }

work_dir=$(mktemp -d)
trap 'rm -rf "$work_dir"' EXIT
mkdir -p "$out_dir/bin"
export CGO_ENABLED=0 GOFLAGS=-buildvcs=false GOTOOLCHAIN=local

# The staging modules are released as v0.<minor>.<patch> alongside v1.<minor>.<patch>.
staging_version="v0.${kubernetes_version#v1.}"

echo "building Kubernetes $kubernetes_version (staging modules $staging_version) into $out_dir/bin" >&2
mkdir -p "$work_dir/kubernetes"
cd "$work_dir/kubernetes"
go mod init acrpull.local/control-plane >/dev/null 2>&1
mod_file=$(go mod download -json "k8s.io/kubernetes@$kubernetes_version" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')
# Pin every module that upstream replaces with a local staging folder.
sed -n '/^replace (/,/^)/p' "$mod_file" | sed -n 's#^[[:space:]]*\(k8s.io/[a-z0-9-]*\) => ./staging/.*#\1#p' |
  while read -r module; do
    go mod edit -replace "$module=$module@$staging_version"
  done
go mod edit -require "k8s.io/kubernetes@$kubernetes_version"
go get "k8s.io/kubernetes@$kubernetes_version" >&2
# Adds the command packages as tools so that `go mod tidy` keeps what they import. Each one names
# the version, because `go get` without a version upgrades the module to its newest release.
go get -tool "k8s.io/kubernetes/cmd/kube-apiserver@$kubernetes_version" \
  "k8s.io/kubernetes/cmd/kube-controller-manager@$kubernetes_version" \
  "k8s.io/kubernetes/cmd/kubectl@$kubernetes_version" >&2

version_package=k8s.io/component-base/version
ldflags="-s -w -X $version_package.gitVersion=$kubernetes_version -X $version_package.gitMajor=1"
ldflags+=" -X $version_package.gitMinor=$(echo "$kubernetes_version" | cut -d. -f2) -X $version_package.gitTreeState=clean"
for command in kube-apiserver kube-controller-manager kubectl; do
  echo "go build $command" >&2
  go build -trimpath -ldflags "$ldflags" -o "$out_dir/bin/$command.tmp" "k8s.io/kubernetes/cmd/$command"
  mv "$out_dir/bin/$command.tmp" "$out_dir/bin/$command"
done

echo "building etcd $etcd_version" >&2
mkdir -p "$work_dir/etcd"
cd "$work_dir/etcd"
go mod init acrpull.local/etcd >/dev/null 2>&1
go get "go.etcd.io/etcd/server/v3@$etcd_version" >&2
go get -tool "go.etcd.io/etcd/server/v3@$etcd_version" >&2
go build -trimpath -ldflags "-s -w" -o "$out_dir/bin/etcd.tmp" go.etcd.io/etcd/server/v3
mv "$out_dir/bin/etcd.tmp" "$out_dir/bin/etcd"

all_present
echo "$out_dir/bin"
