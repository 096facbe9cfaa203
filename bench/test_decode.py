"""Decode attention at 10% of chunks kept: dense SDPA vs flex over the full cache vs the compacted
reserve (flex with a block table, the Triton split-KV kernel, or plain SDPA over only the kept
chunks).

Each case first checks its output against the fp32 reference on a slice (batch row 0, KV heads
0-1), then times it. Reported: median µs per call (CUDA events, L2 flushed), GB/s of KV actually
read, and the ratio to the HBM floor = kept bytes / device-copy bandwidth measured in this run.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

import lsa
from bench.common import DecodeConfig, as_row, copy_bandwidth, time_call, time_graph
from lsa.compiled import flex, triton_decode
from lsa.compiled.compact import merge_attention, visible_attention
from lsa.compiled.flex import (
    flex_attend,
    flex_reserve_attention,
    flex_sparse_attention,
    reserve_block_mask,
    sparse_block_mask,
)
from lsa.compiled.sdpa import sdpa_reserve_attention
from lsa.compiled.triton_decode import triton_reserve_attention
from lsa.reference.dense import reference_dense_attention
from lsa.reference.sparse import reference_sparse_attention

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
K = 1024
if CUDA:
    CONFIGS = [
        DecodeConfig(b, 32, 8, s, 128, c, 0.1, "bfloat16")
        for s in (32 * K, 128 * K, 512 * K)
        for b in (1, 8)
        for c in (64, 128)
    ]
    METHODS = [
        "dense_sdpa",
        "flex_sparse",
        "flex_sparse_planned",
        "flex_reserve",
        "flex_reserve_planned",
        "flex_reserve_planned_bps8",
        "flex_reserve_planned_bps32",
        "sdpa_reserve",
        "sdpa_masked_reserve",
        "compact_decode",
        "triton_reserve",
        "mask_build",
    ]
else:
    CONFIGS = [
        DecodeConfig(1, 8, 2, 4 * K, 64, 64, 0.1, "float32"),
        DecodeConfig(2, 8, 2, 8 * K, 64, 128, 0.1, "float32"),
    ]
    METHODS = [
        "dense_sdpa",
        "reference_sparse",
        "flex_sparse",
        "flex_reserve",
        "sdpa_reserve",
        "sdpa_masked_reserve",
        "compact_decode",
    ] + (["triton_reserve"] if triton_decode.interpreting() else [])  # Triton's CPU interpreter


@functools.lru_cache(maxsize=1)
def setup(config: DecodeConfig) -> dict:
    """Inputs for one config (only the latest is kept alive)."""
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    shape_kv = (config.batch, config.heads_kv, config.len_kv, config.head_dim)
    dt = config.torch_dtype
    q = torch.randn(config.batch, config.heads_q, 1, config.head_dim, generator=gen, device=DEVICE)
    k = torch.randn(shape_kv, generator=gen, device=DEVICE)
    v = torch.randn(shape_kv, generator=gen, device=DEVICE)
    q, k, v = q.to(dt), k.to(dt), v.to(dt)
    scores = torch.rand(config.batch, 1, config.n_chunks, generator=gen, device=DEVICE)
    keep = lsa.select_chunks(scores, budget=config.kept, sink_chunks=1, recent_chunks=1)
    n_keep = int(keep[0, 0].sum())
    table = torch.sort(torch.where(keep, torch.arange(config.n_chunks, device=DEVICE), -1), -1)
    block_table = table.values[..., -n_keep:].contiguous()  # kept chunk ids, ascending
    cs = config.chunk_size
    tok = (block_table[..., :, None] * cs + torch.arange(cs, device=DEVICE)).flatten(-2)
    tok = tok.expand(-1, config.heads_kv, -1)[..., None].expand(-1, -1, -1, config.head_dim)
    k_res, v_res = k.gather(2, tok), v.gather(2, tok)  # [B, H_kv, n_keep * cs, D]
    kv_len = torch.full((config.batch,), config.len_kv, device=DEVICE, dtype=torch.int64)
    elt = k.element_size()
    per_token = config.batch * config.heads_kv * config.head_dim * 2 * elt  # K and V
    return {
        "q": q,
        "k": k,
        "v": v,
        "keep": keep,
        "block_table": block_table,
        "k_res": k_res,
        "v_res": v_res,
        "kv_len": kv_len,
        "dense_bytes": config.len_kv * per_token,
        "kept_bytes": n_keep * cs * per_token,
        "n_keep": n_keep,
    }


@functools.lru_cache(maxsize=1)
def bandwidth() -> float:
    return copy_bandwidth(DEVICE, (1 << 30) if CUDA else (1 << 26))


def runner(method: str, config: DecodeConfig, s: dict):
    cs = config.chunk_size
    if method == "dense_sdpa":
        return lambda: F.scaled_dot_product_attention(s["q"], s["k"], s["v"], enable_gqa=True)
    if method == "reference_sparse":
        return lambda: reference_sparse_attention(s["q"], s["k"], s["v"], s["keep"], chunk_size=cs)
    if method == "flex_sparse":
        return lambda: flex_sparse_attention(s["q"], s["k"], s["v"], s["keep"], chunk_size=cs)
    if method == "flex_reserve":
        return lambda: flex_reserve_attention(
            s["q"], s["k_res"], s["v_res"], s["block_table"], s["kv_len"], chunk_size=cs
        )
    if method == "flex_sparse_planned":
        plan = sparse_block_mask(
            s["keep"],
            chunk_size=cs,
            heads_q=config.heads_q,
            heads_kv=config.heads_kv,
            len_q=1,
            len_kv=config.len_kv,
        )
        return lambda: flex_attend(s["q"], s["k"], s["v"], plan)
    if method.startswith("flex_reserve_planned"):
        plan = reserve_block_mask(
            s["block_table"],
            s["kv_len"],
            chunk_size=cs,
            heads_q=config.heads_q,
            heads_kv=config.heads_kv,
            len_q=1,
        )
        bps = int(method.rsplit("bps", 1)[1]) if "bps" in method else flex.BLOCKS_PER_SPLIT

        def attend():
            default, flex.BLOCKS_PER_SPLIT = flex.BLOCKS_PER_SPLIT, bps
            try:
                return flex_attend(s["q"], s["k_res"], s["v_res"], plan)
            finally:
                flex.BLOCKS_PER_SPLIT = default

        return attend
    if method == "sdpa_reserve":
        # Valid here: every reserve token is a whole kept chunk the decode query may see.
        return lambda: F.scaled_dot_product_attention(
            s["q"], s["k_res"], s["v_res"], enable_gqa=True
        )
    if method == "sdpa_masked_reserve":
        # The "sdpa" reserve backend: fused SDPA with a token mask built from the block table.
        return lambda: sdpa_reserve_attention(
            s["q"], s["k_res"], s["v_res"], s["block_table"], s["kv_len"], chunk_size=cs
        )
    if method == "triton_reserve":
        # The "triton" reserve backend: split-KV flash-decoding over the block table.
        return lambda: triton_reserve_attention(
            s["q"], s["k_res"], s["v_res"], s["block_table"], s["kv_len"], chunk_size=cs
        )
    if method == "compact_decode":
        # What LSACache's decode step does: SDPA (with LSE) over the complete resident chunks,
        # SDPA over the tail written since the refresh (here the last kept chunk), exact merge.
        rk, rv = s["k_res"][:, :, :-cs], s["v_res"][:, :, :-cs]
        tk, tv = s["k_res"][:, :, -cs:], s["v_res"][:, :, -cs:]

        def decode():
            out_r, lse_r = visible_attention(s["q"], rk, rv)
            out_t, lse_t = visible_attention(s["q"], tk, tv)
            return merge_attention(out_r, lse_r, out_t, lse_t)[0]

        return decode
    raise ValueError(method)


def check(method: str, config: DecodeConfig, s: dict, out: torch.Tensor) -> float:
    """Relative error of the method's output against the fp32 reference on a slice."""
    sl_q, sl_kv = slice(0, 2 * config.heads_q // config.heads_kv), slice(0, 2)
    q, k, v = s["q"][:1, sl_q], s["k"][:1, sl_kv], s["v"][:1, sl_kv]
    if method == "dense_sdpa":
        ref = reference_dense_attention(q.float(), k.float(), v.float())
    else:
        keep = s["keep"][:1]
        ref = reference_sparse_attention(
            q.float(), k.float(), v.float(), keep, chunk_size=config.chunk_size
        )
    got = out[:1, sl_q].float()
    return ((got - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize(
    ("config", "method"),
    [(c, m) for c in CONFIGS for m in METHODS],
    ids=lambda x: x.name() if isinstance(x, DecodeConfig) else x,
)
def test_decode(benchmark, record_row, config, method):
    s = setup(config)
    if method == "mask_build":
        # Plan construction alone (block lists on the device + BlockMask), per decode step.
        def fn():
            return sparse_block_mask(
                s["keep"],
                chunk_size=config.chunk_size,
                heads_q=config.heads_q,
                heads_kv=config.heads_kv,
                len_q=1,
                len_kv=config.len_kv,
            )

        counts = fn().block_mask.kv_num_blocks
        assert torch.equal(counts, s["keep"].sum(-1, dtype=torch.int32)[..., None])
        err = 0.0
    else:
        fn = runner(method, config, s)
        err = check(method, config, s, fn())
        tol = 1e-2 if config.dtype != "float32" else 1e-5
        assert err < tol, f"{method} {config.name()}: rel err {err:.2e} >= {tol}"
    graph_seconds = (
        None
        if method in ("flex_sparse", "flex_reserve", "mask_build")
        else (time_graph(fn, DEVICE))
    )
    seconds = time_call(fn, DEVICE)
    sync = torch.cuda.synchronize if CUDA else (lambda: None)
    benchmark.pedantic(lambda: (fn(), sync()), rounds=10, warmup_rounds=2)
    bw = bandwidth()
    read = s["dense_bytes"] if method == "dense_sdpa" else s["kept_bytes"]
    floor = s["kept_bytes"] / bw
    row = as_row(
        config,
        method=method,
        us=seconds * 1e6,
        graph_us=graph_seconds * 1e6 if graph_seconds else None,
        graph_x_floor=graph_seconds / floor if graph_seconds else None,
        rel_err=err,
        gbps_read=read / seconds / 1e9 if method != "mask_build" else None,
        floor_us=floor * 1e6,
        x_floor=seconds / floor,
        copy_gbps=bw / 1e9,
        kept_chunks=s["n_keep"],
    )
    benchmark.extra_info.update(row)
    record_row("decode", row)
