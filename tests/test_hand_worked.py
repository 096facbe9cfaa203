"""Small attention problems worked out by hand, checked to the exact numbers.

The main example (chunk_size 2, S_kv 4, D 1, scale 1, so the logits are q * k):

    q = 1,  k = [0, 1, 0, 1],  v = [1, 2, 3, 4]    chunks: {0, 1} and {2, 3}
    logits = [0, 1, 0, 1]  ->  unnormalised weights [e^0, e^1, e^0, e^1] = [1, e, 1, e]

    keep both:    (1*1 + 2*e + 3*1 + 4*e) / (1 + e + 1 + e) = (4 + 6e) / (2 + 2e)
                  = (2 + 3e) / (1 + e)
                  LSE = log(2 + 2e)
    keep chunk 0: (1 + 2e) / (1 + e),  LSE = log(1 + e)
    keep chunk 1: (3 + 4e) / (1 + e),  LSE = log(1 + e)
    keep neither: 0,                   LSE = -inf
"""

from __future__ import annotations

import math

import pytest
import torch

import lsa
from lsa.testing import attention_oracle, rounding_floor, visible_keys

E = math.e
T, F = True, False


def bhsd(rows: list[list[float]], dtype=torch.float64) -> torch.Tensor:
    """[S, D] rows -> a [1, 1, S, D] tensor."""
    return torch.tensor(rows, dtype=dtype)[None, None]


def two_chunk_problem(len_q: int = 1, dtype=torch.float64):
    q = bhsd([[1.0]] * len_q, dtype)
    k = bhsd([[0.0], [1.0], [0.0], [1.0]], dtype)
    v = bhsd([[1.0], [2.0], [3.0], [4.0]], dtype)
    return q, k, v


def keep_mask(*chunks: bool) -> torch.Tensor:
    return torch.tensor(chunks, dtype=torch.bool)[None, None]  # [1, 1, n_chunks]


@pytest.mark.parametrize(
    ("keep", "out", "lse"),
    [
        ((T, T), (2 + 3 * E) / (1 + E), math.log(2 + 2 * E)),
        ((T, F), (1 + 2 * E) / (1 + E), math.log(1 + E)),
        ((F, T), (3 + 4 * E) / (1 + E), math.log(1 + E)),
        ((F, F), 0.0, -math.inf),
    ],
)
def test_two_chunks_one_query(keep, out, lse) -> None:
    q, k, v = two_chunk_problem()
    got, got_lse = lsa.sparse_attention(
        q, k, v, keep=keep_mask(*keep), chunk_size=2, scale=1.0, return_lse=True
    )
    assert got.shape == (1, 1, 1, 1)
    assert got.item() == pytest.approx(out, rel=1e-14, abs=1e-300)
    assert got_lse.item() == pytest.approx(lse, rel=1e-14)  # approx(-inf) is exact


def test_two_chunks_keep_all_is_dense() -> None:
    q, k, v = two_chunk_problem()
    dense = lsa.dense_attention(q, k, v, scale=1.0)
    assert dense.item() == pytest.approx((2 + 3 * E) / (1 + E), rel=1e-14)


def test_two_chunks_causal_two_queries() -> None:
    # Bottom-right: query 0 sits at position 4 - 2 + 0 = 2 (sees keys 0..2), query 1 at 3 (all).
    q, k, v = two_chunk_problem(len_q=2)
    # keep chunk 1 only: query 0 sees key 2 alone -> v = 3 exactly, LSE = log(e^0) = 0;
    # query 1 sees keys 2, 3 -> (3 + 4e) / (1 + e).
    out, lse = lsa.sparse_attention(
        q, k, v, keep=keep_mask(F, T), chunk_size=2, scale=1.0, return_lse=True
    )
    assert out.flatten().tolist() == pytest.approx([3.0, (3 + 4 * E) / (1 + E)], rel=1e-14)
    assert lse.flatten().tolist() == pytest.approx([0.0, math.log(1 + E)], abs=1e-14)
    # keep both: query 0 sees keys 0, 1, 2 -> weights [1, e, 1]: (1 + 2e + 3) / (2 + e).
    out = lsa.sparse_attention(q, k, v, keep=keep_mask(T, T), chunk_size=2, scale=1.0)
    expected = [(4 + 2 * E) / (2 + E), (2 + 3 * E) / (1 + E)]
    assert out.flatten().tolist() == pytest.approx(expected, rel=1e-14)
    # Without causality both queries see every kept key.
    out = lsa.sparse_attention(q, k, v, keep=keep_mask(F, T), chunk_size=2, scale=1.0, causal=False)
    assert out.flatten().tolist() == pytest.approx([(3 + 4 * E) / (1 + E)] * 2, rel=1e-14)


