"""One request's KV in the serving core: its host mirror, its resident chunks and their blocks.

Every token a request writes goes to its mirror (write-through: the mirror holds every token at all
times, so a preemption or an eviction never loses KV). Decode tokens also go to the device block
of their chunk, which is resident (the tail: the chunks begun since the last refresh stay resident
until the next one). Prefill tokens go to the mirror only: the refresh that follows the prefill
places the first resident set.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lsa.cache.mirror import HostMirror
from lsa.vllm.block_pool import DeviceBlockPool


@dataclass
class RequestKV:
    """Per-request state. ``blocks`` maps each resident logical chunk to its pool block; it is
    empty while the request is preempted (``resident`` still names the chunks to restore)."""

    req_id: str
    mirror: HostMirror
    layer_len: list[int]  # tokens written per layer
    resident: set[int] = field(default_factory=set)
    blocks: dict[int, int] = field(default_factory=dict)
    chunk_keys: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [1, n, key_dim]
    decode_steps: int = 0
    placed: bool = False  # a resident set was placed (the prefill ended)
    preempted: bool = False

    @property
    def chunk_size(self) -> int:
        return self.mirror.chunk_size

    def kv_len(self) -> int:
        """Tokens written by every layer; raises if a step is half done (layers disagree)."""
        if len(set(self.layer_len)) != 1:
            raise ValueError(
                f"request {self.req_id!r}: layers hold different token counts {self.layer_len}; "
                "finish the step in every layer first"
            )
        return self.layer_len[0]

    def write(
        self, layer: int, k: torch.Tensor, v: torch.Tensor, pool: DeviceBlockPool | None
    ) -> None:
        """Append ``k``/``v`` [H_kv, n, D] of ``layer`` to the mirror and, with ``pool``, to the
        resident blocks (a chunk not resident yet gets a block, filled from the mirror)."""
        cs = self.chunk_size
        start, n = self.layer_len[layer], k.shape[1]
        self.mirror.ensure(-(-(start + n) // cs))
        done = 0
        while done < n:
            chunk, offset = divmod(start + done, cs)
            m = min(n - done, cs - offset)
            kv = torch.stack((k[:, done : done + m], v[:, done : done + m]))  # [2, H, m, D]
            self.mirror.chunk(0, chunk)[layer, :, :, offset : offset + m].copy_(kv)
            if pool is not None and chunk in self.blocks:
                block = pool.blocks[self.blocks[chunk], layer]
                block[:, :, offset : offset + m].copy_(kv.to(block.device))
            elif pool is not None:
                # A chunk begun now (or, defensively, one not resident): the mirror already holds
                # everything written to it, this token included, in every layer.
                self.recall([chunk], pool)
                self.resident.add(chunk)
            done += m
        self.layer_len[layer] = start + n

    def recall(self, chunks: list[int], pool: DeviceBlockPool) -> None:
        """Give each of ``chunks`` a block and copy it, all layers at once, from the mirror."""
        for chunk, block in zip(chunks, pool.allocate(len(chunks)), strict=True):
            pool.blocks[block].copy_(self.mirror.chunk(0, chunk), non_blocking=self.mirror.pin)
            self.blocks[chunk] = block

    def evict(self, chunks: list[int], pool: DeviceBlockPool) -> None:
        """Free the blocks of ``chunks`` (their KV stays in the mirror)."""
        pool.free([self.blocks.pop(c) for c in chunks])

    def table(self) -> tuple[list[int], list[int]]:
        """(logical chunks, their pool blocks) of the resident set, in chunk order."""
        chunks = sorted(self.blocks)
        return chunks, [self.blocks[c] for c in chunks]
