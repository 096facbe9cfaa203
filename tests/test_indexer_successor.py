"""SuccessorScorer: each chunk scores at least its predecessor, so picks bring their next chunk."""

import pytest
import torch

import lsa
from lsa.scorers import RecencyScorer
from lsa.scorers.successor import SuccessorScorer


class FixedScorer:
    """Logits given up front (the first ``n`` of them for ``n`` chunks)."""

    chunk_size = 4
    target_layers = (0,)

    def __init__(self, logits):
        self.logits = torch.tensor(logits, dtype=torch.float32)

    def encode_chunks(self, layer, keys, chunk_start):
        return chunk_start.new_zeros((*chunk_start.shape, 1), dtype=torch.float32)

    def score(self, hidden, position, chunk_keys):
        b, n, _ = chunk_keys[0].shape
        return self.logits[:n].expand(b, n).clone()


def _score(scorer, n, b=2):
    keys = {0: torch.zeros(b, n, 1)}
    return scorer.score({0: torch.zeros(b, 8)}, torch.full((b,), 4 * n), keys)


def test_logits_are_raised_to_the_predecessors_and_no_further():
    inner = FixedScorer([0.0, 5.0, 1.0, -2.0, 3.0, 0.5, 0.0])
    out = _score(SuccessorScorer(inner), 7)
    # j: max(l[j], l[j-1]) from the inner logits (not the smoothed ones: one successor only)
    expected = torch.tensor([0.0, 5.0, 5.0, 1.0, 3.0, 3.0, 0.5])
    assert torch.equal(out, expected.expand(2, 7))
    assert torch.equal(_score(inner, 7), inner.logits.expand(2, 7))  # unchanged


def test_the_top_pick_and_its_successor_are_kept_together():
    logits = [0.0, 0.1, 9.0, 0.2, 0.0, 4.0, 0.3, 0.0, 0.0, 0.0]
    plain = lsa.select_chunks(
        _score(FixedScorer(logits), 10)[:1], budget=2, sink_chunks=0, recent_chunks=0
    )
    paired = lsa.select_chunks(
        _score(SuccessorScorer(FixedScorer(logits)), 10)[:1],
        budget=2,
        sink_chunks=0,
        recent_chunks=0,
    )
    assert plain[0].nonzero().flatten().tolist() == [2, 5]
    assert paired[0].nonzero().flatten().tolist() == [2, 3]


def test_it_delegates_keys_and_refuses_what_is_not_a_scorer():
    inner = RecencyScorer(chunk_size=16)
    wrapped = SuccessorScorer(inner)
    assert wrapped.chunk_size == 16 and wrapped.target_layers == (0,)
    start = torch.tensor([[0, 16, 32]])
    keys = torch.zeros(1, 2, 48, 8)
    assert torch.equal(wrapped.encode_chunks(0, keys, start), inner.encode_chunks(0, keys, start))
    with pytest.raises(TypeError, match="ChunkScorer"):
        SuccessorScorer(object())
