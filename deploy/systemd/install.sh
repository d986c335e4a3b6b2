#!/usr/bin/env bash
# Installs halo on one node as systemd services: the `halo` system user (in
# the video and render groups for the GPU), binaries, llama.cpp, units and
# example config, then enables the units. Idempotent: re-running upgrades
# binaries and units and never overwrites an existing /etc/halo/*.toml.
#
#   sudo deploy/systemd/install.sh --agent                # a node
#   sudo deploy/systemd/install.sh --agent --controller   # the controller node
#   sudo deploy/systemd/install.sh --controller --etcd    # controller on etcd
#   deploy/systemd/install.sh --agent --controller --destdir /tmp/stage
#                                                         # dry run: files only
#
# Options:
#   --agent / --controller  what to install (at least one)
#   --etcd                  the controller uses etcd: install Debian's
#                           etcd-server and order the controller after it
#   --bin-dir DIR           halo binaries (default: target/release)
#   --llama-dir DIR         llama.cpp bin dir with llama-server and lib*.so*
#                           (default: ~/.cache/halo/llama.cpp-*/bin, newest)
#   --prefix DIR            where halo's binaries go (default: /usr/local)
#   --destdir DIR           stage under DIR; no users, no systemctl
#   --now                   also (re)start the units
# See deploy/systemd/README.md.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)

agent=0 controller=0 etcd=0 now=0
bin_dir="$repo/target/release"
llama_dir=""
prefix=/usr/local
destdir=""

die() { echo "install.sh: $*" >&2; exit 1; }
say() { echo "install.sh: $*"; }

while [ $# -gt 0 ]; do
    case $1 in
        --agent) agent=1 ;;
        --controller) controller=1 ;;
        --etcd) etcd=1 ;;
        --now) now=1 ;;
        --bin-dir) bin_dir=${2:?--bin-dir needs a directory}; shift ;;
        --llama-dir) llama_dir=${2:?--llama-dir needs a directory}; shift ;;
        --prefix) prefix=${2:?--prefix needs a directory}; shift ;;
        --destdir) destdir=${2:?--destdir needs a directory}; shift ;;
        -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown option $1 (see --help)" ;;
    esac
    shift
done
[ $((agent + controller)) -gt 0 ] || die "say what to install: --agent and/or --controller"
[ "$etcd" = 0 ] || [ "$controller" = 1 ] || die "--etcd goes with --controller"
if [ -z "$destdir" ] && [ "$(id -u)" != 0 ]; then
    die "run as root, or stage with --destdir DIR"