def test_partial_last_chunk_two_dims() -> None:
    # S_kv 3, chunk_size 2: chunks {0, 1} and {2} (partial). q = [1, 0], scale 1: logits = k[:, 0].
    q = bhsd([[1.0, 0.0]])
    k = bhsd([[0.0, 5.0], [1.0, 7.0], [0.0, -3.0]])  # logits [0, 1, 0]: weights [1, e, 1]
    v = bhsd([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    cases = {
        (T, T): [(1 + 1) / (2 + E), (E + 1) / (2 + E)],  # (v0 + e v1 + v2) / (2 + e)
        (T, F): [1 / (1 + E), E / (1 + E)],  # (v0 + e v1) / (1 + e)
        (F, T): [1.0, 1.0],  # v2 alone
    }
    for keep, expected in cases.items():
        out = lsa.sparse_attention(q, k, v, keep=keep_mask(*keep), chunk_size=2, scale=1.0)
        assert out.flatten().tolist() == pytest.approx(expected, rel=1e-14), keep


def test_default_scale_is_inverse_sqrt_head_dim() -> None:
    # D = 4, q = [2, 0, 0, 0]: q.k = 2 for k1 = [1, 0, 0, 0], scaled by 1/sqrt(4) -> logit 1.
    q = bhsd([[2.0, 0.0, 0.0, 0.0]])
    k = bhsd([[0.0] * 4, [1.0, 0.0, 0.0, 0.0]])
    v = bhsd([[1.0] * 4, [2.0] * 4])
    out = lsa.sparse_attention(q, k, v, keep=keep_mask(T, T), chunk_size=1)
    assert out.flatten().tolist() == pytest.approx([(1 + 2 * E) / (1 + E)] * 4, rel=1e-14)


def test_per_head_keep_with_gqa() -> None:
    # H_kv 2 (identical k, v), H_q 4: query heads 0, 1 read KV head 0, heads 2, 3 read KV head 1.
    q, k, v = two_chunk_problem()
    q, k, v = q.expand(1, 4, 1, 1), k.expand(1, 2, 4, 1), v.expand(1, 2, 4, 1)
    keep = torch.tensor([[[T, F], [F, T]]])  # KV head 0 keeps chunk 0, KV head 1 chunk 1
    out = lsa.sparse_attention(q, k, v, keep=keep, chunk_size=2, scale=1.0, enable_gqa=True)
    a, b = (1 + 2 * E) / (1 + E), (3 + 4 * E) / (1 + E)
    assert out.flatten().tolist() == pytest.approx([a, a, b, b], rel=1e-14)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_keep_none_returns_zeros_not_nan(dtype) -> None:
    q, k, v = two_chunk_problem(len_q=2, dtype=dtype)
    out = lsa.sparse_attention(q, k, v, keep=keep_mask(F, F), chunk_size=2)
    assert out.dtype == dtype
    assert torch.equal(out, torch.zeros_like(out))


def test_scores_path_hand_worked() -> None:
    # scores [0.2, 0.9] with budget 1 and no forced chunks keep chunk 1: (3 + 4e) / (1 + e).
    q, k, v = two_chunk_problem()
    scores = torch.tensor([[[0.2, 0.9]]])
    out = lsa.sparse_attention(
        q, k, v, scores=scores, budget=1, sink_chunks=0, recent_chunks=0, chunk_size=2, scale=1.0
    )
    assert out.item() == pytest.approx((3 + 4 * E) / (1 + E), rel=1e-14)


def test_reserve_hand_worked() -> None:
    # The reserve holds the chunks in reverse order: slot 0 = chunk 1, slot 1 = chunk 0.
    q, k, v = two_chunk_problem()
    k_res = torch.cat([k[:, :, 2:], k[:, :, :2]], dim=2)
    v_res = torch.cat([v[:, :, 2:], v[:, :, :2]], dim=2)
    kv_len = torch.tensor([4])
    table = torch.tensor([[[1, 0]]])
    out = lsa.reserve_attention(q, k_res, v_res, table, kv_len, chunk_size=2, scale=1.0)
    assert out.item() == pytest.approx((2 + 3 * E) / (1 + E), rel=1e-14)
    # Slot 1 empty: only chunk 1 remains.
    out = lsa.reserve_attention(q, k_res, v_res, torch.tensor([[[1, -1]]]), kv_len, chunk_size=2)
    assert out.item() == pytest.approx((3 + 4 * E) / (1 + E), rel=1e-14)
    # kv_len 3: token 3 does not exist and the query sits at position 2: keys 0, 1, 2 with
    # weights [1, e, 1] -> (1 + 2e + 3) / (2 + e).
    out = lsa.reserve_attention(q, k_res, v_res, table, torch.tensor([3]), chunk_size=2, scale=1.0)
    assert out.item() == pytest.approx((4 + 2 * E) / (2 + E), rel=1e-14)


# lsa.testing, by hand.


def test_visible_keys_bottom_right_causal() -> None:
    # flash-attention's example: S_q 2, S_kv 5.
    mask = visible_keys(None, 1, 2, 5, causal=True)
    assert mask.int().tolist() == [[[[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]]]
    # chunk_size 2 and keep chunk 1 only ({2, 3}); chunk 2 = {4} dropped.
    mask = visible_keys(keep_mask(F, T, F), 2, 2, 5, causal=True)
    assert mask.int().tolist() == [[[[0, 0, 1, 1, 0], [0, 0, 1, 1, 0]]]]


def test_rounding_floor_by_hand() -> None:
    # eps(bf16) = 2^-7 and eps(fp32) = 2^-23; floor = 2 * eps * max|x|.
    x = torch.tensor([-3.0, 0.5])
    assert rounding_floor(x, torch.bfloat16) == 2 * 2**-7 * 3
    assert rounding_floor(x, torch.float32) == 2 * 2**-23 * 3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_oracle_tolerance_catches_a_leaked_chunk(dtype) -> None:
    # The derived tolerance must not be vacuous: attending to one chunk too many fails it.
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, s, 16, generator=gen).to(dtype) for s in (4, 96, 96))
    keep = torch.zeros(1, 1, 6, dtype=torch.bool)
    keep[..., [0, 5]] = True
    oracle = attention_oracle(q, k, v, visible_keys(keep, 16, 4, 96, causal=True))
    oracle.assert_close(lsa.sparse_attention(q, k, v, keep=keep, chunk_size=16))
    leaked = keep.clone()
    leaked[..., 2] = True
    with pytest.raises(AssertionError, match="exceeds the tolerance"):
        oracle.assert_close(lsa.sparse_attention(q, k, v, keep=leaked, chunk_size=16))
    # A wrong dtype or a NaN is reported too.
    with pytest.raises(AssertionError, match="dtype"):
        oracle.assert_close(oracle.out)
    nan = lsa.sparse_attention(q, k, v, keep=keep, chunk_size=16)
    nan[0, 0, 0, 0] = math.nan
    with pytest.raises(AssertionError, match="NaN"):
        oracle.assert_close(nan)
