"""LSACache on one CUDA GPU with a random Llama-shaped model, against DynamicCache + SDPA.

    python -m bench.cache_h200 --layers 4 --lengths 131072 524288 --new 130 --budget 0.1 --out DIR

The model has Llama-3-8B's layer shapes (hidden 4096, 32 query / 8 KV heads of 128, MLP 14336,
bf16) and random weights, with fewer layers so that 512K-token prefills fit a short device lease;
every figure is also given per layer. The scorer is the test stand-in (chunk-mean keys against
the layer's real query): this measures memory, speed and recall, not accuracy.

Measured per prompt length, for dense (sdpa + DynamicCache) and LSA (budget 10%):
- KV bytes on the device (LSA: ``footprint()``, real storage) and peak allocated memory;
- attention time per decode step summed over layers (CUDA events, L2 flushed): SDPA over the
  full cache vs the cache's own flex plan over its reserve;
- decode tokens/s (wall clock per greedy step after the prefill) and the steps that refresh;
- recall: bytes and side-stream seconds (bandwidth), and the share of it hidden behind decode,
  bounded below by 1 - (refresh step - median step) / recall time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import transformers
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from bench.common import environment, time_call
from lsa.cache import LSACache
from lsa.cache.standin import ChunkMeanKeyScorer
from lsa.compiled.flex import flex_attend

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# Llama-3-8B layer shapes; --small shrinks them for a CPU smoke run of this script.
SHAPES = {"hidden": 4096, "mlp": 14336, "heads": 32, "kv_heads": 8, "head_dim": 128}
SMALL = {"hidden": 256, "mlp": 512, "heads": 4, "kv_heads": 2, "head_dim": 64}


def build_model(layers: int, max_len: int, shapes: dict) -> LlamaForCausalLM:
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
    with DEVICE:
        model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    return model


def _sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def greedy(model, ids: torch.Tensor, cache, new: int) -> dict:
    _sync()
    t0 = time.perf_counter()
    logits = model(ids, past_key_values=cache, logits_to_keep=1).logits[:, -1]
    tok = logits.argmax(-1, keepdim=True)
    _sync()
    prefill = time.perf_counter() - t0
    steps = []
    tokens = [tok]
    for _ in range(new - 1):
        t = time.perf_counter()
        tok = model(tok, past_key_values=cache).logits[:, -1].argmax(-1, keepdim=True)
        _sync()
        steps.append(time.perf_counter() - t)
        tokens.append(tok)
    return {"prefill_s": prefill, "steps_s": steps, "tokens": torch.cat(tokens, 1)}


def kv_attention_seconds(q: torch.Tensor, pairs, fn) -> float:
    return sum(time_call(lambda k=k, v=v: fn(q, k, v), DEVICE) for k, v in pairs)


def _memory() -> tuple[int, int]:
    """(allocated now, peak since the last reset) on CUDA; zeros elsewhere."""
    if DEVICE.type != "cuda":
        return 0, 0
    return torch.cuda.memory_allocated(), torch.cuda.max_memory_allocated()


def _reset_peak() -> int:
    if DEVICE.type != "cuda":
        return 0
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated()


def run_length(model, length: int, args) -> dict:
    cfg = model.config
    gen = torch.Generator(device=DEVICE).manual_seed(length)
    ids = torch.randint(100, cfg.vocab_size, (1, length), generator=gen, device=DEVICE)
    q = torch.randn(1, cfg.num_attention_heads, 1, cfg.head_dim, generator=gen, device=DEVICE)
    q = q.bfloat16()
    row: dict = {"prompt": length, "layers": args.layers, "budget": args.budget}

    # Dense: sdpa + DynamicCache.
    model.set_attn_implementation("sdpa")
    base = _reset_peak()
    cache = DynamicCache()
    dense = greedy(model, ids, cache, args.new)
    kv = [(layer.keys, layer.values) for layer in cache.layers]
    dense_bytes = sum(k.untyped_storage().nbytes() + v.untyped_storage().nbytes() for k, v in kv)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    row["dense"] = {
        "prefill_s": dense["prefill_s"],
        "decode_tok_s": 1 / statistics.median(dense["steps_s"]),
        "kv_device_bytes": dense_bytes,
        "peak_allocated_over_weights": _memory()[1] - base,
        "attention_us_per_step": 1e6
        * kv_attention_seconds(q, kv, lambda q_, k, v: sdpa(q_, k, v, enable_gqa=True)),
    }
    del cache, kv

    # LSA: the cache with the stand-in scorer at the last layer.
    model.set_attn_implementation("lsa")
    base = _reset_peak()
    scorer = ChunkMeanKeyScorer(model, (args.layers - 1,), args.chunk)
    cache = LSACache(
        model,
        scorer,
        budget=args.budget,
        refresh_every=args.tau,
        chunk_size=args.chunk,
        device=DEVICE,
        backend="flex",
    )
    lsa = greedy(model, ids, cache, args.new)
    fp = cache.footprint()
    steps = lsa["steps_s"]
    refresh_steps = [r.step for r in cache.refreshes]
    # steps_s[i] is decode step i + 1 (step 0 is the prefill's token).
    at_refresh = [steps[s - 1] for s in refresh_steps if 1 <= s <= len(steps)]
    others = [t for i, t in enumerate(steps) if i + 1 not in refresh_steps]
    recall_s = cache.recall_stats.cuda_seconds()
    n_ref = max(1, len(cache.refreshes))
    # The first refresh step also compiles the flex kernels: only later refreshes count.
    later = at_refresh[1:]
    extra = max(0.0, statistics.mean(later) - statistics.median(others)) if later else None
    pairs = [
        (layer.reserve_k.flatten(2, 3), layer.reserve_v.flatten(2, 3)) for layer in cache.layers
    ]
    plan = cache._plan
    row["lsa"] = {
        "prefill_s": lsa["prefill_s"],
        "decode_tok_s": 1 / statistics.median(others),
        "refresh_step_s": at_refresh,
        "median_step_s": statistics.median(others),
        "kv_device_bytes": fp.device_bytes,
        "kv_host_bytes": fp.host_bytes,
        "device_fraction": fp.device_fraction,
        "resident_chunks": fp.resident_chunks,
        "total_chunks": fp.total_chunks,
        "peak_allocated_over_weights": _memory()[1] - base,
        "attention_us_per_step": 1e6
        * kv_attention_seconds(q, pairs, lambda q_, k, v: flex_attend(q_, k, v, plan)),
        "recall_bytes": cache.recall_stats.bytes,
        "recall_copies": cache.recall_stats.copies,
        "recall_s": recall_s,
        "recall_gbps": cache.recall_stats.bytes / recall_s / 1e9 if recall_s else None,
        "recall_s_per_refresh": recall_s / n_ref,
        "refresh_extra_s": extra,
        "hidden_share_at_least": (
            1 - min(1.0, extra / (recall_s / n_ref)) if recall_s and extra is not None else None
        ),
        "same_first_tokens_as_dense": int(
            (lsa["tokens"][0] == dense["tokens"][0]).cumprod(0).sum()
        ),
    }
    cache.close()
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--lengths", type=int, nargs="+", default=[131072, 524288])
    p.add_argument("--new", type=int, default=130)
    p.add_argument("--budget", type=float, default=0.1)
    p.add_argument("--tau", type=int, default=64)
    p.add_argument("--chunk", type=int, default=64)
    p.add_argument("--out", default="bench/results")
    p.add_argument("--small", action="store_true", help="tiny shapes: a smoke run of the script")
    args = p.parse_args()
    shapes = SMALL if args.small else SHAPES
    model = build_model(args.layers, max(args.lengths) + args.new + 64, shapes)
    rows = []
    for length in args.lengths:
        rows.append(run_length(model, length, args))
        print(json.dumps(rows[-1], indent=1, default=str), flush=True)
    env = {**environment(), "transformers": transformers.__version__}
    out = Path(args.out) / f"cache-{DEVICE.type}-{time.strftime('%Y-%m-%d')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"environment": env, "args": vars(args), "rows": rows}, indent=1))
    print("| prompt | method | KV on device | peak over weights | attn µs/step | tok/s |")
    print("|---|---|---:|---:|---:|---:|")
    for r in rows:
        for m in ("dense", "lsa"):
            d = r[m]
            print(
                f"| {r['prompt'] // 1024}K | {m} | {d['kv_device_bytes'] / 2**30:.2f} GiB | "
                f"{d['peak_allocated_over_weights'] / 2**30:.2f} GiB | "
                f"{d['attention_us_per_step']:.0f} | {d['decode_tok_s']:.1f} |"
            )
        lsa = r["lsa"]
        print(
            f"recall {lsa['recall_gbps']} GB/s over {lsa['recall_copies']} copies; "
            f"hidden share >= {lsa['hidden_share_at_least']}; device fraction "
            f"{lsa['device_fraction']:.3f}; refresh steps {lsa['refresh_step_s']} vs median "
            f"{lsa['median_step_s']:.4f} s"
        )


if __name__ == "__main__":
    main()
