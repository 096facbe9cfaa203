"""The host mirror of one CSA layer's compressed series: every entry ever written, never dropped.

The seed stored decode-time entries only in a fixed device region and dropped them after 512
(2048 generated tokens, ``seed_spec.md`` §7); here every entry, prompt or generated, is appended
to a growable host buffer (pinned when the entries come from CUDA, so recalls can be async).
"""

from __future__ import annotations

import torch


class HostMirror:
    """Append-only ``[B, n, D]`` host copy of one compressed series of one layer."""

    def __init__(self) -> None:
        self._buf: torch.Tensor | None = None
        self.length = 0

    def append(self, entries: torch.Tensor) -> None:
        """Copy ``entries`` [B, n, D] (any device) to the end of the mirror."""
        if entries.dim() != 3:
            raise ValueError(f"entries must be [B, n, D], got {tuple(entries.shape)}")
        n = entries.shape[1]
        if self._buf is None:
            pin = entries.is_cuda
            shape = (entries.shape[0], max(64, 2 * n), entries.shape[2])
            self._buf = torch.empty(shape, dtype=entries.dtype, pin_memory=pin)
        elif entries.shape[0] != self._buf.shape[0] or entries.shape[2] != self._buf.shape[2]:
            raise ValueError(
                f"entries must be [{self._buf.shape[0]}, n, {self._buf.shape[2]}] like the earlier "
                f"ones, got {tuple(entries.shape)}"
            )
        if self.length + n > self._buf.shape[1]:
            grown = torch.empty(
                (self._buf.shape[0], 2 * (self.length + n), self._buf.shape[2]),
                dtype=self._buf.dtype,
                pin_memory=self._buf.is_pinned(),
            )
            grown[:, : self.length] = self._buf[:, : self.length]
            self._buf = grown
        self._buf[:, self.length : self.length + n].copy_(entries.detach())
        self.length += n

    def view(self) -> torch.Tensor:
        """[B, length, D]: the entries written so far (a view, not a copy)."""
        if self._buf is None:
            raise ValueError("the mirror is empty: nothing was appended yet")
        return self._buf[:, : self.length]

    def gather(self, rows: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Host entries [n, D] of (row, entry id) pairs, both int [n] on the host; in pinned
        memory when the mirror is pinned, so the copy to the device can be asynchronous."""
        if self._buf is None:
            raise ValueError("the mirror is empty: nothing was appended yet")
        if bool((ids >= self.length).any()):
            raise ValueError(f"ids must be < {self.length} (entries written), got {int(ids.max())}")
        flat = self._buf.view(-1, self._buf.shape[2])  # rows of [B * capacity, D]
        out = torch.empty(
            (ids.numel(), flat.shape[1]), dtype=flat.dtype, pin_memory=self._buf.is_pinned()
        )
        return torch.index_select(flat, 0, rows * self._buf.shape[1] + ids, out=out)

    @property
    def nbytes(self) -> int:
        """Bytes of the entries held (not the spare capacity)."""
        if self._buf is None:
            return 0
        return self._buf.shape[0] * self.length * self._buf.shape[2] * self._buf.element_size()
