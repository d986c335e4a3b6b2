#!/usr/bin/env python3
"""Writes the seed corpora of `agent_request` and `controller_request`: a
few valid requests of each kind, encoded as the targets read them (one
selector byte, then the protobuf message, or for what the store holds, its
JSON). Field numbers follow proto/halo/v1/*.proto. Run from anywhere:
`python3 tests/fuzz_seeds.py`; it rewrites the seed-* files of
agent/fuzz/corpus/agent_request and controller/fuzz/corpus/controller_request."""

import json
import os
import struct

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FUZZ = {"agent_request": "agent", "controller_request": "controller"}


def varint(n):
    out = bytearray()
    n &= (1 << 64) - 1
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def msg(*fields):
    """fields: (number, value); int -> varint, bytes/str -> length-delimited,
    float -> fixed64 double, list of ints -> packed varints, None -> skipped."""
    out = bytearray()
    for num, v in fields:
        if v is None:
            continue
        if isinstance(v, bool) or isinstance(v, int):
            out += varint(num << 3) + varint(int(v))
        elif isinstance(v, float):
            out += varint(num << 3 | 1) + struct.pack("<d", v)
        elif isinstance(v, (bytes, str)):
            b = v.encode() if isinstance(v, str) else v
            out += varint(num << 3 | 2) + varint(len(b)) + b
        elif isinstance(v, list):
            packed = b"".join(varint(x) for x in v)
            out += varint(num << 3 | 2) + varint(len(packed)) + packed
        else:
            raise TypeError(v)
    return bytes(out)


def write(target, name, selector, body):
    d = os.path.join(REPO, FUZZ[target], "fuzz", "corpus", target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "seed-" + name), "wb") as f:
        f.write(bytes([selector]) + body)


def options(**o):
    return msg(
        (1, o.get("context_size")), (2, o.get("parallel")),
        (3, o.get("cache_type_k")), (4, o.get("cache_type_v")),
        (5, o.get("flash_attention")), (6, o.get("gpu_layers")),
        (7, o.get("threads")), (8, o.get("batch_size")),
        (9, o.get("ubatch_size")), (10, o.get("alias")),
        *[(11, f) for f in o.get("extra_flags", [])],
        (12, o.get("allow_context_over_trained")),
        *[(13, a) for a in o.get("rpc_servers", [])],
        (14, o.get("tensor_split")), (15, o.get("rpc_client")),
    )


def agent():
    t = "agent_request"
    write(t, "get-node", 0, b"")
    write(t, "get-memory", 1, b"")
    write(t, "list-models-rescan", 2, msg((1, True)))
    write(t, "list-instances", 3, b"")
    llama_opts = options(
        context_size=32768, parallel=2, cache_type_k=3, cache_type_v=3,
        flash_attention=True, gpu_layers=999, threads=8, batch_size=2048,
        ubatch_size=512, alias="qwen3-coder-30b", extra_flags=["--jinja"],
        rpc_servers=["10.0.0.2:50052", "[fd7a:115c::2]:50052"],
        tensor_split=[1, 1, 3])
    write(t, "start-llama-server", 4, msg(
        (1, "halo.qwen3-coder-30b.r0.g3"),
        (2, "qwen3/Qwen3-Coder-30B-Q4_K_M-00001-of-00002.gguf"),
        (3, llama_opts), (4, 3), (5, 17), (6, 1)))
    write(t, "start-rpc-server", 4, msg(
        (1, "halo.big.r0s1.g2"), (3, options(threads=4, rpc_client="10.0.0.1")),
        (4, 2), (5, 9), (6, 2)))
    write(t, "start-minimal", 4, msg((1, "req-1"), (2, "tiny.gguf")))
    write(t, "stop", 5, msg((1, "i-0123456789abcdef"), (2, 17)))
    write(t, "watch", 6, msg((1, 1000)))
    write(t, "tail-logs", 7, msg((1, "i-0123456789abcdef"), (2, 100), (3, True)))
    write(t, "project-memory", 8, msg(
        (1, "qwen3/Qwen3-Coder-30B-Q4_K_M-00001-of-00002.gguf"), (2, 32768),
        (3, 2), (4, 3), (5, 3), (6, True), (7, 2048), (8, 512)))


def share(node, host, layers):
    w = layers << 30
    return msg((1, node), (2, host), (3, layers), (4, w), (5, 1 << 28),
               (6, 1 << 27), (7, (1 << 26) if host else 0),
               (8, w + (1 << 29)), (9, 1 << 29), (10, 100 << 30), (11, layers))


def placement(split):
    name = "big" if split else "qwen3-coder-30b"
    opts = options(context_size=32768, parallel=2, cache_type_k=3,
                   cache_type_v=1, alias="qwen3-coder-30b",
                   extra_flags=["--jinja"])
    replicas = [(0, "strix-2", 2)] if split else [(0, "strix-1", 3), (1, "strix-2", 1)]
    fields = [(1, name), (2, "code"), (3, "qwen3-coder-30b"),
              (4, "qwen3/coder.gguf"), (5, None if split else "strix-1"),
              (6, opts), (7, 20 << 30), (8, 5)]
    fields += [(9, msg((1, i), (2, n), (3, g), (4, f"halo.{name}.r{i}.g{g}")))
               for i, n, g in replicas]
    if split:
        fields.append((11, msg((1, share("strix-1", False, 30)),
                               (1, share("strix-2", True, 34)),
                               (2, 32768), (3, "split: no single node fits"))))
    return msg(*fields)


