"""LSACache on CPU with SmolLM2: device-side KV bytes vs a dense DynamicCache, and decode speed.

    python bench/cache_cpu.py --prompt 4096 --new 64 --budget 0.1 [--threads 1] [--json out.json]

On CPU the "device" is the CPU too: the footprint split (reserve vs mirror) is what would sit on
an accelerator vs the host. The scorer is the test stand-in (chunk-mean keys scored with the
layer's real query), not a trained indexer: this measures memory and speed, not accuracy.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch
import transformers
from transformers import DynamicCache

from lsa.cache import LSACache
from lsa.models import load_model
from lsa.scorers.mean_key import MeanKeyScorer


@torch.no_grad()
def greedy(model, ids, cache, new):
    """Prefill, then ``new - 1`` decode steps; returns (tokens [1, new], prefill_s, decode_s)."""
    t0 = time.perf_counter()
    logits = model(ids, cache=cache).logits[:, -1]
    t1 = time.perf_counter()
    tokens = [logits.argmax(-1, keepdim=True)]
    for _ in range(new - 1):
        logits = model(tokens[-1], cache=cache).logits[:, -1]
        tokens.append(logits.argmax(-1, keepdim=True))
    t2 = time.perf_counter()
    return torch.cat(tokens, dim=1), t1 - t0, t2 - t1


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    model, _ = load_model("smollm2", attn_implementation="sdpa")
    cfg = model.config
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(100, cfg.vocab_size, (1, args.prompt), generator=g)
    results = {"prompt": args.prompt, "new_tokens": args.new, "budget": args.budget}

    dense_tokens, pre, dec = greedy(model, ids, DynamicCache(), args.new)
    results["dense"] = {"prefill_s": pre, "decode_tok_s": (args.new - 1) / dec}

    model.set_attn_implementation("lsa")
    layers = tuple(int(x) for x in args.target_layers.split(","))
    scorer = MeanKeyScorer(model, layers, args.chunk)
    cache = LSACache(model, scorer, budget=args.budget, refresh_every=args.tau)
    lsa_tokens, pre, dec = greedy(model, ids, cache, args.new)
    fp = cache.footprint()
    results["lsa"] = {
        "prefill_s": pre,
        "decode_tok_s": (args.new - 1) / dec,
        "refreshes": len(cache.refreshes),
        "recalled_chunks": cache.recall_stats.chunks,
        "same_tokens_as_dense": bool(torch.equal(lsa_tokens, dense_tokens)),
    }
    results["footprint"] = {
        "reserve_bytes": fp.reserve_bytes,
        "tail_bytes": fp.tail_bytes,
        "block_table_bytes": fp.block_table_bytes,
        "chunk_key_bytes": fp.chunk_key_bytes,
        "other_device_bytes": fp.other_device_bytes,
        "device_bytes": fp.device_bytes,
        "host_bytes": fp.host_bytes,
        "dense_bytes": fp.dense_bytes,
        "device_fraction": fp.device_fraction,
        "resident_chunks": fp.resident_chunks,
        "total_chunks": fp.total_chunks,
        "n_slots": cache.n_slots,
    }
    results["env"] = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "loadavg": os.getloadavg(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompt", type=int, default=4096)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--budget", type=float, default=0.1)
    p.add_argument("--tau", type=int, default=64)
    p.add_argument("--chunk", type=int, default=64)
    p.add_argument("--target-layers", default="10,20")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    results = run(args)
    print(json.dumps(results, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
