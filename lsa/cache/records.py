"""What an :class:`~lsa.cache.LSACache` reports: footprint, refreshes, recall."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class Footprint:
    """Bytes held by an :class:`LSACache`, from real storage sizes (capacity included).

    ``dense_bytes`` is what a ``DynamicCache`` holds for the same tokens: K and V of
    ``[B, H_kv, seq_len, D]`` per layer (padding included, as DynamicCache stores it).
    """

    reserve_bytes: int  # device K/V slots of all layers: resident chunks, tail, free slots
    tail_bytes: int  # part of reserve_bytes: slots that hold tail chunks now
    block_table_bytes: int
    chunk_key_bytes: int
    other_device_bytes: int  # kv_len and per-row slot indices
    host_bytes: int  # the mirror
    dense_bytes: int
    resident_chunks: tuple[int, ...]  # per row, chunks in the reserve (tail included)
    total_chunks: tuple[int, ...]  # per row, chunks of the history (partial included)

    @property
    def device_bytes(self) -> int:
        return (
            self.reserve_bytes
            + self.block_table_bytes
            + self.chunk_key_bytes
            + self.other_device_bytes
        )

    @property
    def device_fraction(self) -> float:
        """Device-side KV bytes / dense KV bytes (sink, recent, tail and free slots included)."""
        return self.device_bytes / self.dense_bytes if self.dense_bytes else float("nan")


@dataclass
class RefreshRecord:
    """One refresh: what the scorer said and what became resident, per row."""

    step: int  # the decode step (1-based) from which this set is used
    kv_len: list[int]  # logical tokens per row when selecting
    logits: list[torch.Tensor | None]  # per row [n_completed] (cpu, fp32)
    keep: list[torch.Tensor]  # per row bool [n_completed]: the policy's keep mask
    resident: list[list[int]]  # per row, chunks in the reserve after the refresh (keep + tail)
    recalled: list[int]  # per row, chunks copied mirror -> reserve
    recalled_bytes: int = 0  # all layers


@dataclass
class RecallStats:
    """Copies mirror -> reserve so far; CUDA events (side stream) when on CUDA."""

    chunks: int = 0  # chunk copies, all layers
    bytes: int = 0
    copies: int = 0  # host -> device copy calls (one per run of consecutive chunks, all layers)
    slot_moves: int = 0  # device-side slot moves that keep the reserve compacted (per layer)
    events: list[tuple[torch.cuda.Event, torch.cuda.Event, int]] = field(default_factory=list)

    def cuda_seconds(self) -> float:
        """Side-stream time of all recalls (synchronises); 0 on CPU."""
        if not self.events:
            return 0.0
        self.events[-1][1].synchronize()
        return sum(start.elapsed_time(end) for start, end, _ in self.events) / 1e3
