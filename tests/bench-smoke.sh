#!/usr/bin/env bash
# Runs every bench of the workspace once in its smoke mode
# (HALO_BENCH_SMOKE=1: one iteration, tiny sizes, no figures asserted), so
# a bench that no longer starts or never ends fails CI instead of rotting.
# The benches are found in the crates' Cargo.toml ([[bench]] entries), so
# a new one is run without editing this script. They are built with the
# dev profile (the smoke run checks that they work, not how fast: the
# optimised build is what `cargo bench` is for). The benches that start
# llama-server or llama-fit-params find them through HALO_LLAMA_BIN, as
# the tests do.
#
#     bash tests/bench-smoke.sh            # all of them
#     bash tests/bench-smoke.sh split      # only benches named so
#
# Each bench gets HALO_BENCH_SMOKE_TIMEOUT seconds (default 300); a bench
# that fails, cannot start or runs over fails the script, with its output.
set -euo pipefail
cd "$(dirname "$0")/.."
limit=${HALO_BENCH_SMOKE_TIMEOUT:-300}
only=${1:-}

# "crate bench" for every [[bench]] of every member crate.
benches=()
for toml in */Cargo.toml; do
  crate=$(dirname "$toml")
  while read -r name; do
    if [[ -z $only || $name == "$only" ]]; then
      benches+=("$crate $name")
    fi
  done < <(awk '
    /^\[\[bench\]\]/ { inbench = 1; next }
    /^\[/ { inbench = 0 }
    inbench && $1 == "name" { gsub(/"/, "", $3); print $3 }
  ' "$toml")
done
if [[ ${#benches[@]} -eq 0 ]]; then
  echo "bench-smoke: no bench${only:+ named $only}" >&2
  exit 1
fi

crates=()
for c in $(printf '%s\n' "${benches[@]%% *}" | sort -u); do
  crates+=(-p "$c")
done
# Built, and later run, with the same packages selected: cargo unifies
# features over the selection, so running one package's bench alone
# would build the workspace again.
echo "bench-smoke: building ${#benches[@]} benches (dev profile)"
cargo bench --profile dev --no-run -q "${crates[@]}"

start=$(date +%s)
failed=()
for b in "${benches[@]}"; do
  crate=${b%% *}
  name=${b#* }
  log=$(mktemp)
  t0=$(date +%s)
  if HALO_BENCH_SMOKE=1 timeout --kill-after=10 "$limit" \
      cargo bench --profile dev -q "${crates[@]}" --bench "$name" >"$log" 2>&1; then
    echo "bench-smoke: $crate/$name ok ($(( $(date +%s) - t0 ))s)"
  else
    rc=$?
    why="exit $rc"
    [[ $rc -eq 124 || $rc -eq 137 ]] && why="no end within ${limit}s"
    echo "bench-smoke: $crate/$name FAILED ($why, $(( $(date +%s) - t0 ))s); its output:" >&2
    sed 's/^/    /' "$log" >&2
    failed+=("$crate/$name")
  fi
  rm -f "$log"
done
echo "bench-smoke: ${#benches[@]} benches in $(( $(date +%s) - start ))s"
if [[ ${#failed[@]} -gt 0 ]]; then
  echo "bench-smoke: FAILED: ${failed[*]}" >&2
  exit 1
fi