def stored_placement(split):
    p = {
        "name": "big" if split else "qwen3-coder-30b", "role": "code",
        "model": "qwen3-coder-30b", "model_id": "qwen3/coder.gguf",
        "pinned_node": None if split else "strix-1",
        "options": {"context_size": 32768, "parallel": 2,
                    "cache_type_k": "q8_0", "cache_type_v": "f16",
                    "extra_flags": ["--jinja"]},
        "estimate_bytes": 20 << 30, "priority": 5,
        "replicas": [{"index": 0, "node": "strix-1", "generation": 3}],
        "paused": False, "split": None,
    }
    if split:
        s = lambda node, host, layers: {
            "node": node, "host": host, "layers": layers,
            "weights_bytes": layers << 30, "kv_bytes": 1 << 28,
            "compute_bytes": 1 << 27, "output_bytes": (1 << 26) if host else 0,
            "total_bytes": (layers << 30) + (1 << 29), "margin_bytes": 1 << 29,
            "free_bytes": 100 << 30, "tensor_split": layers}
        p["split"] = {"shares": [s("strix-1", False, 30), s("strix-2", True, 34)],
                      "traffic_bytes_per_token": 32768,
                      "notes": ["split: no single node fits"]}
    return json.dumps(p).encode()


def controller():
    t = "controller_request"
    write(t, "list-nodes", 0, b"")
    write(t, "list-catalog", 1, b"")
    entry = msg((1, "qwen3-coder-30b"), (2, "qwen3/coder.gguf"), (3, 32768),
                (4, 3), (5, 1), (6, "--jinja"), (7, 5), (8, [2, 1]),
                (12, 4096), (13, 2), (14, True))
    write(t, "put-catalog-entry", 2, msg((1, entry)))
    write(t, "list-placements", 3, b"")
    write(t, "plan", 4, msg((1, "qwen3-coder-30b"), (2, [8192, 32768]), (3, "strix-1")))
    write(t, "place", 5, msg((1, "code"), (2, "qwen3-coder-30b"), (3, 32768),
                             (4, "strix-1"), (5, 2), (6, True), (7, True),
                             (10, "coder"), (12, True), (13, 2)))
    write(t, "unplace", 6, msg((1, "coder")))
    write(t, "endpoints", 7, b"")
    write(t, "watch-events", 8, msg((1, True), (2, 10)))
    write(t, "placement-logs", 9, msg((1, "coder"), (2, 1), (3, 50), (4, True)))
    write(t, "placement", 10, placement(False))
    write(t, "placement-split", 10, placement(True))
    write(t, "stored-placement", 11, stored_placement(False))
    write(t, "stored-placement-split", 11, stored_placement(True))
    write(t, "routes", 12, b"")
    write(t, "create-key", 13, msg((1, "laptop"), (2, [1, 2]), (3, "qwen3-coder-30b"),
                                   (4, 90)))
    write(t, "list-keys", 14, b"")
    write(t, "revoke-key", 15, msg((1, "laptop")))
    write(t, "stored-key", 16, json.dumps({
        "name": "laptop", "sha256": "ab" * 32, "modes": ["ask", "code"],
        "models": ["qwen3-coder-30b"], "created_unix_ms": 1772366400000,
        "expires_unix_ms": 1780142400000}).encode())
    write(t, "stored-catalog-entry", 17, json.dumps({
        "name": "qwen3-coder-30b", "model_id": "qwen3/coder.gguf",
        "default_context": 32768, "min_context": 4096, "cache_type_k": "q8_0",
        "cache_type_v": "f16", "extra_flags": ["--jinja"], "priority": 5,
        "modes": ["code", "ask"], "parallel": 2, "allow_split": True}).encode())
    setup = msg((1, "qwen3-coder-30b"), (2, "qwen3/coder.gguf"), (3, 34359738368),
                (4, "strix-1"), (5, "version: 6500 (abc1234)"), (6, 65536), (7, 2),
                (8, "q8_0"), (9, "q8_0"), (10, "on"), (11, 0),
                (12, "http://100.64.0.5:8080"), (13, 2))
    point = msg((1, 16384), (2, 2), (3, 512), (4, 128), (5, 3),
                (6, 433.1), (7, 420.0), (8, 442.0), (9, 47.1), (10, 46.6), (11, 47.5),
                (12, 2480.0), (13, 2232.0), (14, 2976.0))
    result = msg((1, setup), (2, "qwen3-coder-30b"), (3, 1780000000000), (4, point))
    write(t, "put-bench-result", 18, msg((1, result)))
    write(t, "list-bench-results", 19, msg((1, "qwen3-coder-30b")))


if __name__ == "__main__":
    agent()
    controller()
