#!/usr/bin/env bash
# halo's first five minutes: a local cluster on loopback, from the checkout.
#
#   bash deploy/quickstart.sh        # (or `up`) build, start, place the demo model, ask it
#   bash deploy/quickstart.sh down   # stop everything it started and remove its state
#
# `up` builds halo's binaries (cargo; protoc, which that needs, is
# installed first when missing, as root on Debian) and llama.cpp's llama-server
# (deploy/build-llama.sh, cached in ~/.cache/halo), writes the tiny demo
# model, starts a controller (embedded store) and two agents named halo1
# (role speed) and halo2 (role reasoning), places the demo model, shows
# `haloctl status`, makes a user key and sends one chat completion with
# model "code" through the gateway halo1's agent serves.
# Running `up` again while the cluster runs reuses it. Every link speaks
# mutual TLS, as in a deployment: `haloctl certs` makes a CA and the
# certificates in $HALO_LOCAL_DIR/tls, and $HALO_LOCAL_DIR/env exports what
# haloctl needs (`. .halo-local/env`).
#
# $HALO_LLAMA_BIN, when it holds llama-server, is used instead of building.
# Everything lives under $HALO_LOCAL_DIR (default ./.halo-local, git-ignored):
# logs in logs/, pids in run/. Ports: $HALO_LOCAL_PORT (default 7300, the
# controller; haloctl's default) and the next 29 above it for the agents,
# their gateways (PORT+3, PORT+4) and their llama-server instances.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DIR=${HALO_LOCAL_DIR:-$ROOT/.halo-local}
PORT=${HALO_LOCAL_PORT:-7300}
BIN=${CARGO_TARGET_DIR:-$ROOT/target}/debug
HALOCTL=$BIN/haloctl
TLS=$DIR/tls
export HALO_CONTROLLER=https://127.0.0.1:$PORT
export HALO_TLS_CERT=$TLS/admin-local.pem HALO_TLS_KEY=$TLS/admin-local.key HALO_TLS_CA=$TLS/ca.pem

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }
die() { printf 'quickstart: %s\n' "$*" >&2; exit 1; }

alive() { [ -f "$DIR/run/$1.pid" ] && kill -0 "$(cat "$DIR/run/$1.pid")" 2>/dev/null; }

