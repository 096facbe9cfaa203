"""Equivalence properties of ``lsa.select_chunks`` against a plain-Python oracle.

The oracle ranks chunks by (score descending, index ascending) on the exact values of the scores
(``tensor.tolist()`` is exact for every float dtype), so ties go to the earlier chunk and the
threshold is compared without rounding. Results are compared exactly: selection is structure.

Examples per CI run (``ci`` profile, derandomized):
    test_select_budget_equivalence             200
    test_select_threshold_equivalence          120
    test_select_budget_threshold_equivalence   150
    test_select_scaling_equivalence            120
    this file                                  590
(see proofs/test_equivalence_attention.py for the total over proofs/).
"""

from __future__ import annotations

import math
from fractions import Fraction

import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import lsa

SCORE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def expected_count(budget: int | float, n_chunks: int) -> int:
    """The budget in chunks: an int as is, a fraction of n_chunks rounded up from its decimal
    value (``repr``), both capped at n_chunks."""
    if isinstance(budget, int):
        return min(budget, n_chunks)
    return min(n_chunks, math.ceil(Fraction(repr(float(budget))) * n_chunks))


def expected_row(
    scores: list[float],
    *,
    budget: int | float | None,
    threshold: float | None,
    sink_chunks: int,
    recent_chunks: int,
) -> list[bool]:
    n = len(scores)
    forced = [i < sink_chunks or i >= n - recent_chunks for i in range(n)]
    passing = [not forced[i] and (threshold is None or scores[i] > threshold) for i in range(n)]
    if budget is None:
        return [f or p for f, p in zip(forced, passing, strict=True)]
    free = max(0, expected_count(budget, n) - sum(forced))
    ranked = sorted((i for i in range(n) if passing[i]), key=lambda i: (-scores[i], i))
    picked = set(ranked[:free])
    return [forced[i] or i in picked for i in range(n)]


def expected_keep(scores: torch.Tensor, **select) -> torch.Tensor:
    rows = scores.reshape(-1, scores.shape[-1]).tolist()
    keep = [expected_row(row, **select) for row in rows]
    return torch.tensor(keep, dtype=torch.bool).reshape(scores.shape)


@st.composite
def score_tensors(draw) -> torch.Tensor:
    """Scores [..., n_chunks] with 0-2 leading dims, in any float dtype, often with ties."""
    lead = draw(st.lists(st.integers(1, 3), min_size=0, max_size=2))
    n_chunks = draw(st.integers(1, 40))
    values = st.one_of(
        st.sampled_from([-1.0, 0.0, -0.0, 0.5, 2.0]),  # ties, and -0.0 == 0.0
        st.floats(-1e3, 1e3, allow_nan=False, width=32),
    )
    flat = draw(
        st.lists(values, min_size=math.prod(lead) * n_chunks, max_size=math.prod(lead) * n_chunks)
    )
    dtype = draw(st.sampled_from(SCORE_DTYPES))
    return torch.tensor(flat, dtype=torch.float64).reshape(*lead, n_chunks).to(dtype)


budgets = st.one_of(
    st.integers(1, 50),
    st.sampled_from([0.1, 0.25, 1 / 3, 0.5, 2 / 3, 1.0]),
    st.floats(0.0, 1.0, exclude_min=True),
)
forced_counts = st.integers(0, 3)


@st.composite
def problems(draw, *, budget: bool, threshold: bool) -> tuple[torch.Tensor, dict]:
    """(scores, select_chunks keyword arguments)."""
    scores = draw(score_tensors())
    select = {"sink_chunks": draw(forced_counts), "recent_chunks": draw(forced_counts)}
    if budget:
        select["budget"] = draw(budgets)
    if threshold:
        # Often exactly a score, so that "strictly greater" matters.
        exact = st.sampled_from(scores.flatten().tolist())
        select["threshold"] = draw(exact | st.floats(-1e3, 1e3, allow_nan=False))
    return scores, select


def _check_result(keep: torch.Tensor, scores: torch.Tensor, select: dict) -> None:
    expected = expected_keep(
        scores,
        budget=select.get("budget"),
        threshold=select.get("threshold"),
        sink_chunks=select["sink_chunks"],
        recent_chunks=select["recent_chunks"],
    )
    assert keep.dtype == torch.bool, keep.dtype
    assert keep.shape == scores.shape, (keep.shape, scores.shape)
    assert keep.device == scores.device
    assert torch.equal(keep, expected), (
        f"select_chunks({select}) on {scores.dtype} scores {scores.tolist()}:\n"
        f"got      {keep.int().tolist()}\nexpected {expected.int().tolist()}"
    )


