"""Where a refresh's time goes in the captured decode loop: each stage of the refresh and of a
lagged placement, timed alone (device synchronised before and after it), on the model and cache
of bench/decode_e2e.py.

    PYTHONPATH=$PWD python -m bench.refresh_breakdown --layers 32 --length 131072 --lag 8
    python -m bench.refresh_breakdown --device cpu --small --layers 2 --length 1024 --new 40

The synchronisations change the loop's overlap, so the sum is not the loop's cost: the
end-to-end share is bench/decode_e2e.py's (lsa_graph rows against lsa_graph_no_refresh).
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import torch

import lsa
from bench.cache_h200 import SHAPES, SMALL, build_model
from bench.common import write_results
from bench.decode_e2e import lsa_cache, sync
from lsa.cache import LSACache
from lsa.cache.static import StaticDecode
from lsa.generation import GenerateStats

#: (class, method) pairs timed one call at a time
STAGES = (
    (LSACache, "_mirror_partial"),
    (LSACache, "_select"),
    (LSACache, "_fetch_ahead"),
    (LSACache, "_move"),
    (LSACache, "_scatter_staged"),
    (LSACache, "_recall"),
    (LSACache, "_push_block_table"),
    (LSACache, "_complete_chunks"),
    (StaticDecode, "_push_rows"),
)


@torch.no_grad()
def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--length", type=int, default=131072)
    p.add_argument("--new", type=int, default=256)
    p.add_argument("--budget", type=float, default=0.1)
    p.add_argument("--chunk", type=int, default=64)
    p.add_argument("--tau", type=int, default=64)
    p.add_argument("--lag", type=int, default=8)
    p.add_argument("--device", default="cuda")
    p.add_argument("--small", action="store_true")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build_model(
        args.layers, args.length + args.new + 64, SMALL if args.small else SHAPES, device, dtype
    )
    model.set_attn_implementation("lsa")
    ids = torch.randint(0, model.config.vocab_size, (1, args.length), device=device)
    spent: dict[str, list[float]] = defaultdict(list)
    originals = []
    for owner, name in STAGES:
        inner = getattr(owner, name)
        originals.append((owner, name, inner))

        def timed(self, *a, _inner=inner, _name=name, **kw):
            sync(device)
            t0 = time.perf_counter()
            out = _inner(self, *a, **kw)
            sync(device)
            spent[_name].append(time.perf_counter() - t0)
            return out

        setattr(owner, name, timed)
    try:
        cache = lsa_cache(model, args, recall_lag=args.lag)
        stats = GenerateStats()
        lsa.generate(model, ids, cache=cache, max_new_tokens=args.new, stats=stats)
    finally:
        for owner, name, inner in originals:
            setattr(owner, name, inner)
    rows = [
        {"stage": name, "calls": len(t), "ms_total": 1e3 * sum(t), "ms_max": 1e3 * max(t)}
        for name, t in spent.items()
    ]
    later = cache.refreshes[1:]
    extra = {
        "args": vars(args),
        "refreshes": stats.refreshes,
        "recalled_bytes_per_refresh": sum(r.recalled_bytes for r in later) / max(len(later), 1),
        "ms_per_token_with_syncs": 1e3 * stats.decode_s / max(stats.steps, 1),
    }
    write_results(f"refresh-breakdown-{args.layers}l-{args.length}", rows, extra)
    print(
        f"refreshes {stats.refreshes}, recalled {extra['recalled_bytes_per_refresh'] / 2**20:.0f} "
        "MiB per refresh after the prefill's"
    )
    print(f"{'stage':<20} {'calls':>5} {'ms total':>9} {'ms max':>8}")
    for r in sorted(rows, key=lambda r: -r["ms_total"]):
        print(f"{r['stage']:<20} {r['calls']:>5} {r['ms_total']:9.2f} {r['ms_max']:8.2f}")


if __name__ == "__main__":
    main()
