#!/usr/bin/env bash
# Runs every test: unit tests, actor tests and the integration tests against a real
# kube-apiserver, kube-controller-manager and etcd with the fake Azure on loopback.
#
# Needs Rust (cargo) and Go. Builds the control plane on first use (about 9 minutes on
# 2 cores) and caches it under $HOME/.cache/acrpull; later runs reuse it.
#
# Extra arguments go to `cargo test`, for example: dev/test.sh --test bindings
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/acrpull/target}
ACRPULL_CONTROL_PLANE_BIN=$(dev/build-control-plane.sh)
export ACRPULL_CONTROL_PLANE_BIN
export PATH="$ACRPULL_CONTROL_PLANE_BIN:$PATH"

cargo test --workspace --all-targets --locked "$@"
