"""Baseline chunk scorers at equal budget: Recency and Random.

Both implement :class:`lsa.indexer.scorer.ChunkScorer`, so :class:`lsa.cache.LSACache` runs them
exactly as it runs a trained indexer (same budget, sink, recent, refresh and footprint); only the
logits differ. Neither reads the model: their chunk keys are one number per chunk (the chunk's
index), and they declare no model dimensions, so they fit any decoder.

- :class:`RecencyScorer`: logit = chunk index, so the newest completed chunks are kept
  (ties cannot occur).
- :class:`RandomScorer`: logits drawn from a generator seeded by ``(seed, row position)``, so the
  same seed gives the same picks at the same positions, whatever ran before; every refresh draws
  anew (the position moves).
"""

from __future__ import annotations

from numbers import Integral

import torch


def _check(chunk_size: object, target_layers: object) -> tuple[int, tuple[int, ...]]:
    if not isinstance(chunk_size, Integral) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
    layers = tuple(target_layers)  # type: ignore[arg-type]
    if not layers or not all(isinstance(i, Integral) and i >= 0 for i in layers):
        raise ValueError(f"target_layers must be a non-empty tuple of ints >= 0, got {layers!r}")
    return int(chunk_size), tuple(int(i) for i in layers)


class RecencyScorer:
    """Newer chunks score higher: logits[b, j] = j (Recency-k% at the cache's budget).

    Args:
        chunk_size: tokens per chunk (the cache's chunk size).
        target_layers: the layer whose hidden state the cache captures; the scorer ignores it
            (the cache needs at least one). Layer 0 exists in every model.
    """

    def __init__(self, *, chunk_size: int = 64, target_layers: tuple[int, ...] = (0,)) -> None:
        self.chunk_size, self.target_layers = _check(chunk_size, target_layers)

    def encode_chunks(
        self, layer: int, keys: torch.Tensor, chunk_start: torch.Tensor
    ) -> torch.Tensor:
        # [B, n, 1]: the chunk's index, stored by the cache and read back by score()
        return (chunk_start.to(torch.float32) / self.chunk_size)[..., None]

    def score(
        self,
        hidden: dict[int, torch.Tensor],
        position: torch.Tensor,
        chunk_keys: dict[int, torch.Tensor],
    ) -> torch.Tensor:
        keys = chunk_keys[self.target_layers[0]]  # [B, n, 1]
        b, n, _ = keys.shape
        return torch.arange(n, dtype=torch.float32, device=keys.device).expand(b, n).clone()

    def __repr__(self) -> str:
        return f"RecencyScorer(chunk_size={self.chunk_size}, target_layers={self.target_layers})"


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
        self.chunk_size, self.target_layers = _check(chunk_size, target_layers)

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


__all__ = ["RandomScorer", "RecencyScorer"]