fi
case $prefix in /*) ;; *) die "--prefix must be absolute" ;; esac

root=${destdir%/}
bindest="$root$prefix/bin"
llamadest="$root/opt/llama.cpp/bin"
unitdest="$root/etc/systemd/system"
confdest="$root/etc/halo"
docdest="$root$prefix/share/doc/halo"

# ---- the halo user ---------------------------------------------------------
if [ -z "$destdir" ]; then
    for g in video render; do
        getent group "$g" >/dev/null || groupadd --system "$g"
    done
    if ! getent passwd halo >/dev/null; then
        useradd --system --user-group --home-dir /var/lib/halo-agent --no-create-home \
            --shell /usr/sbin/nologin --comment "halo LLM cluster" halo
        say "created system user halo"
    fi
    usermod --append --groups video,render halo
else
    say "dry run: would create system user halo (groups halo, video, render)"
fi

# ---- binaries --------------------------------------------------------------
install -d -m 0755 "$bindest"
wanted=(haloctl)
[ "$agent" = 1 ] && wanted+=(halo-agent)
[ "$controller" = 1 ] && wanted+=(halo-controller)
for b in "${wanted[@]}"; do
    [ -x "$bin_dir/$b" ] || die "$bin_dir/$b is missing: cargo build --release -p agent -p controller -p ctl"
    install -m 0755 "$bin_dir/$b" "$bindest/$b.new"
    mv -f "$bindest/$b.new" "$bindest/$b"
done
say "installed ${wanted[*]} into $bindest"

if [ "$agent" = 1 ]; then
    if [ -z "$llama_dir" ]; then
        llama_dir=$(find "${HOME:-/root}/.cache/halo" -maxdepth 2 -type d -name bin -path '*llama.cpp-*' 2>/dev/null | sort | tail -n 1)
    fi
    if [ -z "$llama_dir" ] || ! [ -x "$llama_dir/llama-server" ]; then
        die "no llama-server: pass --llama-dir DIR (deploy/build-llama.sh builds one; GPU nodes want a ROCm or Vulkan build)"
    fi
    install -d -m 0755 "$llamadest"
    for f in llama-server ggml-rpc-server; do
        [ -e "$llama_dir/$f" ] && install -m 0755 "$llama_dir/$f" "$llamadest/$f"
    done
    # Libraries with their symlinks (RUNPATH is $ORIGIN: they sit beside it).
    find "$llama_dir" -maxdepth 1 -name 'lib*.so*' -exec cp -P --preserve=mode,links -t "$llamadest" {} +
    say "installed llama.cpp from $llama_dir into $llamadest"
fi

# ---- units -----------------------------------------------------------------
install -d -m 0755 "$unitdest"
units=()
[ "$agent" = 1 ] && units+=(halo-agent.service)
[ "$controller" = 1 ] && units+=(halo-controller.service)
for u in "${units[@]}"; do
    sed "s#/usr/local/bin/#$prefix/bin/#g; s#/usr/local/share/doc/#$prefix/share/doc/#g" \
        "$here/$u" >"$unitdest/$u.new"
    chmod 0644 "$unitdest/$u.new"
    mv -f "$unitdest/$u.new" "$unitdest/$u"
done
if [ "$etcd" = 1 ]; then
    install -d -m 0755 "$unitdest/halo-controller.service.d"
    install -m 0644 "$here/halo-controller-etcd.conf" "$unitdest/halo-controller.service.d/etcd.conf"
fi
say "installed ${units[*]} into $unitdest"

# ---- config (never overwritten) --------------------------------------------
install -d -m 0750 "$confdest"
[ -z "$destdir" ] && chown root:halo "$confdest"
install_config() { # SOURCE NAME WHAT-TO-EDIT
    local dest="$confdest/$2"
    if [ -e "$dest" ]; then
        say "kept existing $dest"
    elif [ -e "$1" ]; then
        install -m 0640 "$1" "$dest"
        [ -z "$destdir" ] && chown root:halo "$dest"
        say "wrote $dest from $1: edit $3"
    else
        die "no example $1 in this checkout; cannot write $dest"
    fi
}
if [ "$agent" = 1 ]; then
    install_config "$repo/deploy/config/agent.toml" agent.toml \
        "node_name, listen (this node's tailnet address), model_dirs and roles"
fi
if [ "$controller" = 1 ]; then
    install_config "$repo/deploy/config/controller.toml" controller.toml \
        "listen (the tailnet address), [[nodes]] (each agent's name, address, roles) and, with etcd, etcd"
    # controller.toml names this file; without it the controller exits 64.
    install_config "$repo/deploy/config/catalog.toml" catalog.toml \
        "[[models]]: each model_id is a file under an agent's model_dirs"
fi
# ---- TLS files (/etc/halo/tls, from `haloctl certs`) --------------------------
# The daemons run as halo: their keys become root:halo 0640. The CA key and
# people's keys (admin-*, read-only-*) stay as haloctl wrote them (0600).
tlsdir="$confdest/tls"
install -d -m 0750 "$tlsdir"
[ -z "$destdir" ] && chown root:halo "$tlsdir"
found=0
for k in "$tlsdir"/agent-*.key "$tlsdir"/controller-*.key; do
    [ -e "$k" ] || continue
    found=1
    chmod 0640 "$k"
    [ -z "$destdir" ] && chgrp halo "$k"
    say "made $k readable by the halo group"
done
[ "$found" = 1 ] || say "no daemon keys in $tlsdir yet: copy this node's certificate, key and ca.pem there (README: TLS) and run this again"

install -d -m 0755 "$docdest"
install -m 0644 "$repo/README.md" "$docdest/README.md"
install -m 0644 "$here/README.md" "$docdest/systemd.md"
if [ "$agent" = 1 ]; then
    install -d -m 0755 "$root/srv/models"
fi

# ---- etcd ------------------------------------------------------------------
if [ "$etcd" = 1 ]; then
    if [ -z "$destdir" ]; then
        command -v etcd >/dev/null || {
            command -v apt-get >/dev/null || die "install etcd (Debian: etcd-server) first"
            DEBIAN_FRONTEND=noninteractive apt-get install -y etcd-server
        }
    fi
    install -d -m 0755 "$root/etc/default"
    install -m 0644 "$here/etcd.default.example" "$root/etc/default/etcd.halo-example"
    say "etcd: edit /etc/default/etcd (template: /etc/default/etcd.halo-example) to bind this node's tailnet address, then: systemctl enable --now etcd"
fi

# ---- systemd ---------------------------------------------------------------
next_steps() {
    say "next steps:"
    say "  1. edit the config named above under /etc/halo"
    say "  2. put this node's certificate, key and ca.pem in /etc/halo/tls (haloctl certs; README: TLS) and run this again"
    say "  3. systemctl start ${units[*]}; the log: journalctl -u ${units[0]}"
}
if [ -n "$destdir" ]; then
    say "dry run: staged under $destdir; would run: systemctl daemon-reload && systemctl enable ${units[*]}"
    next_steps
    exit 0
fi
if ! [ -d /run/systemd/system ]; then
    say "systemd is not running here: enable ${units[*]} on the real host"
    exit 0
fi
systemctl daemon-reload
systemctl enable "${units[@]}"
if [ "$now" = 1 ]; then
    # Restarting the agent keeps llama-server instances (KillMode=process).
    systemctl restart "${units[@]}"
    systemctl --no-pager status "${units[@]}" || true
else
    say "enabled ${units[*]}"
    next_steps
fi
