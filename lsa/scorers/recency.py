"""RecencyScorer: the newest completed chunks are kept (Recency-k% at the cache's budget).

A baseline at equal budget: :class:`lsa.cache.LSACache` runs it exactly as it runs a trained
indexer (same budget, sink, recent, refresh and footprint); only the logits differ. It reads no
model state: its chunk key is one number per chunk (the chunk's index), and it declares no model
dimensions, so it fits any decoder. Ties cannot occur.
"""

from __future__ import annotations

import torch

from lsa.scorers.contract import check_scorer_settings


class RecencyScorer:
    """Newer chunks score higher: logits[b, j] = j (Recency-k% at the cache's budget).

    Args:
        chunk_size: tokens per chunk (the cache's chunk size).
        target_layers: the layer whose hidden state the cache captures; the scorer ignores it
            (the cache needs at least one). Layer 0 exists in every model.
    """

    def __init__(self, *, chunk_size: int = 64, target_layers: tuple[int, ...] = (0,)) -> None:
        self.chunk_size, self.target_layers = check_scorer_settings(chunk_size, target_layers)

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


__all__ = ["RecencyScorer"]
