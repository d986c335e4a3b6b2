#!/usr/bin/env bash
# Runs halo's test suite: builds llama.cpp's binaries first (pinned, cached
# outside the checkout; ~6 min the first time on 2 cores), then every unit
# and integration test with cargo-nextest.
#
#   bash tests/run.sh [nextest args…]     e.g. bash tests/run.sh gguf
set -euo pipefail
cd "$(dirname "$0")/.."

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
