"""The device block pool: fixed-size KV blocks shared by all requests, one block = one chunk.

This plays the part of vLLM's paged KV cache (``kv_cache[num_blocks, ...]`` addressed through a
per-request block table), with one difference that LSA needs: a request holds blocks only for its
*resident* chunks, not for its whole history (the rest lives in its host mirror). A block holds one
chunk of every layer, K and V, ``[L, 2, H_kv, block_size, D]``, the same layout as one chunk of
:class:`lsa.cache.mirror.HostMirror`, so a recall is one contiguous copy per chunk.
"""

from __future__ import annotations

import torch

from lsa._validation import check_int


class PoolExhausted(RuntimeError):
    """Not enough free blocks: the engine must preempt a request (vLLM's answer) and retry."""


class DeviceBlockPool:
    """``num_blocks`` blocks of ``[L, 2, H_kv, block_size, D]`` and their free list.

    Args:
        num_blocks: blocks in the pool.
        layers, heads_kv, block_size, head_dim: the shape of one block (block_size = chunk_size).
        dtype, device: of the storage.
    """

    def __init__(
        self,
        num_blocks: int,
        *,
        layers: int,
        heads_kv: int,
        block_size: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ) -> None:
        self.num_blocks = check_int("num_blocks", num_blocks, minimum=1)
        self.layers = check_int("layers", layers, minimum=1)
        self.heads_kv = check_int("heads_kv", heads_kv, minimum=1)
        self.block_size = check_int("block_size", block_size, minimum=1)
        self.head_dim = check_int("head_dim", head_dim, minimum=1)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        self.blocks = torch.zeros(
            (num_blocks, layers, 2, heads_kv, block_size, head_dim),
            dtype=dtype,
            device=device,
        )
        # Popped from the end: the lowest ids are handed out first, which keeps tests readable.
        self._free = list(range(num_blocks - 1, -1, -1))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int]:
        """``n`` block ids, all or none (raises :class:`PoolExhausted` when fewer are free)."""
        n = check_int("n", n, minimum=0)
        if n > len(self._free):
            raise PoolExhausted(
                f"the block pool needs {n} free blocks, has {len(self._free)} of {self.num_blocks}"
            )
        out = [self._free.pop() for _ in range(n)]
        return out

    def free(self, ids: list[int]) -> None:
        """Return blocks to the pool; a block freed twice or never handed out is a bug: raises."""
        free = set(self._free)
        for i in ids:
            if not 0 <= i < self.num_blocks or i in free:
                raise ValueError(f"block {i} is not allocated (pool of {self.num_blocks} blocks)")
            free.add(i)
            self._free.append(i)

    def nbytes(self) -> int:
        """Bytes of device storage the pool holds (measured from the tensor)."""
        return self.blocks.untyped_storage().nbytes()
