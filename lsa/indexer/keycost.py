"""What index keys cost: device bytes per token, and the time to score all of them at a refresh.

``python -m lsa.indexer.keycost --tokens 131072 --device cuda --out keycost.json``

For each key form (``pooled``: one key per chunk; ``g1``/``g4``/``g16``: one key per g tokens) and
each backbone shape (SmolLM2-135M, Qwen2.5-Coder-0.5B, Llama-3-8B; 3 target layers, as the
shipped indexers), a randomly initialised :class:`LightningIndexer` with fp8-packed keys encodes a
history of ``--tokens`` tokens; the bytes are those of the packed tensors it returns (what
``LSACache.footprint()`` counts), set against the dense bf16 KV bytes per token, and the refresh
cost is the wall time of one ``score`` over every key of every target layer (median of
``--repeats``, after a warm-up; synchronised on cuda). Weights are random: cost does not depend on
them. The device-bytes budget: index keys + resident KV <= 15% of dense KV at 10%.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from lsa.cli_errors import COUNT, Parser, UsageError, device_option, run_command
from lsa.scorers.lightning import IndexerConfig, LightningIndexer

#: backbone shapes: hidden size, layers, KV heads, head dim, 3 target layers
SHAPES = {
    "smollm2-135m": dict(
        hidden_size=576, num_layers=30, kv_heads=3, kv_head_dim=64, layers=(7, 15, 23)
    ),
    "qwen2.5-coder-0.5b": dict(
        hidden_size=896, num_layers=24, kv_heads=2, kv_head_dim=64, layers=(6, 12, 18)
    ),
    "llama-3-8b": dict(
        hidden_size=4096, num_layers=32, kv_heads=8, kv_head_dim=128, layers=(8, 16, 24)
    ),
}
#: key forms: name -> key_group (None: the pooled tower)
FORMS = {"pooled": None, "g16": 16, "g4": 4, "g1": 1}
CHUNK = 64


def dense_kv_bytes_per_token(shape: dict, itemsize: int = 2) -> int:
    """K and V of every layer, bf16 by default."""
    return 2 * shape["num_layers"] * shape["kv_heads"] * shape["kv_head_dim"] * itemsize


def build(shape: dict, key_group: int | None, device) -> LightningIndexer:
    cfg = IndexerConfig(
        hidden_size=shape["hidden_size"],
        kv_heads=shape["kv_heads"],
        kv_head_dim=shape["kv_head_dim"],
        target_layers=shape["layers"],
        chunk_size=CHUNK,
        key_fp8=True,
        key_group=key_group,
    )
    inv = 1.0 / 10000.0 ** (torch.arange(0, shape["kv_head_dim"], 2).float() / shape["kv_head_dim"])
    return LightningIndexer(cfg, inv).to(device).eval()


@torch.no_grad()
def measure(shape: dict, key_group: int | None, tokens: int, repeats: int, device) -> dict:
    """Bytes and refresh-scoring time of one key form on one backbone shape."""
    idx = build(shape, key_group, device)
    n = tokens // CHUNK
    gen = torch.Generator(device=device).manual_seed(0)
    start = (torch.arange(n, device=device) * CHUNK)[None]
    keys = {}
    for layer in shape["layers"]:  # encoded a slice at a time, as the cache does chunk by chunk
        parts = []
        for a in range(0, n, 256):
            b = min(n, a + 256)
            k = torch.randn(
                1, shape["kv_heads"], (b - a) * CHUNK, shape["kv_head_dim"],
                generator=gen, device=device,
            )  # fmt: skip
            parts.append(idx.encode_chunks(layer, k, start[:, a:b]))
        keys[layer] = torch.cat(parts, 1)
    hidden = {la: torch.randn(1, shape["hidden_size"], device=device) for la in shape["layers"]}
    position = torch.tensor([tokens], device=device)
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    times = []
    for i in range(repeats + 1):
        sync()
        t0 = time.perf_counter()
        logits = idx.score(hidden, position, keys)
        sync()
        if i:  # the first call warms up
            times.append(time.perf_counter() - t0)
    assert logits.shape == (1, n)
    key_bytes = sum(t.untyped_storage().nbytes() for t in keys.values())
    kv = dense_kv_bytes_per_token(shape)
    return {
        "keys_per_chunk": idx.config.keys_per_chunk,
        "index_keys": n * idx.config.keys_per_chunk * len(shape["layers"]),
        "key_bytes": key_bytes,
        "key_bytes_per_token": key_bytes / tokens,
        "dense_kv_bytes_per_token": kv,
        "key_share_of_dense_kv": key_bytes / tokens / kv,
        "score_ms_median": 1e3 * statistics.median(times),
        "score_ms_all": [round(1e3 * t, 3) for t in times],
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tokens", type=COUNT, default=131072, help="history length")
    parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=list(SHAPES))
    parser.add_argument("--forms", nargs="+", choices=list(FORMS), default=list(FORMS))
    parser.add_argument("--repeats", type=COUNT, default=5)
    parser.add_argument("--device", type=device_option, default=None, help="default: cuda if any")
    parser.add_argument("--threads", type=COUNT, default=None, help="torch threads (cpu)")
    parser.add_argument("--out", default=None, help="write the results as JSON here")


def run(args: argparse.Namespace) -> int:
    if args.tokens < CHUNK:
        raise UsageError(f"--tokens must be >= one chunk ({CHUNK}), got {args.tokens}")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    results = {}
    for name in args.shapes:
        for form in args.forms:
            r = measure(SHAPES[name], FORMS[form], args.tokens, args.repeats, device)
            results[f"{name}/{form}"] = r
            print(
                f"{name:20s} {form:6s} {r['key_bytes_per_token']:7.2f} B/token "
                f"({100 * r['key_share_of_dense_kv']:5.2f}% of dense KV "
                f"{r['dense_kv_bytes_per_token']} B)  score {r['score_ms_median']:8.3f} ms",
                flush=True,
            )
    report = {
        "tokens": args.tokens,
        "results": results,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="python -m lsa.indexer.keycost", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run_command(parser.prog, lambda: run(parser.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
