#!/usr/bin/env bash
# Runs halo's test suite: builds llama.cpp's binaries first (pinned, cached
# outside the checkout; ~6 min the first time on 2 cores), then every unit
# and integration test with cargo-nextest.
#
#   bash tests/run.sh [nextest args…]     e.g. bash tests/run.sh gguf
set -euo pipefail
cd "$(dirname "$0")/.."

# The controller's tests start a real etcd (Debian's etcd-server), and the
# etcd client crate's build script compiles etcd's protos with protoc
# (Debian's protobuf-compiler). Install them when missing and we are root.
missing=()
command -v etcd >/dev/null 2>&1 || missing+=(etcd-server)
command -v protoc >/dev/null 2>&1 || missing+=(protobuf-compiler)
if [ "${#missing[@]}" -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "tests: installing ${missing[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
  else
    echo "tests: missing ${missing[*]}; install them (Debian: apt-get install ${missing[*]})" >&2
    exit 1
  fi
fi

if [ -z "${HALO_LLAMA_BIN:-}" ]; then
  HALO_LLAMA_BIN=$(bash deploy/build-llama.sh)
fi
export HALO_LLAMA_BIN
echo "tests: llama.cpp binaries from $HALO_LLAMA_BIN" >&2

if ! cargo nextest --version >/dev/null 2>&1; then
  echo "tests: cargo-nextest missing; installing it" >&2
  cargo install --locked cargo-nextest >&2
fi
exec cargo nextest run --workspace --no-fail-fast "$@"
