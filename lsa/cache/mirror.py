"""The host mirror: the full K/V history of one decoder layer, chunk-major, never dropped.

Storage is a list of segments, each ``[B, n, 2, H_kv, chunk_size, D]`` (index 0 of dim 2 = keys,
1 = values), so that the K and V of one chunk of one row are one contiguous block: recalling a
chunk is one contiguous copy, and growing the mirror appends a segment instead of copying the
history. The first segment is sized to what is first asked for (the prompt), later ones hold
``seg_chunks`` chunks each, so a long prompt is one allocation and generation wastes at most
``seg_chunks - 1`` chunks. Chunks are *logical*: row ``b``'s tokens are counted from its first
non-padding token. Segments are pinned when the device is CUDA, so host <-> device copies are
asynchronous DMA.
"""

from __future__ import annotations

from bisect import bisect_right

import torch


class HostMirror:
    """Chunk-major K/V history of one layer on the host."""

    def __init__(
        self,
        batch: int,
        heads_kv: int,
        chunk_size: int,
        head_dim: int,
        dtype: torch.dtype,
        *,
        device: torch.device,
        pin: bool,
        seg_chunks: int = 64,
    ) -> None:
        self.batch = batch
        self.heads_kv = heads_kv
        self.chunk_size = chunk_size
        self.head_dim = head_dim
        self.dtype = dtype
        self.device = device
        self.pin = pin
        self.seg_chunks = seg_chunks
        self.segments: list[torch.Tensor] = []
        self.starts: list[int] = []  # first chunk of each segment

    @property
    def capacity(self) -> int:
        """Chunks per row that fit without a new segment."""
        return self.starts[-1] + self.segments[-1].shape[1] if self.segments else 0

    def ensure(self, n_chunks: int) -> None:
        """Grow (by a new segment, never copying) until ``n_chunks`` chunks per row fit."""
        if self.capacity >= n_chunks:
            return
        size = n_chunks - self.capacity if not self.segments else self.seg_chunks
        size = max(size, n_chunks - self.capacity)
        seg = torch.zeros(
            (self.batch, size, 2, self.heads_kv, self.chunk_size, self.head_dim),
            dtype=self.dtype,
            device=self.device,
            pin_memory=self.pin,
        )
        self.starts.append(self.capacity)
        self.segments.append(seg)

    def _locate(self, chunk: int) -> tuple[int, int]:
        seg = bisect_right(self.starts, chunk) - 1
        return seg, chunk - self.starts[seg]

    def chunk(self, row: int, chunk: int) -> torch.Tensor:
        """View of one chunk, [2, H_kv, chunk_size, D] (contiguous)."""
        seg, idx = self._locate(chunk)
        return self.segments[seg][row, idx]

    def runs(self, row: int, first: int, count: int) -> list[tuple[int, torch.Tensor]]:
        """Contiguous views covering chunks ``first .. first+count-1`` of ``row``, split at
        segment borders: ``[(offset_in_range, view [n, 2, H_kv, chunk_size, D]), ...]``."""
        out = []
        done = 0
        while done < count:
            seg, idx = self._locate(first + done)
            n = min(count - done, self.segments[seg].shape[1] - idx)
            out.append((done, self.segments[seg][row, idx : idx + n]))
            done += n
        return out

    def write_chunks(self, row: int, first: int, kv: torch.Tensor) -> None:
        """Write ``kv`` [n, 2, H_kv, chunk_size, D] (any device) to chunks ``first ..`` of ``row``.

        The copy is asynchronous when the source is on CUDA and the mirror is pinned.
        """
        self.ensure(first + kv.shape[0])
        for offset, view in self.runs(row, first, kv.shape[0]):
            view.copy_(kv[offset : offset + view.shape[0]], non_blocking=self.pin)

    def tokens(self, row: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first ``length`` logical tokens of ``row`` as (K, V), each [H_kv, length, D]."""
        n = -(-length // self.chunk_size)
        if n == 0:
            empty = torch.zeros(
                (self.heads_kv, 0, self.head_dim), dtype=self.dtype, device=self.device
            )
            return empty, empty.clone()
        parts = [view for _, view in self.runs(row, 0, n)]
        kv = torch.cat(parts, dim=0)  # [n, 2, H, cs, D]
        kv = kv.permute(1, 2, 0, 3, 4).reshape(2, self.heads_kv, n * self.chunk_size, -1)
        return kv[0, :, :length], kv[1, :, :length]

    def nbytes(self) -> int:
        """Bytes of host storage actually allocated (capacity, not only the used part)."""
        return sum(seg.untyped_storage().nbytes() for seg in self.segments)
