"""LSACache on one CUDA GPU with a random Llama-shaped model, against DynamicCache + SDPA.

    export PYTHONPATH=$PWD LSA_BENCH_OUT=$OUT
    python -m bench.cache_h200 --layers 4 --lengths 131072 524288 --new 130 --budget 0.1

    python -m bench.cache_h200 --device cpu --small --layers 2 --lengths 2048 --new 40   # debug

The model has Llama-3-8B's layer shapes (hidden 4096, 32 query / 8 KV heads of 128, MLP 14336,
bf16) and random weights, with fewer layers so that 512K-token prefills fit a short device lease;
every figure is also given per layer. The scorer is the test stand-in (chunk-mean keys against
the layer's real query): this measures memory, speed and recall, not accuracy.

Per prompt length, for dense (sdpa + DynamicCache) and LSA (budget 10%, the cache's default
decode path: SDPA over the compacted reserve):
- correctness first: after two decode steps, layer 0's decode attention over the reserve must
  equal the fp32 reference over the mirror's full history with the same resident chunks, or the
  script stops before timing anything;
- KV bytes on the device (LSA: ``footprint()``, real storage), peak allocated memory over the
  weights during the prefill and during decoding;
- attention time per decode step summed over layers (CUDA events, L2 flushed): SDPA over the full
  cache vs the cache's decode attention over its reserve;
- decode tokens/s (wall clock per greedy step after the prefill, median over steps that issue no
  refresh) and the steps that issue one;
- recall: bytes, copies and side-stream time of the generation's refreshes (bandwidth), a
  standalone recall of the whole kept set on an idle GPU (bandwidth), and the share of a recall
  hidden behind decoding: ``(t_recall + t_decode - t_both) / t_recall`` where ``t_both`` is the
  wall time of a recall issued just before ``--overlap-steps`` decode steps (medians of repeats).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import transformers
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

import lsa
from bench.common import time_call, write_results
from lsa.cache import LSACache
from lsa.cache.zero_copy import zero_copy_unavailable
from lsa.scorers.mean_key import MeanKeyScorer

# Llama-3-8B layer shapes; --small shrinks them for a CPU smoke run of this script.
SHAPES = {"hidden": 4096, "mlp": 14336, "heads": 32, "kv_heads": 8, "head_dim": 128}
SMALL = {"hidden": 256, "mlp": 512, "heads": 4, "kv_heads": 2, "head_dim": 64}


def build_model(layers: int, max_len: int, shapes: dict, device, dtype) -> LlamaForCausalLM:
    config = LlamaConfig(
        hidden_size=shapes["hidden"],
        intermediate_size=shapes["mlp"],
        num_attention_heads=shapes["heads"],
        num_key_value_heads=shapes["kv_heads"],
        head_dim=shapes["head_dim"],
        num_hidden_layers=layers,
        vocab_size=32000,
        max_position_embeddings=max_len,
        rope_theta=500000.0,
    )
    with device:
        return LlamaForCausalLM(config).to(dtype).eval()


class Bench:
    def __init__(self, device: torch.device) -> None:
        self.device = device

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def reset_peak(self) -> int:
        if self.device.type != "cuda":
            return 0
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        return torch.cuda.memory_allocated(self.device)

    def peak(self) -> int:
        return torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else 0

    def prefill(self, model, ids, cache) -> tuple[torch.Tensor, float]:
        self.sync()
        t0 = time.perf_counter()
        tok = model(ids, past_key_values=cache, logits_to_keep=1).logits[:, -1].argmax(-1)
        self.sync()
        return tok[:, None], time.perf_counter() - t0

    def steps(self, model, tok, cache, n: int) -> tuple[torch.Tensor, list[float]]:
        """n greedy decode steps; wall seconds of each (the argmax syncs, as generate() does)."""
        times = []
        for _ in range(n):
            t = time.perf_counter()
            tok = model(tok, past_key_values=cache).logits[:, -1].argmax(-1, keepdim=True)
            self.sync()
            times.append(time.perf_counter() - t)
        return tok, times

    def attention_seconds(self, fn, layers) -> float:
        return sum(time_call(lambda layer=layer: fn(layer), self.device) for layer in layers)


def check_cache_attention(cache: LSACache, q: torch.Tensor, scale: float) -> float:
    """Layer 0: the cache's decode attention over its reserve vs the fp32 reference over the
    mirror's full history with keep = the resident chunks. Returns the relative error (raises
    above 2%: bf16 inputs, fp32 reference)."""
    layer = cache.layers[0]
    b, h, n_slots, cs, d = layer.reserve_k.shape
    rk = layer.reserve_k.view(b, h, n_slots * cs, d)
    rv = layer.reserve_v.view(b, h, n_slots * cs, d)
    out = cache._decode_attention(q, rk, rv, scale).transpose(1, 2)  # [B, H_q, 1, D]
    worst = 0.0
    for row, (k, v) in enumerate(cache.mirror_kv(0)):
        keep = torch.zeros(-(-k.shape[1] // cs), dtype=torch.bool)
        keep[cache.resident_chunks()[row]] = True
        ref = lsa.sparse_attention(
            q[row : row + 1].float(),
            k[None].to(q.device).float(),
            v[None].to(q.device).float(),
            keep=keep[None, None].to(q.device),
            chunk_size=cs,
            scale=scale,
            enable_gqa=True,
            backend="reference",
        )
        err = float((out[row : row + 1].float() - ref).abs().max() / ref.abs().max())
        worst = max(worst, err)
    if not worst < 2e-2:
        raise AssertionError(f"cache decode attention differs from the reference: rel err {worst}")
    return worst


def run_length(model, length: int, args, bench: Bench) -> dict:
    cfg = model.config
    dev = bench.device
    gen = torch.Generator(device=dev).manual_seed(length)
    ids = torch.randint(100, cfg.vocab_size, (1, length), generator=gen, device=dev)
    q = torch.randn(1, cfg.num_attention_heads, 1, cfg.head_dim, generator=gen, device=dev)
    q = (q * 4).to(model.dtype)  # a peakier softmax than a random model's, so errors show
    scale = cfg.head_dim**-0.5
    row: dict = {"prompt": length, "layers": args.layers, "budget": args.budget}
    sdpa = torch.nn.functional.scaled_dot_product_attention

    # Dense: sdpa + DynamicCache.
    model.set_attn_implementation("sdpa")
    base = bench.reset_peak()
    cache = DynamicCache()
    tok, prefill_s = bench.prefill(model, ids, cache)
    peak_prefill = bench.peak() - base
    bench.reset_peak()
    _, steps = bench.steps(model, tok, cache, args.new)
    kv = [(layer.keys, layer.values) for layer in cache.layers]
    row["dense"] = {
        "prefill_s": prefill_s,
        "decode_tok_s": 1 / statistics.median(steps),
        "median_step_s": statistics.median(steps),
        "kv_device_bytes": sum(k.untyped_storage().nbytes() * 2 for k, _ in kv),
        "peak_prefill_over_weights": peak_prefill,
        "peak_decode_over_weights": bench.peak() - base,
        "attention_us_per_step": 1e6
        * bench.attention_seconds(lambda kv_: sdpa(q, kv_[0], kv_[1], enable_gqa=True), kv),
    }
    del cache, kv

    # LSA: the cache with the stand-in scorer at the last layer, default decode backend.
    model.set_attn_implementation("lsa")
    base = bench.reset_peak()
    scorer = MeanKeyScorer(model, (args.layers - 1,), args.chunk)
    cache = LSACache(
        model,
        scorer,
        budget=args.budget,
        refresh_every=args.tau,
        chunk_size=args.chunk,
        backend=args.backend,
        recall=args.recall,
    )
    tok, prefill_s = bench.prefill(model, ids, cache)
    peak_prefill = bench.peak() - base
    bench.reset_peak()
    tok, warm = bench.steps(model, tok, cache, 2)
    rel_err = check_cache_attention(cache, q, scale)  # before any timing
    bench.reset_peak()  # the check's fp32 reference is not the cache's memory
    tok, steps = bench.steps(model, tok, cache, args.new - 2)
    steps = warm + steps
    peak_decode = bench.peak() - base
    fp = cache.footprint()
    # forward i (1-based decode step) issues a refresh after its last layer when i % tau == 0
    issuing = [i for i in range(1, len(steps) + 1) if i % args.tau == 0]
    others = [t for i, t in enumerate(steps, 1) if i not in issuing]
    stats = cache.recall_stats
    refresh_s = stats.cuda_seconds()
    # the generation's recalls, before the standalone ones below add to the counters
    generation_recall = {
        "refreshes": len(cache.refreshes),
        "recall_bytes": stats.bytes,
        "recall_copies": stats.copies,
        "recall_slot_moves": stats.slot_moves,
        "recall_side_stream_s": refresh_s,
        "recall_gbps": stats.bytes / refresh_s / 1e9 if refresh_s else None,
    }
    layers = cache.layers

    def reserve_attention_call(layer):
        b, h, n_slots, cs, d = layer.reserve_k.shape
        rk = layer.reserve_k.view(b, h, n_slots * cs, d)
        rv = layer.reserve_v.view(b, h, n_slots * cs, d)
        return cache._decode_attention(q, rk, rv, scale)

    attention_us = 1e6 * bench.attention_seconds(reserve_attention_call, layers)
    overlap = {}
    methods = ["copies"] + (["zero_copy"] if zero_copy_unavailable(dev) is None else [])
    for method in methods:
        tok, found = recall_overlap(
            model, tok, cache, bench, args.overlap_steps, args.repeats, method
        )
        overlap[method] = found
    row["lsa"] = {
        "decode_backend": cache.decode_backend,
        "check_rel_err_layer0": rel_err,
        "prefill_s": prefill_s,
        "decode_tok_s": 1 / statistics.median(others),
        "median_step_s": statistics.median(others),
        "refresh_issuing_steps_s": [steps[i - 1] for i in issuing],
        "kv_device_bytes": fp.device_bytes,
        "kv_host_bytes": fp.host_bytes,
        "device_fraction": fp.device_fraction,
        "resident_chunks": fp.resident_chunks,
        "total_chunks": fp.total_chunks,
        "peak_prefill_over_weights": peak_prefill,
        "peak_decode_over_weights": peak_decode,
        "attention_us_per_step": attention_us,
        "compact_fallbacks": dict(cache.compact_fallbacks),
        "recall_method": cache.recall,
        **generation_recall,
        "standalone_recall": overlap,
    }
    row["lsa_vs_dense"] = {
        "kv_device_fraction": fp.device_bytes / row["dense"]["kv_device_bytes"],
        "attention_speedup": row["dense"]["attention_us_per_step"] / attention_us,
        "decode_speedup": row["lsa"]["decode_tok_s"] / row["dense"]["decode_tok_s"],
    }
    cache.close()
    return row


def recall_overlap(
    model, tok, cache: LSACache, bench: Bench, k: int, repeats: int, method: str
) -> tuple[torch.Tensor, dict]:
    """Re-recall the whole kept set with ``method`` (same bytes into the same slots: the cache's
    contents must not change, which is checked) on an idle GPU, and again just before ``k``
    decode steps."""
    generation_method = cache.recall
    cache.recall = method
    try:
        return _recall_overlap(model, tok, cache, bench, k, repeats)
    finally:
        cache.recall = generation_method


def _recall_overlap(model, tok, cache: LSACache, bench: Bench, k: int, repeats: int):
    # the measured decode steps must not issue a refresh (it would recall, and change the plan)
    room = cache.refresh_every - cache.decode_step % cache.refresh_every
    if room <= 2 * k:
        tok, _ = bench.steps(model, tok, cache, room)  # step past the next refresh first
        room = cache.refresh_every
    repeats = max(1, min(repeats, (room - 1) // (2 * k)))
    plan = [
        sorted((c, s) for c, s in cache.slot_of[b].items() if c < cache.tail_first[b])
        for b in range(cache.batch)
    ]
    nbytes = sum(len(p) for p in plan) * cache.mirror.chunk_nbytes

    def recall_only() -> tuple[float, float]:
        bench.sync()
        n_events = len(cache.recall_stats.events)
        t0 = time.perf_counter()
        cache._recall(plan)
        bench.sync()
        wall = time.perf_counter() - t0
        events = cache.recall_stats.events[n_events:]
        gpu = sum(a.elapsed_time(b) for a, b, _ in events) / 1e3 if events else wall
        return wall, gpu

    def decode_only(tok):
        bench.sync()
        t0 = time.perf_counter()
        tok, _ = bench.steps(model, tok, cache, k)
        return tok, time.perf_counter() - t0

    def both(tok):
        bench.sync()
        t0 = time.perf_counter()
        cache._recall(plan)
        tok, _ = bench.steps(model, tok, cache, k)
        return tok, time.perf_counter() - t0

    before = [(layer.reserve_k.clone(), layer.reserve_v.clone()) for layer in cache.layers]
    recall_only()  # warm-up (allocator, pinned index buffers, kernel compile)
    for layer, (k_before, v_before) in zip(cache.layers, before, strict=True):
        if not (torch.equal(layer.reserve_k, k_before) and torch.equal(layer.reserve_v, v_before)):
            raise AssertionError(f"recall={cache.recall!r} changed the reserve of {layer}")
    del before
    copies_before = cache.recall_stats.copies
    walls, gpus, dec, bot = [], [], [], []
    for _ in range(repeats):
        wall, gpu = recall_only()
        walls.append(wall)
        gpus.append(gpu)
        tok, t = decode_only(tok)
        dec.append(t)
        tok, t = both(tok)
        bot.append(t)
    t_recall, t_decode, t_both = (statistics.median(x) for x in (walls, dec, bot))
    hidden = (t_recall + t_decode - t_both) / t_recall
    return tok, {
        "bytes": nbytes,
        "copies_per_recall": (cache.recall_stats.copies - copies_before) // (2 * repeats),
        "wall_s": t_recall,
        "side_stream_s": statistics.median(gpus),
        "gbps": nbytes / statistics.median(gpus) / 1e9,
        "overlap_decode_steps": k,
        "overlap_repeats": repeats,
        "decode_only_s": t_decode,
        "recall_plus_decode_s": t_both,
        "hidden_share": min(1.0, max(0.0, hidden)),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--lengths", type=int, nargs="+", default=[131072, 524288])
    p.add_argument("--new", type=int, default=130)
    p.add_argument("--budget", type=float, default=0.1)
    p.add_argument("--tau", type=int, default=64)
    p.add_argument("--chunk", type=int, default=64)
    p.add_argument("--backend", default="auto", help="LSACache backend (auto: compact on CUDA)")
    p.add_argument("--recall", default="copies", choices=("copies", "zero_copy"))
    p.add_argument("--overlap-steps", type=int, default=4)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--small", action="store_true", help="tiny shapes: a smoke run of the script")
    args = p.parse_args()
    if args.new < args.tau + 3:
        raise SystemExit(
            f"--new ({args.new}) must exceed --tau + 2 ({args.tau + 2}): "
            "the timed steps must include a refresh"
        )
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shapes = SMALL if args.small else SHAPES
    model = build_model(args.layers, max(args.lengths) + 2 * args.new + 256, shapes, device, dtype)
    bench = Bench(device)
    rows = []
    with torch.no_grad():
        for length in args.lengths:
            rows.append(run_length(model, length, args, bench))
            print(json.dumps(rows[-1], indent=1, default=str), flush=True)
            # after each length: a later length that fails keeps the earlier ones
            extra = {"args": vars(args), "transformers": transformers.__version__}
            path = write_results("cache", rows, extra)
            print(f"wrote {path}", flush=True)
    gib = 2**30
    print("| prompt | method | KV on device | peak decode | attn µs/step | tok/s |")
    print("|---|---|---:|---:|---:|---:|")
    for r in rows:
        for m in ("dense", "lsa"):
            d = r[m]
            print(
                f"| {r['prompt'] // 1024}K | {m} | {d['kv_device_bytes'] / gib:.2f} GiB | "
                f"{d['peak_decode_over_weights'] / gib:.2f} GiB | "
                f"{d['attention_us_per_step']:.0f} | {d['decode_tok_s']:.1f} |"
            )
        s = r["lsa"]
        print(
            f"recall in generation {s['recall_gbps']} GB/s ({s['recall_copies']} copies, "
            f"{s['recall_bytes'] / 1e6:.0f} MB); device fraction {s['device_fraction']:.3f}; "
            f"refresh-issuing steps {s['refresh_issuing_steps_s']} vs median "
            f"{s['median_step_s']:.4f} s"
        )
        for method, o in s["standalone_recall"].items():
            print(
                f"  standalone recall ({method}): {o['bytes'] / 1e6:.0f} MB in "
                f"{o['copies_per_recall']} copies, {o['gbps']:.1f} GB/s (wall "
                f"{o['wall_s'] * 1e3:.2f} ms); hidden behind {o['overlap_decode_steps']} decode "
                f"steps: {o['hidden_share']:.2f}"
            )


if __name__ == "__main__":
    main()
