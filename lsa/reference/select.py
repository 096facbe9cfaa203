"""Chunk selection: scores -> keep mask. Shared by every backend (selection is policy, not math)."""

from __future__ import annotations

import math
from fractions import Fraction
from numbers import Integral

import torch

from lsa._validation import check_budget, check_int, check_scores_finite

#: the defaults of every ``sink_chunks`` / ``recent_chunks`` in lsa (API, cache, eval, labels):
#: the first chunk (attention sinks) and the newest completed one are always resident
SINK_CHUNKS = 1
RECENT_CHUNKS = 1


def budget_count(budget: int | float, n_chunks: int) -> int:
    """Chunks a budget allows: an int count as is (capped at n_chunks), a fraction rounded up.

    The fraction is rounded up from its decimal value, so that binary rounding of the float does
    not add a chunk: 0.1 of 30 chunks is 3, although ``0.1 * 30 == 3.0000000000000004``.
    """
    if isinstance(budget, Integral):
        return min(int(budget), n_chunks)
    decimal = Fraction(repr(float(budget)))  # the shortest decimal that reads back as budget
    return min(math.ceil(decimal * n_chunks), n_chunks)


def forced_chunks(
    n_chunks: int, sink_chunks: int, recent_chunks: int, device: torch.device | None = None
) -> torch.Tensor:
    """Bool [n_chunks]: the first ``sink_chunks`` and the last ``recent_chunks`` chunks."""
    idx = torch.arange(n_chunks, device=device)
    return (idx < sink_chunks) | (idx >= n_chunks - recent_chunks)


def select_chunks(
    scores: torch.Tensor,
    *,
    budget: int | float | None = None,
    threshold: float | None = None,
    sink_chunks: int = SINK_CHUNKS,
    recent_chunks: int = RECENT_CHUNKS,
) -> torch.Tensor:
    """Turn chunk scores into a keep mask (True = resident).

    Args:
        scores: float tensor ``[..., n_chunks]`` (usually ``[B, 1|H_kv, n_chunks]``); higher means
            more needed. Must be finite.
        budget: how many chunks may be kept, forced ones included: an int count, or a fraction in
            (0, 1] of ``n_chunks`` rounded up. Forced chunks are kept even past it.
        threshold: keep chunks whose score is strictly greater. With ``budget`` too, the passing
            chunks are capped to the budget by score.
        sink_chunks: the first chunks, always kept.
        recent_chunks: the last chunks, always kept.

    Returns:
        bool tensor with the shape and device of ``scores``. Among equal scores the earlier chunk
        wins, so the result is deterministic.
    """
    if not isinstance(scores, torch.Tensor):
        raise TypeError(f"scores must be a torch.Tensor, got {type(scores).__name__}")
    if scores.dim() < 1:
        raise ValueError("scores must have a chunk dimension [..., n_chunks], got a 0-d tensor")
    check_scores_finite(scores)
    check_budget(budget, threshold)
    sink_chunks = check_int("sink_chunks", sink_chunks, minimum=0)
    recent_chunks = check_int("recent_chunks", recent_chunks, minimum=0)

    n_chunks = scores.shape[-1]
    forced = forced_chunks(n_chunks, sink_chunks, recent_chunks, scores.device).expand_as(scores)
    candidate = ~forced
    if threshold is not None:
        # In fp64, which holds every score and the threshold exactly: in the scores' own dtype
        # the threshold would be rounded first (0.999 is 1.0 in bf16, and 1.0 > 0.999).
        candidate = candidate & (scores.to(torch.float64) > threshold)
    if budget is None:
        return forced | candidate

    # Forced chunks are the same in every row: sink and recent overlap only when they cover all.
    n_forced = min(n_chunks, sink_chunks + recent_chunks)
    free = max(0, budget_count(budget, n_chunks) - n_forced)
    # Candidates rank first (others get -inf); a stable sort puts the earlier chunk first on ties.
    masked = scores.masked_fill(~candidate, -math.inf)
    top = torch.sort(masked, dim=-1, descending=True, stable=True).indices[..., :free]
    picked = torch.zeros_like(candidate).scatter_(-1, top, True)
    return forced | (candidate & picked)
