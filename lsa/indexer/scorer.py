"""The contract between a memory indexer and the cache that consults it.

The cache (``lsa.cache``) knows nothing about how an indexer works; it only calls these methods.
Chunk keys are computed once per completed chunk from the keys the cache already holds, kept on
the device (they are small), and scored every ``refresh_every`` decode steps.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class ChunkScorer(Protocol):
    """Scores the chunks of a KV history for a query state; higher = more needed soon."""

    chunk_size: int
    #: Decoder layer indices whose attention input (the hidden state after the layer's input
    #: norm) and whose cached keys the scorer reads.
    target_layers: tuple[int, ...]

    def encode_chunks(
        self, layer: int, keys: torch.Tensor, chunk_start: torch.Tensor
    ) -> torch.Tensor:
        """Chunk keys for completed chunks.

        Args:
            layer: one of ``target_layers``.
            keys: the layer's cached keys (post-RoPE, as the cache stores them) for ``n`` whole
                chunks, [B, H_kv, n * chunk_size, D].
            chunk_start: int [B, n], the position of each chunk's first token.

        Returns:
            [B, n, key_dim] float chunk keys (the cache stores them as given).
        """
        ...

    def score(
        self,
        hidden: dict[int, torch.Tensor],
        position: torch.Tensor,
        chunk_keys: dict[int, torch.Tensor],
    ) -> torch.Tensor:
        """Logits [B, n] for ``n`` chunks.

        Args:
            hidden: per target layer, the attention input of the current token, [B, hidden_size].
            position: int [B], the current token's position.
            chunk_keys: per target layer, [B, n, key_dim] from :meth:`encode_chunks`.
        """
        ...
