"""FusionScorer (``lsa+text``): the lightning indexer's ranking and the text scorer's, fused.

The two scorers fail differently: the lightning indexer reads the decoder's state and can prefer a
look-alike needle; the text scorer reads what the question names but not what the model attends
to. Their logits live on unrelated scales, so they are fused by rank, taking the two
lists' picks in turn (round-robin): a chunk's fused order is its better rank of the two, ties
broken by its worse rank (then, in selection, by chunk order):

    fused[j] = −( min(r_lsa[j], r_text[j]) + max(r_lsa[j], r_text[j]) / (n + 1) )   (rank 1 = best)

A budget keeps a handful of chunks, so each list's first picks must survive: reciprocal rank
fusion (1/(k + r_lsa) + 1/(k + r_text)) instead prefers a chunk both lists rank second over one
that one list ranks first and the other last, for any k > 0, and the look-alike needle that the
indexer prefers would displace the one the question names.

Chunk keys: the indexer's at each of its target layers; at the first one the text scorer's
embedding is appended (``[B, n, key_dim_lsa + key_dim_text]``), so both count in the footprint.
"""

from __future__ import annotations

import torch

from lsa.scorers.contract import TokenIds
from lsa.scorers.text import TextScorer


def ranks(logits: torch.Tensor) -> torch.Tensor:
    """Float ranks [B, n], 1 = highest logit; ties go to the earlier chunk (as in selection)."""
    n = logits.shape[-1]
    # a stable sort of the negated logits puts equal logits in chunk order
    order = torch.sort(-logits.float(), dim=-1, stable=True).indices
    out = torch.empty_like(order)
    pos = torch.arange(1, n + 1, device=logits.device).expand_as(order)
    return out.scatter_(-1, order, pos).float()


def fuse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Round-robin fusion of two logit tensors [B, n] (see the module docstring)."""
    ra, rb = ranks(a), ranks(b)
    n = a.shape[-1]
    return -(torch.minimum(ra, rb) + torch.maximum(ra, rb) / (n + 1))


class FusionScorer:
    """A :class:`lsa.scorers.ChunkScorer`: round-robin rank fusion of an indexer and a text scorer.

    Args:
        indexer: the lightning indexer (any ``ChunkScorer`` that reads model state).
        text: a :class:`TextScorer` (its ``target_layers`` are ignored: it is called at the
            indexer's first target layer).
    """

    reads_token_ids = True

    def __init__(self, indexer, text: TextScorer) -> None:
        if not isinstance(text, TextScorer):
            raise TypeError(f"text must be a TextScorer, got {type(text).__name__}")
        if getattr(indexer, "reads_token_ids", False):
            raise TypeError("indexer must be a scorer of model state (one without token ids)")
        if indexer.chunk_size != text.chunk_size:
            raise ValueError(
                f"indexer.chunk_size ({indexer.chunk_size}) must equal text.chunk_size "
                f"({text.chunk_size})"
            )
        self.indexer, self.text = indexer, text
        self.chunk_size = indexer.chunk_size
        self.target_layers = tuple(indexer.target_layers)
        # the indexer's config (model dimensions) stays visible to LSACache's checks
        self.config = getattr(indexer, "config", None)

    def encode_chunks(
        self,
        layer: int,
        keys: torch.Tensor,
        chunk_start: torch.Tensor,
        *,
        token_ids: TokenIds | None = None,
    ) -> torch.Tensor:
        own = self.indexer.encode_chunks(layer, keys, chunk_start)
        if layer != self.target_layers[0]:
            return own
        text = self.text.encode_chunks(layer, keys, chunk_start, token_ids=token_ids)
        # stored in the indexer's dtype, which its score() expects back
        return torch.cat([own, text.to(own.device, own.dtype)], dim=-1)

    def score(
        self,
        hidden: dict[int, torch.Tensor],
        position: torch.Tensor,
        chunk_keys: dict[int, torch.Tensor],
        *,
        token_ids: TokenIds | None = None,
    ) -> torch.Tensor:
        first = self.target_layers[0]
        d_text = self.text.key_dim
        both = chunk_keys[first]
        own_keys = dict(chunk_keys)
        own_keys[first] = both[..., :-d_text]
        lsa_logits = self.indexer.score(hidden, position, own_keys)
        text_logits = self.text.score(
            hidden,
            position,
            {self.text.target_layers[0]: both[..., -d_text:]},
            token_ids=token_ids,
        )
        return fuse(lsa_logits, text_logits)

    def __repr__(self) -> str:
        return f"FusionScorer({self.indexer!r}, {self.text!r})"


__all__ = ["FusionScorer", "fuse", "ranks"]
