"""The contract between a chunk scorer (a memory indexer or a baseline) and the cache that
consults it.

The cache (``lsa.cache``) knows nothing about how an indexer works; it only calls these methods.
Chunk keys are computed once per completed chunk from the keys the cache already holds, kept on
the device (they are small), and scored every ``refresh_every`` decode steps.

Token ids (optional). A scorer that reads text rather than model state (``lsa.scorers.text``)
declares ``reads_token_ids = True``. The cache then records each row's token ids (the prompt's from
the forward's ``input_ids`` or ``LSACache.load_prefill(input_ids=...)``, then one per decode step)
and passes them as one more keyword, ``token_ids=``, a :class:`TokenIds`, to ``encode_chunks``
(the rows being encoded, history up to the chunk's completion, nothing later) and to ``score`` (all
rows, history up to the current token). Scorers without the attribute are called exactly as before.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from numbers import Integral
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


@dataclass(frozen=True)
class TokenIds:
    """The token ids a ``reads_token_ids`` scorer gets, per row, as the cache stored them.

    ``ids[b]``: int64 [n_b] on the CPU, row ``b``'s logical tokens so far (no padding), the
    current token last; ``prompt_len[b]``: how many of them are the prompt's.
    """

    ids: tuple[torch.Tensor, ...]
    prompt_len: tuple[int, ...]


def reads_token_ids(scorer: object) -> bool:
    """Whether ``scorer`` asks the cache for token ids (the optional ``reads_token_ids``)."""
    return bool(getattr(scorer, "reads_token_ids", False))


def check_scorer_settings(chunk_size: object, target_layers: object) -> tuple[int, tuple[int, ...]]:
    """Validate the two settings every scorer declares; returns them as (int, tuple of ints)."""
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, Integral):
        raise TypeError(
            f"chunk_size must be an int, got {type(chunk_size).__name__} {chunk_size!r}"
        )
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if isinstance(target_layers, Integral) or not isinstance(target_layers, Iterable):
        raise TypeError(
            "target_layers must be a sequence of decoder layer indices, e.g. (7,) for one layer, "
            f"got {type(target_layers).__name__} {target_layers!r}"
        )
    layers = tuple(target_layers)
    if not layers or not all(
        isinstance(i, Integral) and not isinstance(i, bool) and i >= 0 for i in layers
    ):
        raise ValueError(f"target_layers must be a non-empty tuple of ints >= 0, got {layers!r}")
    return int(chunk_size), tuple(int(i) for i in layers)
