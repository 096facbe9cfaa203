"""``python -m lsa demo``: dense vs sparse attention on random data, as a table.

A self-contained check that the library works on this machine: the sparse output with every chunk
kept matches dense attention, and a 10% budget reads a tenth of the KV.
"""

from __future__ import annotations

import argparse
import math
import time

import torch

import lsa


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seq-len", type=int, default=8192, help="KV length (default 8192)")
    parser.add_argument("--chunk-size", type=int, default=64)
    parser.add_argument("--budget", type=float, default=0.1, help="fraction of chunks kept")
    parser.add_argument("--seed", type=int, default=0)


def _time(fn, repeat: int = 5) -> tuple[torch.Tensor, float]:
    out = fn()
    start = time.perf_counter()
    for _ in range(repeat):
        out = fn()
    return out, (time.perf_counter() - start) / repeat


def run(args: argparse.Namespace) -> int:
    gen = torch.Generator().manual_seed(args.seed)
    b, hq, hkv, d, sq = 1, 8, 2, 64, 1
    q = torch.randn(b, hq, sq, d, generator=gen)
    k = torch.randn(b, hkv, args.seq_len, d, generator=gen)
    v = torch.randn(b, hkv, args.seq_len, d, generator=gen)
    n_chunks = math.ceil(args.seq_len / args.chunk_size)
    scores = torch.randn(b, 1, n_chunks, generator=gen)
    dense, t_dense = _time(lambda: lsa.dense_attention(q, k, v, enable_gqa=True))
    rows = [("dense", 1.0, 0.0, t_dense)]
    for name, budget in (
        ("sparse, keep all", 1.0),
        (f"sparse, budget {args.budget:g}", args.budget),
    ):
        keep = lsa.select_chunks(scores, budget=budget)
        out, t = _time(
            lambda keep=keep: lsa.sparse_attention(
                q, k, v, keep=keep, chunk_size=args.chunk_size, enable_gqa=True
            )
        )
        err = (out - dense).abs().max().item()
        rows.append((name, keep.float().mean().item(), err, t))
    print(
        f"B={b} H_q={hq} H_kv={hkv} S_kv={args.seq_len} D={d} chunk={args.chunk_size} (random data)"
    )
    print(f"| {'method':<22} | kept fraction | max |out - dense| | ms/call |")
    print(f"|{'-' * 24}|---------------|--------------------|---------|")
    for name, kept, err, t in rows:
        print(f"| {name:<22} | {kept:>13.3f} | {err:>18.2e} | {t * 1e3:>7.2f} |")
    return 0
