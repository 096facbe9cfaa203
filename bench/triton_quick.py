"""Quick H200 check of the triton reserve backend before the full suite (well under a minute).

    export PYTHONPATH=$PWD; python -m bench.triton_quick [--out DIR]

Decode at S_kv = 512K, Hq = 32, Hkv = 8, D = 128, bf16, chunk 64, 10% of chunks kept (sink +
recent + scattered), B = 1 and 8: checks the kernel against the fp32 reference on a slice, then
times it (CUDA events, L2 flushed, median; eager and CUDA-graph replay) next to SDPA over the same
compacted reserve, for the default split count and a few others. Prints one line per row and, with
--out, writes them as JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

import lsa
from bench.common import copy_bandwidth, environment, time_call, time_graph
from lsa.compiled import triton_decode
from lsa.reference.reserve import reference_reserve_attention

K = 1024


def make_reserve(batch: int, len_kv: int, chunk: int, heads_q=32, heads_kv=8, dim=128):
    """Queries and a reserve that holds 10% of the chunks of a len_kv cache, in ascending slots,
    with the same kept set per row (as bench/test_decode.py)."""
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    n_chunks = len_kv // chunk
    scores = torch.rand(batch, 1, n_chunks, generator=gen, device=dev)
    keep = lsa.select_chunks(scores, budget=0.1, sink_chunks=1, recent_chunks=1)
    n_keep = int(keep[0, 0].sum())
    ids = torch.where(keep, torch.arange(n_chunks, device=dev), -1)
    table = torch.sort(ids, -1).values[..., -n_keep:].contiguous()
    shape = (batch, heads_kv, n_keep * chunk, dim)
    k = torch.randn(shape, generator=gen, device=dev, dtype=torch.bfloat16)
    v = torch.randn(shape, generator=gen, device=dev, dtype=torch.bfloat16)
    q = torch.randn(batch, heads_q, 1, dim, generator=gen, device=dev, dtype=torch.bfloat16)
    kv_len = torch.full((batch,), len_kv, device=dev, dtype=torch.int64)
    return q, k, v, table, kv_len


def rel_err(out, q, k, v, table, kv_len, chunk) -> float:
    """Against the fp32 reference on batch row 0 and KV heads 0-1 (their 8 query heads)."""
    ref = reference_reserve_attention(
        q[:1, :8].float(),
        k[:1, :2].float(),
        v[:1, :2].float(),
        table[:1],
        kv_len[:1],
        chunk_size=chunk,
    )
    got = out[:1, :8].float()
    return ((got - ref).norm() / ref.norm()).item()


def bench_batch(batch: int, len_kv: int, chunk: int, bw: float) -> list[dict]:
    """Rows for one batch size: the triton kernel at several split counts, then SDPA."""
    dev = torch.device("cuda")
    q, k, v, table, kv_len = make_reserve(batch, len_kv, chunk)
    floor = 2 * k.numel() * k.element_size() / bw  # kept K and V bytes / copy bandwidth
    resident = triton_decode.resident_programs(chunk, 128, 2)
    auto = triton_decode.num_splits(batch * 8, table.shape[2], chunk, dev, resident)

    def run(splits):
        return lambda: triton_decode.triton_reserve_attention(
            q, k, v, table, kv_len, chunk_size=chunk, splits=splits
        )

    cases = {f"triton splits={auto} (auto)": run(None)}
    for s in sorted({max(1, auto // 2), auto * 2} - {auto}):
        cases[f"triton splits={s}"] = run(s)
    cases["sdpa compacted (no mask)"] = lambda: F.scaled_dot_product_attention(
        q, k, v, enable_gqa=True
    )
    rows = []
    for name, fn in cases.items():
        err = rel_err(fn(), q, k, v, table, kv_len, chunk)
        eager = time_call(fn, dev)
        graph = time_graph(fn, dev)
        rows.append(
            {
                "batch": batch,
                "len_kv": len_kv,
                "chunk": chunk,
                "method": name,
                "rel_err": err,
                "ok": err < 1e-2,
                "floor_us": floor * 1e6,
                "us": eager * 1e6,
                "graph_us": graph * 1e6,
                "x_floor": eager / floor,
                "graph_x_floor": graph / floor,
            }
        )
        r = rows[-1]
        print(
            f"B={batch} {len_kv // K}K c{chunk} {name:28s} err {err:.1e} "
            f"{'ok ' if r['ok'] else 'BAD'} floor {r['floor_us']:6.1f} us | eager {r['us']:7.1f} "
            f"us ({r['x_floor']:.2f}x) | graph {r['graph_us']:7.1f} us ({r['graph_x_floor']:.2f}x)"
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="directory for triton_quick.json")
    parser.add_argument("--len-kv", type=int, default=512 * K)
    parser.add_argument("--chunk", type=int, default=64)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench.triton_quick needs CUDA")
    bw = copy_bandwidth(torch.device("cuda"), 1 << 30)
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {bw / 1e9:.0f} GB/s (read+write)")
    rows = []
    for batch in (1, 8):
        rows += bench_batch(batch, args.len_kv, args.chunk, bw)
        torch.cuda.empty_cache()
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        payload = {"environment": environment(), "copy_gbps": bw / 1e9, "rows": rows}
        (args.out / "triton_quick.json").write_text(json.dumps(payload, indent=1))
    if not all(r["ok"] for r in rows):
        raise SystemExit("triton_quick: a result did not match the reference (rel err >= 1e-2)")


if __name__ == "__main__":
    main()
