"""select_chunks semantics, worked by hand."""

from __future__ import annotations

import pytest
import torch

import lsa
from lsa.reference.select import budget_count

T, F = True, False


def select(scores: list, **kwargs) -> list:
    return lsa.select_chunks(torch.tensor(scores), **kwargs).tolist()


@pytest.mark.parametrize(
    ("budget", "n_chunks", "count"),
    [
        (3, 10, 3),  # an int is a count
        (50, 6, 6),  # capped at n_chunks
        (0.1, 30, 3),  # 0.1 * 30 == 3.0000000000000004 in binary, but 0.1 of 30 is 3
        (0.25, 10, 3),  # 2.5 rounds up
        (0.34, 6, 3),  # 2.04 rounds up
        (1 / 3, 3, 1),  # 0.3333333333333333 * 3 = 0.9999999999999999 -> 1
        (1.0, 7, 7),
        (1e-12, 5, 1),  # any fraction > 0 allows at least one chunk
        (0.7, 10, 7),
    ],
)
def test_budget_count(budget, n_chunks, count) -> None:
    assert budget_count(budget, n_chunks) == count


def test_budget_int_with_forced_chunks() -> None:
    # Forced: chunk 0 (sink) and 5 (recent). Budget 3 leaves one free pick: the top score, 0.9.
    scores = [0.5, 0.1, 0.9, 0.3, 0.8, 0.2]
    assert select(scores, budget=3) == [T, F, T, F, F, T]
    # Budget 4: the next best, 0.8 at chunk 4.
    assert select(scores, budget=4) == [T, F, T, F, T, T]


def test_budget_fraction_rounds_up() -> None:
    scores = [0.5, 0.1, 0.9, 0.3, 0.8, 0.2]
    assert select(scores, budget=0.5) == [T, F, T, F, F, T]  # 3 of 6
    assert select(scores, budget=0.4) == [T, F, T, F, F, T]  # 2.4 -> 3
    # 0.1 of 30 chunks is 3, not 4; no forced chunks, so the 3 best (the first three) are kept.
    descending = [float(30 - i) for i in range(30)]
    kept = select(descending, budget=0.1, sink_chunks=0, recent_chunks=0)
    assert kept == [T, T, T] + [F] * 27


def test_forced_chunks_kept_past_the_budget() -> None:
    # Budget 1, but sink 2 and recent 2: the four forced chunks stay, no free pick.
    assert select([9.0, 0.0, 5.0, 5.0, 0.0, 0.0], budget=1, sink_chunks=2, recent_chunks=2) == [
        T,
        T,
        F,
        F,
        T,
        T,
    ]
    # Sink and recent overlap when they cover every chunk.
    assert select([1.0, 2.0, 3.0], budget=1, sink_chunks=2, recent_chunks=2) == [T, T, T]


def test_no_forced_chunks() -> None:
    assert select([0.1, 0.3, 0.2], budget=1, sink_chunks=0, recent_chunks=0) == [F, T, F]


def test_threshold_is_strictly_greater() -> None:
    scores = [0.0, 0.5, 0.5, 0.7]
    assert select(scores, threshold=0.5, sink_chunks=0, recent_chunks=0) == [F, F, F, T]
    assert select(scores, threshold=0.49, sink_chunks=0, recent_chunks=0) == [F, T, T, T]
    # Forced chunks are kept whatever their score.
    assert select(scores, threshold=0.5) == [T, F, F, T]


def test_threshold_compares_exact_values_in_low_precision() -> None:
    # 0.999 rounds to 1.0 in bf16, but a score of 1.0 does exceed 0.999.
    scores = torch.tensor([1.0, 0.5], dtype=torch.bfloat16)
    keep = lsa.select_chunks(scores, threshold=0.999, sink_chunks=0, recent_chunks=0)
    assert keep.tolist() == [T, F]


def test_budget_and_threshold() -> None:
    # Forced 0 and 5; passing (> 0.65): chunks 1 (0.9), 3 (0.8), 4 (0.7).
    scores = [0.1, 0.9, 0.6, 0.8, 0.7, 0.2]
    # Budget 3 - 2 forced = 1 free pick: the best passing chunk.
    assert select(scores, budget=3, threshold=0.65) == [T, T, F, F, F, T]
    # A budget larger than the passing chunks keeps all of them, and nothing below the threshold.
    assert select(scores, budget=10, threshold=0.65) == [T, T, F, T, T, T]
    assert select(scores, budget=1.0, threshold=0.65) == [T, T, F, T, T, T]


def test_ties_go_to_the_earlier_chunk() -> None:
    assert select([1.0] * 5, budget=2, sink_chunks=0, recent_chunks=0) == [T, T, F, F, F]
    assert select([0.0, 2.0, 1.0, 2.0, 2.0], budget=2, sink_chunks=0, recent_chunks=0) == [
        F,
        T,
        F,
        T,
        F,
    ]
    # Also among threshold-passing chunks capped by a budget.
    assert select([3.0, 3.0, 3.0], budget=1, threshold=0.0, sink_chunks=0, recent_chunks=0) == [
        T,
        F,
        F,
    ]


def test_rows_are_selected_independently() -> None:
    scores = torch.tensor([[[0.0, 3.0, 1.0, 2.0]], [[3.0, 0.0, 2.0, 1.0]]])  # [B=2, 1, 4]
    keep = lsa.select_chunks(scores, budget=2, sink_chunks=0, recent_chunks=0)
    assert keep.tolist() == [[[F, T, F, T]], [[T, F, T, F]]]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_shape_and_dtype(dtype) -> None:
    scores = torch.randn(2, 3, 5, generator=torch.Generator().manual_seed(0)).to(dtype)
    keep = lsa.select_chunks(scores, budget=2)
    assert keep.dtype == torch.bool
    assert keep.shape == (2, 3, 5)
    assert keep.device == scores.device
    assert keep.sum(-1).eq(2).all()


def test_selection_feeds_sparse_attention() -> None:
    # sparse_attention(scores=..., budget=...) is sparse_attention(keep=select_chunks(...)).
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, s, 8, generator=gen) for s in (1, 40, 40))
    scores = torch.randn(1, 2, 5, generator=gen)
    keep = lsa.select_chunks(scores, budget=0.4)  # 2 of 5 chunks: the forced sink and recent
    assert keep.sum(-1).tolist() == [[2, 2]]
    via_scores = lsa.sparse_attention(q, k, v, scores=scores, budget=0.4, chunk_size=8)
    via_keep = lsa.sparse_attention(q, k, v, keep=keep, chunk_size=8)
    assert torch.equal(via_scores, via_keep)