# Pids of llama-server processes started by this cluster's agents (their
# command lines name the agents' state directories under $DIR).
servers() {
  local p cmd cwd
  for p in /proc/[0-9]*; do
    cmd=$(tr '\0' ' ' <"$p/cmdline" 2>/dev/null) || continue
    # ggml-rpc-server (a split's helper) names nothing of ours on its
    # command line; it runs in its instance directory.
    cwd=$(readlink "$p/cwd" 2>/dev/null || true)
    case $cmd in
      *llama-server*"$DIR/"*/state/*) echo "${p#/proc/}" ;;
      *)
        case $cwd in
          "$DIR/"*/state/instances/*) echo "${p#/proc/}" ;;
        esac
        ;;
    esac
  done
}

# SIGTERM, up to 10 s, then SIGKILL.
stop_pid() {
  local pid=$1
  kill -TERM "$pid" 2>/dev/null || return 0
  for _ in $(seq 1 100); do
    kill -0 "$pid" 2>/dev/null || return 0
    sleep 0.1
  done
  kill -KILL "$pid" 2>/dev/null || true
}

down() {
  [ -d "$DIR" ] || { say "nothing to stop ($DIR does not exist)"; return 0; }
  local name pid
  # The controller first, so nothing restarts what is being stopped.
  for name in controller halo1 halo2; do
    if alive "$name"; then
      say "stopping $name"
      stop_pid "$(cat "$DIR/run/$name.pid")"
    fi
  done
  # Instances outlive their agent by design (as under systemd's
  # KillMode=process); stop each one's process group.
  for pid in $(servers); do
    say "stopping llama-server $pid"
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
  done
  for pid in $(servers); do stop_pid "$pid"; done
  rm -rf "$DIR"
  say "stopped; removed $DIR"
}

start() {
  local name=$1; shift
  mkdir -p "$DIR/run" "$DIR/logs"
  setsid "$@" >"$DIR/logs/$name.log" 2>&1 </dev/null &
  echo $! >"$DIR/run/$name.pid"
}

wait_port() {
  local name=$1 port=$2
  for _ in $(seq 1 200); do
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && return 0
    alive "$name" || { tail -n 20 "$DIR/logs/$name.log" >&2; die "$name exited (log: $DIR/logs/$name.log)"; }
    sleep 0.1
  done
  die "$name did not listen on $port (log: $DIR/logs/$name.log)"
}

port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

up() {
  command -v cargo >/dev/null || die "cargo not found: install Rust (https://rustup.rs), 1.88 or newer"
  command -v curl >/dev/null || die "curl not found (apt-get install curl)"
  # protoc: the etcd-client crate's build script runs it.
  # It imports protoc's well-known types (libprotobuf-dev on Debian).
  if ! command -v protoc >/dev/null || [ ! -e /usr/include/google/protobuf/descriptor.proto ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      say "installing protobuf-compiler and libprotobuf-dev (protoc, for building halo)"
      apt-get update -qq >&2
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq protobuf-compiler libprotobuf-dev >&2
    else
      die "protoc or its google/protobuf/*.proto not found (apt-get install protobuf-compiler libprotobuf-dev): building halo needs them"
    fi
  fi
  say "building halo (cargo build)"
  (cd "$ROOT" && cargo build -q -p agent -p controller -p ctl --bins)
  say "llama.cpp's llama-server (built once, ~10 min on 2 cores, then cached)"
  local llama
  if [ -n "${HALO_LLAMA_BIN:-}" ] && [ -x "$HALO_LLAMA_BIN/llama-server" ]; then
    llama=$HALO_LLAMA_BIN
  else
    llama=$(bash "$ROOT/deploy/build-llama.sh" | tail -n 1)
  fi
  [ -x "$llama/llama-server" ] || die "no llama-server in $llama"

  if alive controller && alive halo1 && alive halo2; then
    say "the local cluster is already running ($DIR)"
  else
    if [ -d "$DIR" ]; then
      say "cleaning up a previous run"
      down
    fi
    local p
    for p in "$PORT" $((PORT + 1)) $((PORT + 2)) $((PORT + 3)) $((PORT + 4)); do
      port_free "$p" || die "port $p is in use: set HALO_LOCAL_PORT to another base port"
    done
    mkdir -p "$DIR/controller"
    say "making a CA and certificates in $TLS (haloctl certs)"
    "$HALOCTL" certs init --dir "$TLS" >/dev/null
    local who
    for who in agent:halo1 agent:halo2 controller:controller admin:local; do
      "$HALOCTL" certs issue "${who%%:*}" "${who#*:}" --dir "$TLS" \
        --host 127.0.0.1 --host localhost >/dev/null
    done
    cat >"$DIR/env" <<EOF
# haloctl's settings for the local cluster: . $DIR/env
export HALO_CONTROLLER=$HALO_CONTROLLER
export HALO_TLS_CERT=$HALO_TLS_CERT
export HALO_TLS_KEY=$HALO_TLS_KEY
export HALO_TLS_CA=$HALO_TLS_CA
EOF
    local i=0 node role
    for node in halo1:speed halo2:reasoning; do
      i=$((i + 1))
      role=${node#*:}; node=${node%%:*}
      mkdir -p "$DIR/$node/models" "$DIR/$node/state"
      "$HALOCTL" fixture write tiny "$DIR/$node/models/tiny.gguf" >/dev/null
      # A real DeepSeek-V3.1 1-bit header over a sparse hole: 158 GiB
      # apparent size, ~72 KB on disk; enough for placement to say no.
      [ "$role" = reasoning ] && "$HALOCTL" fixture write deepseek-v3.1-1bit \
        "$DIR/$node/models/deepseek-v3.1-1bit.gguf" --size-only-vocab >/dev/null
      say "starting agent $node (role $role) on 127.0.0.1:$((PORT + i))"
      # Each agent also serves the gateway (HTTPS with its certificate):
      # one front door per node, on PORT+3 and PORT+4.
      start "$node" "$BIN/halo-agent" --node-name "$node" --role "$role" \
        --listen "127.0.0.1:$((PORT + i))" --model-dir "$DIR/$node/models" \
        --state-dir "$DIR/$node/state" --llama-server "$llama/llama-server" \
        --port-range "$((PORT + 10 * i))-$((PORT + 10 * i + 9))" --stop-timeout-secs 5 \
        --tls-cert "$TLS/agent-$node.pem" --tls-key "$TLS/agent-$node.key" --tls-ca "$TLS/ca.pem" \
        --gateway-listen "127.0.0.1:$((PORT + 2 + i))" --gateway-controller "https://127.0.0.1:$PORT"
      wait_port "$node" $((PORT + i))
    done
    cat >"$DIR/catalog.toml" <<'EOF'
# The demo model: a tiny llama-architecture GGUF with random weights
# (written by `haloctl fixture write tiny`). It answers, in gibberish.
[[models]]
name = "tiny"
model_id = "tiny.gguf"
default_context = 512
min_context = 256
modes = ["ask", "code", "autocomplete", "architect", "debug"]

# A sparse stand-in for DeepSeek-V3.1 at 1 bit (~170 GB): real header,
# no weights. Placing it shows the refusal with the numbers.
[[models]]
name = "deepseek-v3.1-1bit"
model_id = "deepseek-v3.1-1bit.gguf"
default_context = 16384
min_context = 4096
modes = ["architect", "debug"]
EOF
    say "starting the controller on 127.0.0.1:$PORT (embedded store)"
    start controller "$BIN/halo-controller" --listen "127.0.0.1:$PORT" \
      --store-path "$DIR/controller/state.json" \
      --node "halo1=127.0.0.1:$((PORT + 1)),halo2=127.0.0.1:$((PORT + 2))" \
      --catalog "$DIR/catalog.toml" \
      --tls-cert "$TLS/controller-controller.pem" --tls-key "$TLS/controller-controller.key" \
      --tls-ca "$TLS/ca.pem"
    wait_port controller "$PORT"
  fi

  say "waiting for both nodes"
  for _ in $(seq 1 100); do
    [ "$("$HALOCTL" nodes -o json 2>/dev/null | grep -c '"status": "ready"')" = 2 ] && break
    sleep 0.2
  done
  echo "\$ haloctl nodes"; "$HALOCTL" nodes; echo
  if ! "$HALOCTL" status -o json | grep -q '"name": "tiny"'; then
    echo "\$ haloctl place speed tiny"; "$HALOCTL" place speed tiny; echo
  fi
  echo "\$ haloctl status"; "$HALOCTL" status; echo

  # One user key for the gateways, made once and kept with the cluster.
  local key gw answer
  if [ ! -s "$DIR/gateway-key" ]; then
    "$HALOCTL" keys create quickstart | sed -n 's/^\(halo-[A-Za-z0-9_-]*\)$/\1/p' >"$DIR/gateway-key"
    chmod 600 "$DIR/gateway-key"
  fi
  key=$(cat "$DIR/gateway-key")
  [ -n "$key" ] || die "haloctl keys create made no key"
  gw=https://127.0.0.1:$((PORT + 3))
  echo "\$ curl $gw/v1/chat/completions --cacert $TLS/ca.pem -H \"Authorization: Bearer \$(cat $DIR/gateway-key)\" -d '{\"model\":\"code\",\"messages\":[{\"role\":\"user\",\"content\":\"Hello\"}]}'"
  # The gateway learns of a new placement within a second of the controller.
  for _ in $(seq 1 50); do
    answer=$(curl -sS --max-time 130 --cacert "$TLS/ca.pem" "$gw/v1/chat/completions" \
      -H "Authorization: Bearer $key" -H 'Content-Type: application/json' \
      -d '{"model":"code","messages":[{"role":"user","content":"Hello"}],"max_tokens":16}' || true)
    printf '%s\n' "$answer" | grep -q '"choices"' && break
    sleep 0.2
  done
  printf '%s\n' "$answer" | grep -q '"choices"' || die "the completion through the gateway failed: $answer"
  printf 'answer: %s\n' "$(printf '%s' "$answer" | sed -nE 's/.*"content":"(([^"\\]|\\.)*)".*/\1/p' | head -n 1)"
  cat <<EOF

Gateway (OpenAI-compatible; one base URL and one key for every model and mode):
  base URL  $gw/v1   (halo2 serves one too: https://127.0.0.1:$((PORT + 4))/v1)
  API key   $key   (kept in $DIR/gateway-key)
  model     a mode (ask, code, autocomplete, architect, debug) or a model name
  CA        $TLS/ca.pem   (VS Code-based editors: NODE_EXTRA_CA_CERTS=$TLS/ca.pem)
EOF
  cat <<EOF

The local cluster is running (state and logs in $DIR), with mutual TLS.
haloctl needs the controller's address and an admin certificate:
  . $DIR/env
  $HALOCTL nodes | models | status | endpoints | events
  $HALOCTL place reasoning deepseek-v3.1-1bit    # refused, with the arithmetic
Stop it, leaving no process behind:
  bash deploy/quickstart.sh down
EOF
}

case ${1:-up} in
  up) up ;;
  down) down ;;
  *) echo "usage: bash deploy/quickstart.sh [up|down]" >&2; exit 2 ;;
esac
