#!/usr/bin/env bash
# The local demo: a real control plane (etcd, kube-apiserver, kube-controller-manager), a fake
# Azure on loopback, and acrpull keeping a pull Secret fresh for a sample AcrPullBinding.
#
# Needs Rust (cargo), Go and python3. The first run builds the control plane (about
# 9 minutes on 2 cores) and the Rust binaries; later runs reuse both. Everything listens on
# 127.0.0.1 only and is stopped when the script ends.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/acrpull/target}
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "Building the control plane (cached after the first run) and the binaries"
bin_dir=$(dev/build-control-plane.sh)
cargo build --locked --bins -p acrpull -p acrpull-testkit
target="$CARGO_TARGET_DIR/debug"
export PATH="$bin_dir:$PATH"

work=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

wait_for_file() {
  local file=$1 what=$2 seconds=$3 log=$4
  for _ in $(seq "$seconds"); do
    [[ -e "$file" ]] && return 0
    sleep 1
  done
  echo "error: $what did not start within $seconds s; its log:" >&2
  tail -n 40 "$log" >&2
  exit 1
}

step "Starting etcd, kube-apiserver and kube-controller-manager on 127.0.0.1"
"$target/acrpull-control-plane" --dir "$work/cluster" >"$work/control-plane.log" 2>&1 &
pids+=($!)
wait_for_file "$work/cluster/ready" "the control plane" 180 "$work/control-plane.log"
export KUBECONFIG="$work/cluster/kubeconfig"
kubectl version 2>/dev/null | sed 's/^/  /'

step "Starting the fake Azure (IMDS, Entra ID, ACR) on 127.0.0.1"
"$target/acrpull-fake-azure" --rules dev/demo-azure.yaml --acr-refresh-token-lifetime 60 \
  --ca-file "$work/fake-azure-ca.crt" --state-file "$work/azure.json" >"$work/fake-azure.log" 2>&1 &
pids+=($!)
wait_for_file "$work/azure.json" "the fake Azure" 30 "$work/fake-azure.log"
mapfile -t azure_args < <(python3 -c 'import json,sys; print("\n".join(json.load(open(sys.argv[1]))["operator_args"]))' "$work/azure.json")
echo "  acrpull flags: ${azure_args[*]}"

step "Installing the CRD and starting acrpull"
kubectl apply -f deploy/latest/crd.yaml
kubectl wait --for condition=Established crd/acrpullbindings.msi-acrpull.microsoft.com --timeout=60s
"$target/acrpull" "${azure_args[@]}" --health-probe-addr 127.0.0.1:0 >"$work/acrpull.log" 2>&1 &
pids+=($!)

step "Creating namespace demo and the sample AcrPullBinding"
kubectl create namespace demo
for _ in $(seq 60); do kubectl -n demo get serviceaccount default >/dev/null 2>&1 && break; sleep 1; done
sed 's/^/  /' dev/demo-binding.yaml
kubectl -n demo apply -f dev/demo-binding.yaml
if ! kubectl -n demo wait --for=condition=Ready acrpullbinding/demo --timeout=60s; then
  echo "error: the binding did not become Ready; acrpull log:" >&2
  tail -n 40 "$work/acrpull.log" >&2
  exit 1
fi

step "The binding"
kubectl -n demo get acrpullbinding demo -o wide
kubectl -n demo get acrpullbinding demo -o jsonpath='{.status}' | python3 -m json.tool

step "The Secret, with the token redacted"
kubectl -n demo get secret demo-msi-acrpull-secret -o json | python3 "$root/dev/redact-secret.py"

step "The default ServiceAccount's imagePullSecrets"
kubectl -n demo get serviceaccount default -o jsonpath='{.imagePullSecrets}' | python3 -m json.tool

step "A new Pod gets the pull Secret from its ServiceAccount at admission"
kubectl -n demo run app --image=demo.azurecr.io/app:1.0 --restart=Never >/dev/null
kubectl -n demo get pod app -o jsonpath='{.spec.imagePullSecrets}' | python3 -m json.tool

step "Waiting 35 s: the 60 s token is renewed at half its lifetime"
first=$(kubectl -n demo get acrpullbinding demo -o jsonpath='{.status.lastTokenRefreshTime}')
sleep 35
second=$(kubectl -n demo get acrpullbinding demo -o jsonpath='{.status.lastTokenRefreshTime}')
echo "  lastTokenRefreshTime: $first -> $second"
[[ "$first" != "$second" ]] || { echo "error: the token was not refreshed" >&2; tail -n 40 "$work/acrpull.log" >&2; exit 1; }

step "Deleting the binding: the reference and the Secret go, then the finalizer"
kubectl -n demo delete acrpullbinding demo --timeout=60s
echo "  imagePullSecrets now: $(kubectl -n demo get serviceaccount default -o jsonpath='{.imagePullSecrets}')"
kubectl -n demo get secret demo-msi-acrpull-secret 2>&1 | sed 's/^/  /' || true

step "Azure calls made by acrpull"
python3 - "$work/azure.json" <<'PY'
import json, sys, urllib.request
admin = json.load(open(sys.argv[1]))["admin_url"]
totals = json.load(urllib.request.urlopen(admin + "/calls"))["totals"]
for endpoint, counts in sorted(totals.items()):
    print(f"  {endpoint}: {counts['calls']} calls")
PY

step "Done; stopping everything"
