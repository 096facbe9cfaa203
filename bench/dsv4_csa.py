"""Two-level LSA on DeepSeek-V4-Flash-shaped CSA layers with random weights (one GPU, ~5 min).

    export PYTHONPATH=$PWD
    python -m bench.dsv4_csa                       # 128K, 256K, 512K, 1M tokens on CUDA
    python -m bench.dsv4_csa --tiny                # tiny shapes on CPU (a self-check, seconds)

Shapes (transformers' DeepseekV4Config defaults = V4-Flash): hidden 4096, 64 query heads and one
K=V head of 512 dims, q_lora 1024, lightning indexer 64 heads x 128 dims, top-512, compression
rate 4, sliding window 128, 21 CSA layers per model. Entries are random (no prefill: a 1M-token
prefill is not what is measured), so this measures memory and time, not accuracy.

Per context length and resident budget (the seed's deployed page counts: 96 pages of 64 entries,
192 at 512K, and the 384 quality setting at 1M; the last 32 pages are the recency tail):
- correctness first, or the script stops: the native top-512 over the resident reserve equals
  the top-512 over all entries with non-resident logits at -inf (same logits), and attention
  over the picks equals an fp32 reference over the same entries read from the full history;
- device bytes of CSA KV + index-K for 21 layers, stock (every entry on the device) vs LSA (the
  resident reserve, plus the 3 target layers' full index-K as 132-byte fp8 codes for Level 1),
  from the sizes of real tensors of one layer, in this repo's bf16 layout and in the seed's
  (584 B KV + 132 B index-K per entry);
- time per decode step of one CSA layer (B=1, CUDA events, L2 flushed): the native indexer +
  top-512 over all entries vs over the resident set, and sparse attention over the window + 512
  picks; also the transformers layer forward with the stock cache vs ``LSACSALayer`` (eager
  code: it materialises every resident entry for 64 heads, so it is reported, not optimised);
- recall: ``LSACSALayer.set_resident`` moving to a disjoint resident set (every entry recalled
  from the pinned host mirror), bytes and GB/s, and a batched pinned gather + one H2D copy.
Prints a table last; writes JSON to $OUT (or $LSA_BENCH_OUT) when set.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from bench.common import environment, time_call

CSA = "compressed_sparse_attention"
N_CSA_LAYERS = 21  # V4-Flash: c4 layers 2, 4, ..., 42
N_TARGET_LAYERS = 3  # the seed's released ensemble (c4 index 10, 12, 20)
SEED_KV_BYTES, SEED_INDEX_BYTES = 584, 132  # seed_spec.md §1.2, §1.4
TAIL_PAGES = 32  # LAST_KEEP = 2048 entries


def flash_config(tiny: bool):
    from transformers import DeepseekV4Config

    if not tiny:
        return DeepseekV4Config(num_hidden_layers=1, layer_types=[CSA], mlp_layer_types=["moe"])
    return DeepseekV4Config(
        hidden_size=64, num_hidden_layers=1, layer_types=[CSA], mlp_layer_types=["moe"],
        num_attention_heads=4, head_dim=32, q_lora_rank=32, o_groups=2, o_lora_rank=16,
        index_n_heads=4, index_head_dim=16, index_topk=8, sliding_window=16,
        partial_rotary_factor=0.25, vocab_size=64, n_routed_experts=2, num_experts_per_tok=1,
        moe_intermediate_size=16,
    )  # fmt: skip


def timed(fn, device) -> float:
    """Median seconds per call: CUDA events with L2 flushed (``bench.common.time_call``, a
    warm L2 would favour the small resident set) or wall clock on CPU."""
    return time_call(fn, device)


def native_logits(q, w, index_k, scale):
    """The lightning indexer: sum_h w_h * relu(q_h . k_j) * scale, fp32 [B, N]."""
    dots = torch.relu(torch.einsum("bhd,bnd->bhn", q, index_k).float())
    return (dots * w.float()[..., None]).sum(1) * scale


def sparse_attention(q, window, entries, picks, sinks, scale):
    """One softmax over the window keys, the picked entries and a per-head sink (K = V)."""
    picked = entries.gather(1, picks[..., None].expand(-1, -1, entries.shape[-1]))
    kv = torch.cat([window, picked], 1)  # [B, W + k, D]
    logits = torch.einsum("bhd,bnd->bhn", q.float(), kv.float()) * scale
    logits = torch.cat([logits, sinks.float()[None, :, None].expand(q.shape[0], -1, 1)], -1)
    p = torch.softmax(logits, -1)[..., :-1]
    return torch.einsum("bhn,bnd->bhd", p, kv.float()).to(q.dtype)


def build_layer(cfg, device, dtype):
    from transformers.models.deepseek_v4.modeling_deepseek_v4 import (
        DeepseekV4Attention,
        DeepseekV4RotaryEmbedding,
    )

    torch.manual_seed(0)
    attn = DeepseekV4Attention(cfg, 0)
    with torch.no_grad():
        for p in attn.parameters():
            p.normal_(0, 0.02)
    return attn.to(device, dtype).eval(), DeepseekV4RotaryEmbedding(cfg).to(device)


def filled_caches(cfg, n, device, dtype, gen):
    """A stock cache and an LSA cache holding the same ``n`` random entries, a full window and
    one buffered token (so the timed step writes no new entry)."""
    from transformers import DynamicCache

    from lsa.deepseek_v4.cache import LSACSALayer

    d, di, w = cfg.head_dim, cfg.index_head_dim, cfg.sliding_window
    kv = torch.nn.functional.normalize(torch.randn(1, n, d, generator=gen), dim=-1) * d**0.5
    ik = torch.randn(1, n, di, generator=gen)
    window = torch.randn(1, 1, w - 1, d, generator=gen)
    caches = []
    for lsa in (False, True):
        cache = DynamicCache(config=cfg)
        layer = LSACSALayer(cfg, False, None) if lsa else cache.layers[0]
        cache.layers[0] = layer
        layer.lazy_initialization(window.to(device, dtype), window.to(device, dtype))
        layer.keys = window.to(device, dtype)
        layer.values = layer.keys
        layer.cumulative_length = 4 * n + 1
        for name, t in (("compressor", kv), ("indexer", ik)):
            if lsa:  # from the device, as in decoding: the mirror is then pinned on CUDA
                layer.mirror[name].append(t.to(device, dtype))
            layer.compressed_kv[name] = t.to(device, dtype)
            layer.entry_count[name] = n
            width = 2 * (d if name == "compressor" else di)
            layer.buffer_kv[name] = torch.zeros(1, 1, width, device=device, dtype=dtype)
            layer.buffer_gate[name] = torch.zeros(1, 1, width, device=device, dtype=dtype)
        caches.append(cache)
    return caches, kv, ik


def resident_ids(n_entries, pages, page, tail, gen, device):
    """``pages`` pages: the last ``tail`` (recency) plus random others; entry ids [1, K]."""
    n_pages = n_entries // page
    tail = min(tail, pages)
    others = torch.randperm(n_pages - tail, generator=gen)[: pages - tail]
    chosen = torch.cat([others, torch.arange(n_pages - tail, n_pages)]).sort().values
    ids = (chosen[:, None] * page + torch.arange(page)).flatten()
    return ids[None].to(device)


def run_point(args, cfg, attn, rotary, tokens, pages, device, dtype) -> dict:
    gen = torch.Generator().manual_seed(tokens)
    n = tokens // cfg.compress_rates[CSA]
    page = args.page
    pages = min(pages, n // page)
    (stock, lsa), kv_cpu, _ = filled_caches(cfg, n, device, dtype, gen)
    layer = lsa.layers[0]
    ids = resident_ids(n, pages, page, args.tail_pages, gen, device)
    layer.set_resident(ids)
    k_res = ids.shape[1]
    full_kv, full_ik = (
        stock.layers[0].compressed_kv["compressor"],
        stock.layers[0].compressed_kv["indexer"],
    )
    res_kv, res_ik = layer.compressed_kv["compressor"], layer.compressed_kv["indexer"]
    assert torch.equal(res_kv, full_kv[:, ids[0]]) and torch.equal(res_ik, full_ik[:, ids[0]])

    # --- correctness: restricted top-k and attention over the picks ------------------------
    h, di, topk = cfg.index_n_heads, cfg.index_head_dim, cfg.index_topk
    q_idx = torch.randn(1, h, di, generator=gen).to(device, dtype)
    w_idx = torch.randn(1, h, generator=gen).to(device, dtype)
    scale = di**-0.5 * h**-0.5
    all_logits = native_logits(q_idx, w_idx, full_ik, scale)
    res_logits = native_logits(q_idx, w_idx, res_ik, scale)
    masked = torch.full_like(all_logits, float("-inf"))
    masked[:, ids[0]] = all_logits[:, ids[0]]
    k = min(topk, k_res)
    want = masked.topk(k).values.sort(-1).values
    picks = res_logits.topk(k).indices
    got = all_logits.gather(1, ids.gather(1, picks)).sort(-1).values
    topk_ok = torch.allclose(got, want, rtol=1e-3, atol=1e-3)
    q = torch.randn(1, cfg.num_attention_heads, cfg.head_dim, generator=gen).to(device, dtype)
    window = stock.layers[0].keys[:, 0]
    sinks = torch.zeros(cfg.num_attention_heads, device=device)
    out = sparse_attention(q, window, res_kv, picks, sinks, cfg.head_dim**-0.5)
    ref = sparse_attention(
        q.float(),
        window.float(),
        kv_cpu.to(device).float(),
        ids.gather(1, picks),
        sinks,
        cfg.head_dim**-0.5,
    )
    attn_err = float((out.float() - ref).abs().max())
    attn_ok = attn_err < 2e-2 * float(ref.abs().max()) + 1e-3
    if not (topk_ok and attn_ok):
        raise SystemExit(
            f"correctness check failed at {tokens} tokens: top-k {topk_ok}, "
            f"attention error {attn_err}"
        )

    # --- bytes -------------------------------------------------------------------------------
    def nbytes(t):
        return t.numel() * t.element_size()

    per_layer_stock = nbytes(full_kv) + nbytes(full_ik)
    per_layer_lsa = nbytes(res_kv) + nbytes(res_ik)
    codes = n * (di + 4)  # the target layers' Level-1 keys (encode_index_keys)
    row = {
        "tokens": tokens,
        "entries": n,
        "resident_pages": pages,
        "resident_entries": k_res,
        "resident_fraction": k_res / n,
        "device_bytes_stock_bf16": N_CSA_LAYERS * per_layer_stock,
        "device_bytes_lsa_bf16": N_CSA_LAYERS * per_layer_lsa + N_TARGET_LAYERS * codes,
        "device_bytes_stock_seed_format": N_CSA_LAYERS * n * (SEED_KV_BYTES + SEED_INDEX_BYTES),
        "device_bytes_lsa_seed_format": N_CSA_LAYERS * k_res * (SEED_KV_BYTES + SEED_INDEX_BYTES)
        + N_TARGET_LAYERS * n * SEED_INDEX_BYTES,
        "check_topk": topk_ok,
        "check_attention_max_error": attn_err,
    }

    # --- time per decode step of one layer -------------------------------------------------
    row["s_indexer_all"] = timed(
        lambda: native_logits(q_idx, w_idx, full_ik, scale).topk(k), device
    )
    row["s_indexer_resident"] = timed(
        lambda: native_logits(q_idx, w_idx, res_ik, scale).topk(k), device
    )
    row["s_attention_picks"] = timed(
        lambda: sparse_attention(q, window, res_kv, picks, sinks, cfg.head_dim**-0.5), device
    )
    row["s_step_stock"] = row["s_indexer_all"] + row["s_attention_picks"]
    row["s_step_lsa"] = row["s_indexer_resident"] + row["s_attention_picks"]

    if not args.skip_hf:
        x = torch.randn(1, 1, cfg.hidden_size, generator=gen).to(device, dtype)
        pos = torch.tensor([[4 * n + 1]], device=device)
        emb = {
            "compress": rotary(x, pos, layer_type="compress"),
            "main": rotary(x, pos, layer_type="main"),
        }
        mask = torch.zeros(1, 1, 1, cfg.sliding_window, device=device, dtype=dtype)

        def hf_step(cache):
            snapshot = (cache.layers[0].keys, cache.layers[0].cumulative_length)
            with torch.no_grad():
                attn(x, emb, pos, mask, cache)
            cache.layers[0].keys, cache.layers[0].cumulative_length = (
                snapshot  # same state each call
            )
            cache.layers[0].values = cache.layers[0].keys
            for name in ("compressor", "indexer"):  # drop the buffered token again
                cache.layers[0].buffer_kv[name] = cache.layers[0].buffer_kv[name][:, :1]
                cache.layers[0].buffer_gate[name] = cache.layers[0].buffer_gate[name][:, :1]

        for key, cache in (("s_hf_layer_stock", stock), ("s_hf_layer_lsa", lsa)):
            try:
                row[key] = timed(lambda c=cache: hf_step(c), device)
            except torch.OutOfMemoryError:
                row[key] = "OOM"
                torch.cuda.empty_cache()

    # --- recall ------------------------------------------------------------------------------
    other = resident_ids(
        n, pages, page, args.tail_pages, torch.Generator().manual_seed(tokens + 1), device
    )
    fresh = other[:, ~torch.isin(other[0], ids[0])]
    if fresh.shape[1]:

        def recall():
            layer.set_resident(ids)  # untimed: back to the first set...
            layer.recalled_bytes = 0
            if device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            moved = layer.set_resident(fresh)  # ...then a set none of whose entries is resident
            if device.type == "cuda":
                torch.cuda.synchronize()
            return moved, time.perf_counter() - t

        recall()
        results = [recall() for _ in range(3)]
        moved = results[0][0]
        seconds = statistics.median(r[1] for r in results)
        row.update(
            recall_entries=fresh.shape[1],
            recall_bytes=moved,
            recall_s=seconds,
            recall_GBps=moved / seconds / 1e9,
        )
        # a batched pinned gather + one H2D copy of the same bytes, the transfer floor
        src = layer.mirror["compressor"].view()[0]
        idx = fresh[0].cpu()
        staging = torch.empty(
            (idx.numel(), src.shape[-1]), dtype=src.dtype, pin_memory=device.type == "cuda"
        )
        dst = torch.empty_like(staging, device=device)

        def gather_copy():
            torch.index_select(src, 0, idx, out=staging)
            dst.copy_(staging, non_blocking=True)

        s = timed(gather_copy, device)
        row["pinned_gather_h2d_GBps"] = nbytes(staging) / s / 1e9
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny shapes on CPU (self-check)")
    parser.add_argument("--tokens", type=int, nargs="+", default=None)
    parser.add_argument("--page", type=int, default=None, help="entries per page (64)")
    parser.add_argument("--tail-pages", type=int, default=None, help="recency pages (32)")
    parser.add_argument(
        "--skip-hf", action="store_true", help="skip the transformers layer forward"
    )
    args = parser.parse_args()
    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    dtype = torch.float32 if args.tiny else torch.bfloat16
    if args.tiny:
        torch.set_num_threads(1)
    cfg = flash_config(args.tiny)
    args.page = args.page or (4 if args.tiny else 64)
    args.tail_pages = (
        args.tail_pages if args.tail_pages is not None else 2 if args.tiny else TAIL_PAGES
    )
    cfg._attn_implementation = "eager"  # V4 is eager-only; a standalone layer must be told
    points = (
        [(t, p) for t in (args.tokens or [1024, 4096]) for p in (8, 16)]
        if args.tiny
        else [(t, p) for t in (args.tokens or [131072, 262144, 524288, 1048576])
              for p in ((96, 384) if t == 1048576 else (192,) if t == 524288 else (96,))]
    )  # fmt: skip
    attn, rotary = build_layer(cfg, device, dtype)
    rows = []
    for tokens, pages in points:
        print(f"{tokens} tokens, {pages} resident pages ...", flush=True)
        rows.append(run_point(args, cfg, attn, rotary, tokens, pages, device, dtype))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    import transformers

    env = environment() | {
        "transformers": transformers.__version__,
        "tiny": args.tiny,
        "page": args.page,
    }
    out = os.environ.get("OUT") or os.environ.get("LSA_BENCH_OUT")
    if out:
        path = Path(out) / f"dsv4_csa-{'tiny' if args.tiny else device.type}.json"
        path.write_text(json.dumps({"environment": env, "rows": rows}, indent=1, default=str))
        print(f"wrote {path}")
    print()
    where = env.get("gpu", env["cpu"])
    print(f"{where}, torch {env['torch']}, transformers {env['transformers']}, B=1, 21 CSA layers")
    print(
        "| tokens | resident | device GB stock -> LSA (bf16) | seed format "
        "| indexer ms all -> resident | attention ms | HF layer ms stock -> LSA "
        "| recall GB/s (floor) |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(table_row(r))


def _ms(value) -> str:
    return "-" if value is None else value if isinstance(value, str) else f"{value * 1e3:.3f}"


def table_row(r: dict) -> str:
    gb = {k: r[k] / 1e9 for k in r if k.startswith("device_bytes")}
    return (
        f"| {r['tokens']} | {r['resident_entries']} ({100 * r['resident_fraction']:.1f}%) | "
        f"{gb['device_bytes_stock_bf16']:.3f} -> {gb['device_bytes_lsa_bf16']:.3f} | "
        f"{gb['device_bytes_stock_seed_format']:.3f} -> {gb['device_bytes_lsa_seed_format']:.3f} | "
        f"{_ms(r.get('s_indexer_all'))} -> {_ms(r.get('s_indexer_resident'))} | "
        f"{_ms(r.get('s_attention_picks'))} | "
        f"{_ms(r.get('s_hf_layer_stock'))} -> {_ms(r.get('s_hf_layer_lsa'))} | "
        f"{r.get('recall_GBps', 0):.3f} ({r.get('pinned_gather_h2d_GBps', 0):.3f}) |"
    )


if __name__ == "__main__":
    main()