def _forced(n: int, select: dict) -> torch.Tensor:
    sink, recent = select["sink_chunks"], select["recent_chunks"]
    return torch.tensor([i < sink or i >= n - recent for i in range(n)], dtype=torch.bool)


def _no_forced(**select) -> dict:
    return {"sink_chunks": 0, "recent_chunks": 0, **select}


@settings(max_examples=200)
@example(problem=(torch.full((1, 30), 0.3), _no_forced(budget=0.1)))  # 0.1 of 30 is 3
@example(problem=(torch.zeros(2, 7), _no_forced(budget=1e-12)))  # a fraction > 0 keeps >= 1
@example(problem=(torch.tensor([1.0, 2.0, 2.0, 1.0, 2.0]), _no_forced(budget=2)))  # ties
@example(
    problem=(torch.tensor([5.0, 4.0, 3.0]), {"budget": 1, "sink_chunks": 2, "recent_chunks": 2})
)
@given(problem=problems(budget=True, threshold=False))
def test_select_budget_equivalence(problem) -> None:
    """Forced chunks always kept; kept count = max(budget count, forced count); the free picks
    are the top scores, ties to the earlier chunk."""
    scores, select = problem
    keep = lsa.select_chunks(scores, **select)
    _check_result(keep, scores, select)

    n = scores.shape[-1]
    forced = _forced(n, select)
    assert bool(keep[..., forced].all()), "a forced chunk was dropped"
    counts = keep.sum(dim=-1)
    assert bool((counts == max(expected_count(select["budget"], n), int(forced.sum()))).all())
    # Every free pick scores at least as high as every chunk left out.
    free, left_out = keep & ~forced, ~keep
    if bool(free.any()) and bool(left_out.any()):
        lowest_pick = scores.double().masked_fill(~free, math.inf).amin(dim=-1)
        highest_left = scores.double().masked_fill(~left_out, -math.inf).amax(dim=-1)
        assert bool((lowest_pick >= highest_left).all())


@settings(max_examples=120)
# 1.0 > 0.999 although 0.999 rounds to 1.0 in bf16: compare the exact values.
@example(problem=(torch.tensor([1.0, 1.0, 0.5], dtype=torch.bfloat16), _no_forced(threshold=0.999)))
@example(problem=(torch.tensor([[0.0, 1.0, 2.0]]), _no_forced(threshold=1.0)))  # strictly greater
@given(problem=problems(budget=False, threshold=True))
def test_select_threshold_equivalence(problem) -> None:
    """threshold alone keeps the forced chunks and every chunk scoring strictly above it."""
    scores, select = problem
    _check_result(lsa.select_chunks(scores, **select), scores, select)


@settings(max_examples=150)
@given(problem=problems(budget=True, threshold=True))
def test_select_budget_threshold_equivalence(problem) -> None:
    """budget and threshold: the passing chunks capped to the budget by score (ties to the
    earlier chunk), plus the forced chunks; nothing at or below the threshold unless forced."""
    scores, select = problem
    keep = lsa.select_chunks(scores, **select)
    _check_result(keep, scores, select)

    n = scores.shape[-1]
    forced = _forced(n, select)
    assert not bool((keep & ~forced & (scores.double() <= select["threshold"])).any())
    cap = max(expected_count(select["budget"], n), int(forced.sum()))
    assert bool((keep.sum(dim=-1) <= cap).all())


@settings(max_examples=120)
@given(
    problem=problems(budget=True, threshold=False),
    factor=st.floats(1e-3, 1e3),
    power=st.integers(-8, 8),
)
def test_select_scaling_equivalence(problem, factor, power) -> None:
    """Scaling the scores by a positive factor does not change a budget selection: any factor
    in fp64 (which keeps the order of lower-precision scores exactly) and a power of two in the
    scores' own dtype (exact when nothing overflows or underflows)."""
    scores, select = problem
    keep = lsa.select_chunks(scores, **select)
    if scores.dtype != torch.float64:  # fp64 scores times any factor may round into ties
        assert torch.equal(lsa.select_chunks(scores.double() * factor, **select), keep)
    doubled = scores * 2.0**power
    if bool(torch.isfinite(doubled).all()) and torch.equal(doubled / 2.0**power, scores):
        assert torch.equal(lsa.select_chunks(doubled, **select), keep)
