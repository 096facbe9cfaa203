"""RandomScorer: uniform random logits, deterministic for a seed (Random-k% at the cache's budget).

A baseline at equal budget, like :class:`lsa.scorers.recency.RecencyScorer`. Row ``b``'s logits at
a refresh come from a generator seeded by ``(seed, position[b])``: the same seed gives the same
picks at the same positions, whatever ran before; every refresh draws anew (the position moves).
"""

from __future__ import annotations

from numbers import Integral

import torch

from lsa.scorers.contract import check_scorer_settings


class RandomScorer:
    """Uniform random logits, deterministic for a seed (Random-k% at the cache's budget).

    Row ``b``'s logits at a refresh come from ``torch.Generator().manual_seed(f(seed,
    position[b]))``: two scorers with the same seed give the same logits for the same positions
    and chunk counts, independent of call order, batch composition or earlier requests.
    """

    def __init__(
        self, seed: int = 0, *, chunk_size: int = 64, target_layers: tuple[int, ...] = (0,)
    ) -> None:
        if not isinstance(seed, Integral) or isinstance(seed, bool):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        self.seed = int(seed)
        self.chunk_size, self.target_layers = check_scorer_settings(chunk_size, target_layers)

    def encode_chunks(
        self, layer: int, keys: torch.Tensor, chunk_start: torch.Tensor
    ) -> torch.Tensor:
        return chunk_start.new_zeros((*chunk_start.shape, 1), dtype=torch.float32)

    def score(
        self,
        hidden: dict[int, torch.Tensor],
        position: torch.Tensor,
        chunk_keys: dict[int, torch.Tensor],
    ) -> torch.Tensor:
        keys = chunk_keys[self.target_layers[0]]
        n = keys.shape[1]
        rows = []
        for pos in position.tolist():
            gen = torch.Generator().manual_seed((self.seed * 1_000_003 + int(pos)) % (2**63))
            rows.append(torch.rand(n, generator=gen))
        return torch.stack(rows).to(keys.device) if rows else keys.new_zeros((0, n))

    def __repr__(self) -> str:
        return (
            f"RandomScorer(seed={self.seed}, chunk_size={self.chunk_size}, "
            f"target_layers={self.target_layers})"
        )


__all__ = ["RandomScorer"]
