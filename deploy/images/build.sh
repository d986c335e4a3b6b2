#!/usr/bin/env bash
# Builds halo's container images FROM scratch (no base image is pulled):
# each image holds only its binaries, the shared libraries `ldd` lists for
# them (copied to the same paths, dynamic loader included), a passwd entry
# for the unprivileged user and the directories the daemon writes.
#
#   halo-agent       halo-agent + llama-server + ggml-rpc-server +
#                    llama-fit-params (the estimate's check) + every
#                    lib*.so* of the llama.cpp bin dir (/opt/llama.cpp/bin)
#   halo-controller  halo-controller (+ haloctl), when the binary exists
#   halo-etcd        etcd (+ etcdctl) from Debian's etcd-server package
#
#   deploy/images/build.sh                    # all it can build, tag :dev
#   deploy/images/build.sh --build            # cargo build --release first
#   deploy/images/build.sh --only agent --tag test
#   deploy/images/build.sh --data tests/fixtures/probe/strix-halo-128g:/srv/probe
#
# Options:
#   --build            run `cargo build --release` for the halo binaries first
#   --bin-dir DIR      halo binaries (default: target/release)
#   --llama-dir DIR    llama.cpp bin dir (default: newest ~/.cache/halo/llama.cpp-*/bin)
#   --only LIST        comma-separated subset of agent,controller,etcd
#   --tag TAG          image tag (default: dev)
#   --data SRC:DEST    bake a file or directory into the agent image at DEST
#                      (repeatable; test models, a probe fixture tree).
#                      Mounting them at run time works too (see compose).
#   --keep             keep the staging directory and print its path
# Prints each image's size; a binary that does not exist is skipped with a
# loud SKIPPED line and exit status 3 at the end (0 when all were built).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)

bin_dir="$repo/target/release"
llama_dir=""
only="agent,controller,etcd"
tag=dev
build=0
keep=0
data=()
uid=10001

die() { echo "images/build.sh: $*" >&2; exit 1; }
say() { echo "images/build.sh: $*" >&2; }

while [ $# -gt 0 ]; do
    case $1 in
        --build) build=1 ;;
        --keep) keep=1 ;;
        --bin-dir) bin_dir=${2:?}; shift ;;
        --llama-dir) llama_dir=${2:?}; shift ;;
        --only) only=${2:?}; shift ;;
        --tag) tag=${2:?}; shift ;;
        --data) data+=("${2:?}"); shift ;;
        -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown option $1 (see --help)" ;;
    esac
    shift
done
command -v docker >/dev/null || die "docker is not installed"
docker info >/dev/null 2>&1 || die "the Docker engine is not reachable (docker info failed)"
command -v ldd >/dev/null || die "ldd is missing (Debian: libc-bin)"
wants() { case ",$only," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }

if [ "$build" = 1 ]; then
    pkgs=(-p agent -p ctl)
    [ -f "$repo/controller/src/main.rs" ] && pkgs+=(-p controller)
    (cd "$repo" && cargo build --release "${pkgs[@]}")
fi
if [ -z "$llama_dir" ]; then
    llama_dir=$(find "${HOME:-/root}/.cache/halo" -maxdepth 2 -type d -name bin -path '*llama.cpp-*' 2>/dev/null | sort | tail -n 1)
fi

stage=$(mktemp -d "${TMPDIR:-/tmp}/halo-images.XXXXXX")
if [ "$keep" = 1 ]; then
    say "staging in $stage (kept)"
else
    trap 'rm -rf "$stage"' EXIT
fi
skipped=()
built=()

