"""The host mirror: the full K/V history of every decoder layer, chunk-major, never dropped.

Storage is a list of segments, each ``[B, n, L, 2, H_kv, chunk_size, D]`` (``L`` decoder layers;
index 0 of the ``2`` dim = keys, 1 = values): one chunk of one row, K and V of *all* layers, is one
contiguous block, and a run of consecutive chunks is one contiguous block too. A recall (the same
resident set for every layer) therefore copies a run of chunks for all layers in one host -> device
copy, instead of one copy per layer: few, large copies are what reach the pinned bandwidth.
Growing the mirror appends a segment instead of copying the history. The first segment is sized to
what is first asked for (the prompt), later ones hold ``seg_chunks`` chunks each. Chunks are
*logical*: row ``b``'s tokens are counted from its first non-padding token. Segments are pinned when
the device is CUDA, so host <-> device copies are asynchronous DMA.
"""

from __future__ import annotations

from bisect import bisect_right

import torch


class HostMirror:
    """Chunk-major (layer inside) K/V history of all layers on the host."""

    def __init__(
        self,
        batch: int,
        layers: int,
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
        self.layers = layers
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

    @property
    def chunk_nbytes(self) -> int:
        """Bytes of one chunk of one row, all layers, K and V."""
        return (
            self.layers * 2 * self.heads_kv * self.chunk_size * self.head_dim * self.dtype.itemsize
        )

    def check_layer(self, layer: int, heads_kv: int, head_dim: int, dtype: torch.dtype) -> None:
        """Raise unless a layer's K/V fit the shared layout (every layer has the same shape)."""
        if not 0 <= layer < self.layers:
            raise IndexError(f"layer {layer} out of range for a mirror of {self.layers} layers")
        got, want = (heads_kv, head_dim, dtype), (self.heads_kv, self.head_dim, self.dtype)
        if got != want:
            raise ValueError(
                f"LSACache's mirror is shared by all layers and needs the same (KV heads, head "
                f"dim, dtype) in each; layer {layer} has {got}, layer 0 has {want}"
            )

    def ensure(self, n_chunks: int) -> None:
        """Grow (by a new segment, never copying) until ``n_chunks`` chunks per row fit."""
        if self.capacity >= n_chunks:
            return
        size = n_chunks - self.capacity if not self.segments else self.seg_chunks
        size = max(size, n_chunks - self.capacity)
        seg = torch.zeros(
            (
                self.batch,
                size,
                self.layers,
                2,
                self.heads_kv,
                self.chunk_size,
                self.head_dim,
            ),
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
        """View of one chunk, all layers: [L, 2, H_kv, chunk_size, D] (contiguous)."""
        seg, idx = self._locate(chunk)
        return self.segments[seg][row, idx]

    def chunk_addresses(self, rows: torch.Tensor, chunks: torch.Tensor) -> torch.Tensor:
        """Byte addresses of chunks ``chunks[i]`` of rows ``rows[i]`` (int64 tensors on the
        host): where each contiguous all-layer block begins, for kernels that read the pinned
        mirror directly. Equals ``chunk(r, c).data_ptr()``, computed without a Python loop."""
        starts = torch.tensor(self.starts, dtype=torch.int64)
        if bool((chunks < 0).any()) or bool((chunks >= self.capacity).any()):
            raise IndexError(f"chunk index out of range (capacity {self.capacity} chunks per row)")
        seg = torch.searchsorted(starts, chunks, right=True) - 1
        bases = torch.tensor([s.data_ptr() for s in self.segments], dtype=torch.int64)
        lengths = torch.tensor([s.shape[1] for s in self.segments], dtype=torch.int64)
        block = rows * lengths[seg] + chunks - starts[seg]
        return bases[seg] + block * self.chunk_nbytes

    def runs(self, row: int, first: int, count: int) -> list[tuple[int, torch.Tensor]]:
        """Contiguous views covering chunks ``first .. first+count-1`` of ``row``, split at
        segment borders: ``[(offset_in_range, view [n, L, 2, H_kv, chunk_size, D]), ...]``."""
        out = []
        done = 0
        while done < count:
            seg, idx = self._locate(first + done)
            n = min(count - done, self.segments[seg].shape[1] - idx)
            out.append((done, self.segments[seg][row, idx : idx + n]))
            done += n
        return out

    def write_chunks(self, row: int, first: int, layer: int, kv: torch.Tensor) -> None:
        """Write one layer's ``kv`` [n, 2, H_kv, chunk_size, D] (any device) to chunks
        ``first ..`` of ``row``.

        One chunk of one layer is contiguous in the mirror: that copy is asynchronous when the
        source is on CUDA and the mirror is pinned. Several chunks of one layer are strided (the
        other layers sit between them); torch then goes through a host temporary, synchronously
        (this happens once per layer, at prefill).
        """
        self.ensure(first + kv.shape[0])
        for offset, view in self.runs(row, first, kv.shape[0]):
            part = kv[offset : offset + view.shape[0]]
            if view.shape[0] > 1 and part.device != view.device:
                part = part.to(view.device)  # explicit synchronous copy, then a strided host one
            view[:, layer].copy_(part, non_blocking=self.pin)

    def tokens(self, row: int, layer: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first ``length`` logical tokens of ``row`` at ``layer`` as (K, V), each
        [H_kv, length, D]."""
        n = -(-length // self.chunk_size)
        if n == 0:
            empty = torch.zeros(
                (self.heads_kv, 0, self.head_dim), dtype=self.dtype, device=self.device
            )
            return empty, empty.clone()
        parts = [view[:, layer] for _, view in self.runs(row, 0, n)]
        kv = torch.cat(parts, dim=0)  # [n, 2, H, cs, D]
        kv = kv.permute(1, 2, 0, 3, 4).reshape(2, self.heads_kv, n * self.chunk_size, -1)
        return kv[0, :, :length], kv[1, :, :length]

    def nbytes(self) -> int:
        """Bytes of host storage actually allocated (capacity, not only the used part)."""
        return sum(seg.untyped_storage().nbytes() for seg in self.segments)
