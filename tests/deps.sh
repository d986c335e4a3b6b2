#!/usr/bin/env bash
# Installs what halo's tests need beyond a Rust toolchain, when missing:
# Debian packages (protoc, which the etcd-client crate's build script runs;
# etcd for the store and leader tests; systemd-analyze and the shell linter
# for the deploy checks; Prometheus and promtool for the metrics tests, tmux
# for `haloctl top` in a real terminal),
# cargo-nextest, and llama.cpp's binaries (built once, cached; see
# deploy/build-llama.sh). Prints the llama.cpp bin directory on stdout.
#
#   HALO_LLAMA_BIN=$(bash tests/deps.sh)
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v protoc >/dev/null 2>&1 || missing+=(protobuf-compiler)
# protoc's well-known types (google/protobuf/*.proto), which etcd's protos
# import; a Recommends of protobuf-compiler, so not there by default.
[ -e /usr/include/google/protobuf/descriptor.proto ] || missing+=(libprotobuf-dev)
command -v etcd >/dev/null 2>&1 || missing+=(etcd-server)
command -v systemd-analyze >/dev/null 2>&1 || missing+=(systemd)
command -v shellcheck >/dev/null 2>&1 || missing+=(shellcheck)
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
command -v tmux >/dev/null 2>&1 || missing+=(tmux)
if [ "${#missing[@]}" -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "deps: installing ${missing[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
  else
    echo "deps: missing ${missing[*]}; install them (Debian: apt-get install ${missing[*]})" >&2
    exit 1
  fi
fi

if ! cargo nextest --version >/dev/null 2>&1; then
  echo "deps: cargo-nextest missing; installing it" >&2
  cargo install --locked cargo-nextest >&2
fi

if [ -n "${HALO_LLAMA_BIN:-}" ]; then
  echo "$HALO_LLAMA_BIN"
else
  bash deploy/build-llama.sh
fi