# copy_libs ROOT FILE: the loader and every library `ldd FILE` resolves,
# at the same absolute path under ROOT (symlinks followed). Libraries that
# already sit under ROOT/opt/llama.cpp/bin (the llama.cpp dir) are skipped.
copy_libs() {
    local root=$1 file=$2 out lib
    if ! out=$(ldd "$file" 2>&1); then
        case $out in
            *"not a dynamic executable"*) return 0 ;; # static
            *) die "ldd $file: $out" ;;
        esac
    fi
    if grep -q "not found" <<<"$out"; then
        die "ldd $file: missing libraries: $(grep 'not found' <<<"$out" | tr -s ' \t\n' ' ')"
    fi
    while read -r lib; do
        [ -n "$lib" ] || continue
        # (With no llama.cpp dir, "$llama_dir"/* would be /*: every library.)
        if [ -n "$llama_dir" ]; then
            case $lib in
                "$llama_dir"/*) continue ;;
            esac
        fi
        if ! [ -e "$root$lib" ]; then
            install -d "$root$(dirname "$lib")"
            cp -L "$lib" "$root$lib"
        fi
    done < <(awk '/=>/ { if ($3 ~ /^\//) print $3; next } $1 ~ /^\// { print $1 }' <<<"$out")
}

# add_bin ROOT SRC DEST [strip]: an executable and its libraries.
add_bin() {
    local root=$1 src=$2 dest=$3
    install -d "$root$(dirname "$dest")"
    install -m 0755 "$src" "$root$dest"
    if [ "${4:-}" = strip ] && command -v strip >/dev/null; then
        strip --strip-debug "$root$dest"
    fi
    copy_libs "$root" "$src"
}

# base ROOT: passwd/group for the unprivileged user, nsswitch, /tmp.
base() {
    local root=$1
    install -d "$root/etc" "$root/tmp"
    chmod 1777 "$root/tmp"
    printf 'root:x:0:0:root:/:/nonexistent\nhalo:x:%s:%s:halo:/var/lib/halo:/nonexistent\n' "$uid" "$uid" >"$root/etc/passwd"
    printf 'root:x:0:\nhalo:x:%s:\n' "$uid" >"$root/etc/group"
    printf 'passwd: files\ngroup: files\nhosts: files dns\n' >"$root/etc/nsswitch.conf"
}

# image NAME CONTEXT: docker build, print the size.
image() {
    local name=$1 ctx=$2
    DOCKER_BUILDKIT=0 docker build --quiet --tag "$name:$tag" "$ctx" >/dev/null
    local bytes
    bytes=$(docker image inspect --format '{{.Size}}' "$name:$tag")
    say "built $name:$tag ($((bytes / 1024 / 1024)) MiB)"
    built+=("$name:$tag $((bytes / 1024 / 1024))MiB")
}

# ---- halo-agent --------------------------------------------------------------
if wants agent; then
    if ! [ -x "$bin_dir/halo-agent" ]; then
        skipped+=("halo-agent: no $bin_dir/halo-agent (cargo build --release -p agent)")
    elif [ -z "$llama_dir" ] || ! [ -x "$llama_dir/llama-server" ]; then
        skipped+=("halo-agent: no llama-server (pass --llama-dir; deploy/build-llama.sh builds one)")
    else
        ctx="$stage/agent"
        root="$ctx/rootfs"
        base "$root"
        add_bin "$root" "$bin_dir/halo-agent" /usr/local/bin/halo-agent strip
        if [ -x "$bin_dir/haloctl" ]; then
            add_bin "$root" "$bin_dir/haloctl" /usr/local/bin/haloctl strip
        fi
        # llama.cpp: the executables and every library beside them (RUNPATH
        # is $ORIGIN; a backend loaded with dlopen is not in ldd's list).
        install -d "$root/opt/llama.cpp/bin"
        find "$llama_dir" -maxdepth 1 -name 'lib*.so*' -exec cp -P -t "$root/opt/llama.cpp/bin" {} +
        for exe in llama-server ggml-rpc-server llama-fit-params; do
            if [ -x "$llama_dir/$exe" ]; then
                add_bin "$root" "$llama_dir/$exe" "/opt/llama.cpp/bin/$exe"
            else
                say "WARNING: no $llama_dir/$exe"
            fi
        done
        for so in "$llama_dir"/lib*.so*; do
            [ -L "$so" ] || copy_libs "$root" "$so"
        done
        install -d "$ctx/state" "$root/srv/models" "$root/etc/halo"
        for spec in ${data[@]+"${data[@]}"}; do
            src=${spec%%:*} dest=${spec#*:}
            if [ "$src" = "$spec" ] || ! [ -e "$src" ]; then
                die "--data wants SRC:DEST with an existing SRC, got $spec"
            fi
            install -d "$root$(dirname "$dest")"
            cp -a "$src" "$root$dest"
        done
        cat >"$ctx/Dockerfile" <<EOF
FROM scratch
COPY rootfs/ /
# COPY makes everything root-owned; the state directory (absent from
# rootfs/, so COPY creates it) belongs to the daemon's user.
COPY --chown=$uid:$uid state/ /var/lib/halo-agent/
ENV HALO_AGENT_LLAMA_SERVER=/opt/llama.cpp/bin/llama-server \\
    HALO_AGENT_STATE_DIR=/var/lib/halo-agent \\
    HALO_AGENT_MODEL_DIRS=/srv/models
USER $uid:$uid
VOLUME ["/var/lib/halo-agent"]
EXPOSE 7301 8100-8199 8200-8215
# Config from HALO_AGENT_* variables, or mount a file and set
# HALO_AGENT_CONFIG=/etc/halo/agent.toml.
CMD ["/usr/local/bin/halo-agent"]
EOF
        image halo-agent "$ctx"
    fi
fi

# ---- halo-controller -----------------------------------------------------------
if wants controller; then
    if ! [ -x "$bin_dir/halo-controller" ]; then
        skipped+=("halo-controller: no $bin_dir/halo-controller (cargo build --release -p controller)")
    else
        ctx="$stage/controller"
        root="$ctx/rootfs"
        base "$root"
        add_bin "$root" "$bin_dir/halo-controller" /usr/local/bin/halo-controller strip
        if [ -x "$bin_dir/haloctl" ]; then
            add_bin "$root" "$bin_dir/haloctl" /usr/local/bin/haloctl strip
        fi
        install -d "$ctx/state" "$root/etc/halo"
        cat >"$ctx/Dockerfile" <<EOF
FROM scratch
COPY rootfs/ /
# COPY makes everything root-owned; the state directory (absent from
# rootfs/, so COPY creates it) belongs to the daemon's user.
COPY --chown=$uid:$uid state/ /var/lib/halo-controller/
USER $uid:$uid
VOLUME ["/var/lib/halo-controller"]
EXPOSE 7300
# Config from HALO_CONTROLLER_* variables, or mount a file and set
# HALO_CONTROLLER_CONFIG=/etc/halo/controller.toml.
CMD ["/usr/local/bin/halo-controller"]
EOF
        image halo-controller "$ctx"
    fi
fi

# ---- halo-etcd -------------------------------------------------------------------
if wants etcd; then
    etcd_bin=$(command -v etcd || true)
    if [ -z "$etcd_bin" ]; then
        skipped+=("halo-etcd: no etcd binary (apt-get install etcd-server)")
    else
        ctx="$stage/etcd"
        root="$ctx/rootfs"
        base "$root"
        add_bin "$root" "$etcd_bin" /usr/local/bin/etcd
        if command -v etcdctl >/dev/null; then
            add_bin "$root" "$(command -v etcdctl)" /usr/local/bin/etcdctl
        fi
        install -d "$ctx/state"
        cat >"$ctx/Dockerfile" <<EOF
FROM scratch
COPY rootfs/ /
# COPY makes everything root-owned; the state directory (absent from
# rootfs/, so COPY creates it) belongs to the daemon's user.
COPY --chown=$uid:$uid state/ /var/lib/etcd/
ENV ETCD_DATA_DIR=/var/lib/etcd \\
    ETCD_LISTEN_CLIENT_URLS=http://0.0.0.0:2379 \\
    ETCD_ADVERTISE_CLIENT_URLS=http://127.0.0.1:2379
USER $uid:$uid
VOLUME ["/var/lib/etcd"]
EXPOSE 2379 2380
CMD ["/usr/local/bin/etcd"]
EOF
        image halo-etcd "$ctx"
    fi
fi

for b in ${built[@]+"${built[@]}"}; do echo "built   $b"; done
status=0
for s in ${skipped[@]+"${skipped[@]}"}; do
    echo "SKIPPED $s" >&2
    status=3
done
exit "$status"
