"""One decoder layer's share of an :class:`~lsa.cache.LSACache`: its device reserve.

Bookkeeping that all layers share (per-row lengths, padding, the block table, refresh, and the
host mirror, which stores a chunk of every layer as one block) lives in the cache; a layer only
holds its device tensors:

- ``reserve_k`` / ``reserve_v``: device ``[B, H_kv, n_slots, chunk_size, D]``; slot ``s`` of row
  ``b`` holds the logical chunk ``cache.block_table[b, 0, s]`` (-1 = empty). The tail (tokens
  written since the last refresh) lives in reserve slots too, so one ``reserve_attention`` call
  covers resident chunks and tail.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from transformers.cache_utils import CacheLayerMixin

if TYPE_CHECKING:
    from lsa.cache.cache import LSACache


class LSALayer(CacheLayerMixin):
    """Cache layer of one full-attention decoder layer; all logic is delegated to the cache."""

    is_compileable = False
    is_sliding = False
    is_croppable = False

    def __init__(self, cache: LSACache, layer_idx: int) -> None:
        super().__init__()
        self.cache = cache
        self.layer_idx = layer_idx
        self.reserve_k: torch.Tensor | None = None  # [B, H_kv, n_slots, chunk_size, D]
        self.reserve_v: torch.Tensor | None = None
        #: CUDA event recorded on the recall stream after this layer's last recall; the next
        #: write or attention of this layer waits on it (None = nothing pending).
        self.ready: torch.cuda.Event | None = None
        self.dtype: torch.dtype | None = None
        self.heads_kv = 0
        self.head_dim = 0

    def __repr__(self) -> str:
        return f"LSALayer(layer_idx={self.layer_idx})"

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype = key_states.dtype
        self.heads_kv = key_states.shape[1]
        self.head_dim = key_states.shape[3]
        self.device = self.cache.device
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cache.update(key_states, value_states, self.layer_idx)

    def get_mask_sizes(self, query_length) -> tuple[int, int]:
        return self.cache.get_mask_sizes(query_length)

    def get_seq_length(self) -> int:
        return self.cache.seq_len

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.reserve_k = self.reserve_v = None
        self.ready = None
        self.keys = self.values = None
        self.is_initialized = False

    def device_nbytes(self) -> int:
        """Bytes of this layer's reserve (resident chunks and tail), from storage sizes."""
        return sum(
            t.untyped_storage().nbytes() for t in (self.reserve_k, self.reserve_v) if t is not None
        )

    def _unsupported(self, what: str) -> None:
        raise NotImplementedError(
            f"LSACache does not support {what} (beam search, contrastive search and cache "
            "cropping need a dense cache); use greedy or sampling decoding"
        )

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._unsupported("reorder_cache")

    def crop(self, tokens_to_remove: int) -> None:
        self._unsupported("crop")

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._unsupported("batch_repeat_interleave")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._unsupported("batch_select_indices")

    def offload(self) -> None:  # the mirror already lives on the host
        pass

    def prefetch(self) -> None:
        pass
