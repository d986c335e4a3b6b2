#!/usr/bin/env bash
# Runs halo's docker-compose fault tests (tests/compose.rs): builds the
# test binaries (the same build as tests/run.sh, so nothing is compiled
# twice), builds the agent, controller and etcd images FROM scratch from
# those binaries (deploy/images/build.sh, nothing is pulled) under a tag
# unique to this run, runs the `compose::` tests one at a time with
# HALO_COMPOSE_TAG set, and removes the images. Each test brings up and
# tears down its own compose project (deploy/compose/docker-compose.yml).
#
#   bash tests/compose.sh [nextest args…]
#
# Needs a Docker engine, docker-compose 1.x, etcd (Debian's etcd-server,
# copied into the etcd image) and llama.cpp's binaries (HALO_LLAMA_BIN, or
# tests/deps.sh builds them, cached). About 6 min on 2 cores once built.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD

die() { echo "compose: $*" >&2; exit 1; }
command -v docker >/dev/null || die "docker is not installed (Debian: apt-get install docker.io)"
docker info >/dev/null 2>&1 || die "the Docker engine is not reachable (docker info failed)"
command -v docker-compose >/dev/null || die "docker-compose is not installed (Debian: apt-get install docker-compose)"

if [ -z "${HALO_LLAMA_BIN:-}" ]; then
    HALO_LLAMA_BIN=$(bash tests/deps.sh)
fi
export HALO_LLAMA_BIN
[ -x "$HALO_LLAMA_BIN/llama-server" ] || die "no llama-server in $HALO_LLAMA_BIN"

start=$(date +%s)
stamp() { echo "compose: $* ($(($(date +%s) - start))s)" >&2; }

stamp "building the tests (cargo nextest run --workspace --no-run)"
cargo nextest run --workspace --no-run

# The daemons as the tests package builds them (its shims are the real
# programs: agent::cli::main, controller::cli::main, ctl::run).
target=${CARGO_TARGET_DIR:-$repo/target}/debug
tag="compose-$$"
work=$(mktemp -d "${TMPDIR:-/tmp}/halo-compose.XXXXXX")
trap 'docker rmi -f "halo-agent:$tag" "halo-controller:$tag" "halo-etcd:$tag" >/dev/null 2>&1 || true; rm -rf "$work"' EXIT
mkdir "$work/bin"
for pair in halo-agent:halo-agent-shim halo-controller:halo-controller-shim haloctl:haloctl-shim; do
    [ -x "$target/${pair#*:}" ] || die "no $target/${pair#*:} after the build"
    cp "$target/${pair#*:}" "$work/bin/${pair%%:*}"
done

stamp "building images :$tag FROM scratch"
bash deploy/images/build.sh --bin-dir "$work/bin" --llama-dir "$HALO_LLAMA_BIN" --tag "$tag"

stamp "running the compose fault tests"
status=0
HALO_COMPOSE_TAG=$tag cargo nextest run --workspace --run-ignored only \
    -E 'test(/^compose::/)' --test-threads 1 --no-fail-fast --success-output final "$@" || status=$?
stamp "done (exit $status)"
exit "$status"
