"""The compacted decode path (SDPA over complete resident chunks + the tail, merged by LSE)
against the reference reserve attention."""

import pytest
import torch

import lsa
from lsa.compiled.compact import (
    merge_attention,
    prefix_attention,
    prefix_mask,
    visible_attention,
)


def _case(device, dtype, b=2, hq=6, hkv=2, d=24, cs=16, slots=5, tail=11, seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)
    n_logical = 30
    chunks = torch.stack(
        [torch.randperm(n_logical, generator=gen, device=device)[:slots] for _ in range(b)]
    )
    kv_len = n_logical * cs + tail  # tail tokens sit in the partial chunk after the last full one
    res_k = torch.randn(b, hkv, slots * cs, d, generator=gen, device=device).to(dtype)
    res_v = torch.randn(b, hkv, slots * cs, d, generator=gen, device=device).to(dtype)
    tail_k = torch.randn(b, hkv, tail, d, generator=gen, device=device).to(dtype)
    tail_v = torch.randn(b, hkv, tail, d, generator=gen, device=device).to(dtype)
    q = torch.randn(b, hq, 1, d, generator=gen, device=device).to(dtype)
    # The same KV as one reserve with a block table: resident slots, then the tail's chunk.
    pad = cs - tail
    zeros = torch.zeros(b, hkv, pad, d, device=device, dtype=dtype)
    k_all = torch.cat([res_k, tail_k, zeros], 2)
    v_all = torch.cat([res_v, tail_v, zeros], 2)
    table = torch.cat([chunks, torch.full((b, 1), n_logical, device=device)], 1)[:, None]
    kv = torch.full((b,), kv_len, device=device)
    return q, (res_k, res_v, tail_k, tail_v), (k_all, v_all, table, kv), cs


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_compact_decode_equals_reserve_reference(dtype):
    q, (rk, rv, tk, tv), (ka, va, table, kv), cs = _case("cpu", dtype)
    out_r, lse_r = visible_attention(q, rk, rv)
    out_t, lse_t = visible_attention(q, tk, tv)
    out, lse = merge_attention(out_r, lse_r, out_t, lse_t)
    ref, ref_lse = lsa.reserve_attention(
        q, ka, va, table, kv, chunk_size=cs, enable_gqa=True, backend="reference", return_lse=True
    )
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    torch.testing.assert_close(out, ref, atol=tol, rtol=tol)
    torch.testing.assert_close(lse, ref_lse, atol=tol, rtol=tol)


def test_merge_with_an_empty_side_is_identity_and_empty_rows_stay_zero():
    q, (rk, rv, tk, tv), _, _ = _case("cpu", torch.float32)
    out_r, lse_r = visible_attention(q, rk, rv)
    out_e, lse_e = visible_attention(q, tk[:, :, :0], tv[:, :, :0])
    assert torch.isneginf(lse_e).all() and (out_e == 0).all()
    out, lse = merge_attention(out_r, lse_r, out_e, lse_e)
    torch.testing.assert_close(out, out_r)
    torch.testing.assert_close(lse, lse_r)
    out0, lse0 = merge_attention(out_e, lse_e, out_e, lse_e)
    assert (out0 == 0).all() and torch.isneginf(lse0).all()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_compact_decode_cuda(dtype):
    q, (rk, rv, tk, tv), (ka, va, table, kv), cs = _case("cuda", dtype, d=64, hq=8, hkv=2)
    out_r, lse_r = visible_attention(q, rk, rv)
    out_t, lse_t = visible_attention(q, tk, tv)
    out, _ = merge_attention(out_r, lse_r, out_t, lse_t)
    ref = lsa.reserve_attention(
        q.double(),
        ka.double(),
        va.double(),
        table,
        kv,
        chunk_size=cs,
        enable_gqa=True,
        backend="reference",
    )
    rel = ((out.double() - ref).norm() / ref.norm()).item()
    assert rel < (1e-5 if dtype == torch.float32 else 1e-2)


def _prefix_case(device, dtype, lengths, hq=6, hkv=2, d=24, sq=1, seed=1):
    gen = torch.Generator(device=device).manual_seed(seed)
    b, s = len(lengths), max(lengths) + 5  # keys past every row's prefix hold garbage
    q = torch.randn(b, hq, sq, d, generator=gen, device=device).to(dtype)
    k = torch.randn(b, hkv, s, d, generator=gen, device=device).to(dtype)
    v = torch.randn(b, hkv, s, d, generator=gen, device=device).to(dtype)
    return q, k, v, torch.tensor(lengths, device=device)


@pytest.mark.parametrize(("lengths", "sq"), [([37, 5, 64], 1), ([1, 20], 3), ([16, 16], 1)])
def test_prefix_attention_sees_only_each_rows_prefix(lengths, sq):
    """Mixed-length rows in one call = each row alone over its own prefix (GQA, 1 or several
    queries, a one-key row)."""
    q, k, v, n = _prefix_case("cpu", torch.float64, lengths, sq=sq)
    out = prefix_attention(q, k, v, prefix_mask(n, k.shape[2]))
    for b, m in enumerate(lengths):
        ref = lsa.dense_attention(
            q[b : b + 1], k[b : b + 1, :, :m], v[b : b + 1, :, :m], causal=False, enable_gqa=True
        )
        torch.testing.assert_close(out[b : b + 1], ref, atol=1e-12, rtol=1e-12)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_prefix_attention_cuda(dtype):
    q, k, v, n = _prefix_case("cuda", dtype, [300, 17, 129], hq=8, d=64)
    out = prefix_attention(q, k, v, prefix_mask(n, k.shape[2]))
    for b, m in enumerate(n.tolist()):
        ref = lsa.dense_attention(
            q[b : b + 1].double(),
            k[b : b + 1, :, :m].double(),
            v[b : b + 1, :, :m].double(),
            causal=False,
            enable_gqa=True,
        )
        rel = ((out[b : b + 1].double() - ref).norm() / ref.norm()).item()
        assert rel < (1e-5 if dtype == torch.float32 else 1e-2)
