#!/usr/bin/env bash
# Idempotent set-up of everything the build and the tests need on a fresh Debian 12 machine.
#   scripts/bootstrap.sh          toolchain only (nightly rust-src + bpf-linker)
#   scripts/bootstrap.sh --test   toolchain + the real programs the integration tests drive
# When everything is present this costs a few seconds.
set -euo pipefail

want_test=0
[[ "${1:-}" == "--test" ]] && want_test=1

log() { printf '[bootstrap] %s\n' "$*" >&2; }
SUDO=""
if [[ $(id -u) -ne 0 ]]; then SUDO="sudo"; fi

# --- Rust: nightly with rust-src for the kernel crate --------------------------------------------
if ! command -v rustup >/dev/null; then
  log "rustup is missing: install Rust from https://rustup.rs first"; exit 1
fi
if ! rustup toolchain list | grep -q '^nightly'; then
  log "installing nightly toolchain"; rustup toolchain install nightly --profile minimal
fi
if ! rustup component list --toolchain nightly --installed | grep -q '^rust-src'; then
  log "adding rust-src to nightly"; rustup component add rust-src --toolchain nightly
fi

# --- bpf-linker linked against nightly's own LLVM -------------------------------------------------
CARGO_BIN="${CARGO_HOME:-$HOME/.cargo}/bin"
LLVM_DIR="${CARGO_HOME:-$HOME/.cargo}/bpf-linker-llvm"   # must outlive the binary: it holds the rpath'd libLLVM link
NL="$(rustc +nightly --print sysroot)/lib"
need_linker=1
if [[ -x "$CARGO_BIN/bpf-linker" ]] && "$CARGO_BIN/bpf-linker" --version >/dev/null 2>&1; then
  need_linker=0
fi
if [[ $need_linker -eq 1 ]]; then
  log "building bpf-linker against nightly's LLVM (about a minute)"
  mkdir -p "$LLVM_DIR/lib"
  for f in "$NL"/libLLVM.so.* "$NL"/libLLVM-*.so; do
    [[ -e "$f" ]] || continue
    ln -sf "$f" "$LLVM_DIR/lib/libLLVM.so"
    ln -sf "$f" "$LLVM_DIR/lib/$(basename "$f")"
  done
  llvm_major=$(ls "$NL" | sed -n 's/^libLLVM\.so\.\([0-9]*\).*/\1/p' | head -n1)
  LLVM_PREFIX="$LLVM_DIR" cargo +stable install bpf-linker --locked --version '^0.13' \
    --no-default-features --features "llvm-${llvm_major:-22}"
fi

if [[ $want_test -eq 0 ]]; then exit 0; fi

# --- Debian packages the integration tests drive ---------------------------------------------------
pkgs=(nginx wrk curl wget iproute2 procps hey bpftool apache2-utils haproxy redis-server golang-go openjdk-17-jdk-headless nghttp2-client)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [[ ${#missing[@]} -gt 0 ]]; then
  log "installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq || log "apt-get update failed; trying the install anyway"
  $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
# The tests run their own nginx, haproxy and redis instances on their own free ports with their
# own configuration: a service of the same name that the machine already runs is left alone.

# etcd (a Go gRPC server and its client, programs nobody here wrote), unpacked into target/etcd
# rather than installed: Debian's etcd-server package would also enable and start a system etcd.
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ETCD_DIR="$ROOT/target/etcd"
if [[ ! -x "$ETCD_DIR/usr/bin/etcd" || ! -x "$ETCD_DIR/usr/bin/etcdctl" ]]; then
  log "unpacking Debian's etcd-server and etcd-client into $ETCD_DIR"
  tmp=$(mktemp -d)
  if ! (cd "$tmp" && apt-get download -qq etcd-server etcd-client); then
    $SUDO apt-get update -qq || true
    (cd "$tmp" && apt-get download -qq etcd-server etcd-client) || { log "apt-get download etcd failed"; exit 1; }
  fi
  mkdir -p "$ETCD_DIR"
  for deb in "$tmp"/*.deb; do dpkg-deb -x "$deb" "$ETCD_DIR"; done
  rm -rf "$tmp"
fi

# @grpc/grpc-js (npm) for the Node gRPC server and client, into target/node (NODE_PATH there).
NODE_DIR="$ROOT/target/node"
if [[ ! -f "$NODE_DIR/node_modules/@grpc/grpc-js/package.json" ]]; then
  log "installing @grpc/grpc-js from npm into $NODE_DIR"
  mkdir -p "$NODE_DIR"
  (cd "$NODE_DIR" && npm install --no-audit --no-fund --silent '@grpc/grpc-js@1') \
    || { log "npm install @grpc/grpc-js failed"; exit 1; }
fi

# PyPI packages the tests' Python clients import (for the interpreter the tests run).
if ! python3 -c 'import redis' 2>/dev/null; then
  log "installing redis-py from PyPI"
  python3 -m pip install -q --root-user-action=ignore 'redis>=4' || { log "pip install redis failed"; exit 1; }
fi
if ! python3 -c 'import aiohttp' 2>/dev/null; then
  log "installing aiohttp from PyPI (the asyncio service of the linking tests)"
  python3 -m pip install -q --root-user-action=ignore 'aiohttp>=3.8' || { log "pip install aiohttp failed"; exit 1; }
fi
if ! python3 -c 'import uvicorn, fastapi, httpx' 2>/dev/null; then
  log "installing uvicorn, FastAPI and httpx from PyPI (the ASGI service of the linking tests)"
  python3 -m pip install -q --root-user-action=ignore 'uvicorn>=0.20' 'fastapi>=0.100' 'httpx>=0.24' \
    || { log "pip install uvicorn fastapi httpx failed"; exit 1; }
fi
if ! python3 -c 'import grpc' 2>/dev/null; then
  log "installing grpcio from PyPI (the gRPC server and client of the HTTP/2 tests)"
  python3 -m pip install -q --root-user-action=ignore 'grpcio>=1.50' || { log "pip install grpcio failed"; exit 1; }
fi
# The manifests' schema check (offline, bundled Kubernetes schemas).
if ! command -v kubernetes-validate >/dev/null 2>&1; then
  log "installing kubernetes-validate from PyPI"
  python3 -m pip install -q --root-user-action=ignore 'kubernetes-validate>=1.30' \
    || { log "pip install kubernetes-validate failed"; exit 1; }
fi
exit 0
