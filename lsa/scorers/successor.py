"""SuccessorScorer: a picked chunk brings the chunk after it (for spans cut by a chunk boundary).

A fact the answer needs (a needle's value, a variable's chain link) is a span of some tokens; when
it straddles a chunk boundary, its first chunk holds the words a query matches (the key) and the
next chunk only the rest (the digits). An indexer scores the first high and the second low, so
the cache keeps half the fact. Wrapping any scorer, this one raises each chunk's logit to at
least its predecessor's: ``logit'[j] = max(logit[j], logit[j - 1])``. Ties fall to the earlier
chunk in :func:`lsa.select_chunks`, so a top pick is followed by its successor before the next
pick, at the same budget (distinct regions halve in the worst case).
"""

from __future__ import annotations

import torch

from lsa.scorers.contract import ChunkScorer


class SuccessorScorer:
    """A :class:`~lsa.scorers.ChunkScorer` around ``inner``: same chunk keys, logits
    smoothed forward by one chunk (module docstring)."""

    def __init__(self, inner: ChunkScorer) -> None:
        if not isinstance(inner, ChunkScorer):
            raise TypeError(f"inner must be a ChunkScorer, got {type(inner).__name__}")
        self.inner = inner
        self.chunk_size = inner.chunk_size
        self.target_layers = tuple(inner.target_layers)
        # the cache checks a scorer's model dimensions through its config (LightningIndexer)
        self.config = getattr(inner, "config", None)

    def encode_chunks(
        self, layer: int, keys: torch.Tensor, chunk_start: torch.Tensor
    ) -> torch.Tensor:
        return self.inner.encode_chunks(layer, keys, chunk_start)

    def score(
        self,
        hidden: dict[int, torch.Tensor],
        position: torch.Tensor,
        chunk_keys: dict[int, torch.Tensor],
    ) -> torch.Tensor:
        logits = self.inner.score(hidden, position, chunk_keys)
        out = logits.clone()
        out[:, 1:] = torch.maximum(logits[:, 1:], logits[:, :-1])
        return out

    def __repr__(self) -> str:
        return f"SuccessorScorer({self.inner!r})"


__all__ = ["SuccessorScorer"]
