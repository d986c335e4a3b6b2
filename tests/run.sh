#!/usr/bin/env bash
# Runs halo's test suite: installs what the tests need (tests/deps.sh:
# Debian packages, cargo-nextest, llama.cpp built once and cached outside
# the checkout, ~6-10 min the first time on 2 cores), then every unit and
# integration test with cargo-nextest. The docker-compose fault tests are
# `#[ignore]`d here (nextest lists them as skipped): tests/compose.sh builds
# their images and runs them.
#
#   bash tests/run.sh [nextest args…]     e.g. bash tests/run.sh gguf
set -euo pipefail
cd "$(dirname "$0")/.."

HALO_LLAMA_BIN=$(bash tests/deps.sh)
export HALO_LLAMA_BIN
echo "tests: llama.cpp binaries from $HALO_LLAMA_BIN" >&2
exec cargo nextest run --workspace --no-fail-fast "$@"
