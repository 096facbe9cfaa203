"""Ranking metrics against the oracle, with forced chunks counted as select_chunks keeps them."""

import math

import pytest
import torch

from lsa.indexer.metrics import baseline_scores, evaluate, format_table, ndcg, position_metrics

KW = {"sink_chunks": 1, "recent_chunks": 2}


def _row(n=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    sel = torch.zeros(n, dtype=torch.bool)
    sel[1 : n - 2] = True
    y = torch.rand(n, generator=g) ** 4 * sel
    return y / y.sum(), sel


def test_oracle_scores_are_perfect():
    y, sel = _row()
    m = position_metrics(y, y, sel, 0.3, **KW)
    assert m == {"coverage": 1.0, "overlap": 1.0, "ndcg": pytest.approx(1.0)}


def test_hand_computed_example():
    # 10 chunks, sink 1 + recent 2 forced; budget 0.5 -> 5 kept -> 2 free picks.
    y = torch.tensor([0, 0.4, 0.3, 0.1, 0.1, 0.05, 0.05, 0, 0, 0])
    sel = torch.tensor([False] + [True] * 7 + [False] * 2)
    s = torch.tensor([9.0, 0.0, 5.0, 1.0, 4.0, 0.0, 0.0, 0.0, 9.0, 9.0])  # picks chunks 2 and 4
    m = position_metrics(s, y, sel, 0.5, **KW)
    assert m["coverage"] == pytest.approx((0.3 + 0.1) / (0.4 + 0.3))
    assert m["overlap"] == pytest.approx(0.5)
    # NDCG over the 7 selectable chunks in score order 2, 4, 3, then ties 1, 5, 6, 7
    disc = [1 / math.log2(i + 2) for i in range(7)]
    dcg = sum(g * d for g, d in zip([0.3, 0.1, 0.1, 0.4, 0.05, 0.05, 0], disc, strict=True))
    idcg = sum(g * d for g, d in zip([0.4, 0.3, 0.1, 0.1, 0.05, 0.05, 0], disc, strict=True))
    assert m["ndcg"] == pytest.approx(dcg / idcg)


def test_forced_chunks_use_up_the_budget():
    y, sel = _row(n=20)
    # 10% of 20 = 2 chunks < 3 forced: no free pick, the position is skipped.
    assert position_metrics(torch.randn(20), y, sel, 0.1, **KW) is None
    # 20% of 20 = 4 chunks: exactly one free pick, the oracle's is the chunk with most mass.
    best = int(torch.argmax(y))
    s = torch.zeros(20)
    s[best] = 1
    assert position_metrics(s, y, sel, 0.2, **KW)["overlap"] == 1.0


def test_ndcg_ignores_scale_and_breaks_ties_to_earlier():
    g = torch.tensor([0.0, 1.0, 0.5])
    assert ndcg(torch.tensor([0.0, 2.0, 1.0]), g) == pytest.approx(1.0)
    assert ndcg(torch.tensor([0.0, 0.0, 0.0]), g) < 1.0
    assert math.isnan(ndcg(torch.zeros(3), torch.zeros(3)))


def test_evaluate_ranks_oracle_above_baselines_and_formats():
    rows = [_row(n=40, seed=i) for i in range(30)]
    ys = [y for y, _ in rows]
    sels = [s for _, s in rows]
    methods = {"oracle": ys, **baseline_scores([40] * 30, ys)}  # snapkv := the target itself
    res = evaluate(methods, ys, sels, budgets=(0.1, 0.2), **KW)
    assert res["oracle"]["0.1"]["coverage"] == 1.0 and res["oracle"]["0.1"]["n"] == 30
    assert res["random"]["0.2"]["coverage"] < 0.9
    assert res["snapkv"]["0.2"]["overlap"] == 1.0
    table = format_table(res)
    assert "| oracle | 1.000 | 1.000 |" in table and "random" in table


def test_evaluate_checks_lengths():
    y, sel = _row()
    with pytest.raises(ValueError, match="score rows"):
        evaluate({"x": [y, y]}, [y], [sel])
