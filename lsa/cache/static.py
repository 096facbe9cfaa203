"""The decode step of an :class:`~lsa.cache.LSACache` with static shapes, for CUDA-graph capture.

The eager decode step decides on the host where each new token goes (which slot, whether a chunk
begins or completes) and uploads that every step; a captured step cannot: on replay no Python
runs. Here everything a step does is a device operation on tensors whose addresses never change:

- the reserve is allocated once at its worst case for the request (``max_new_tokens``), so no
  refresh reallocates it;
- per row, ``kv_len`` (grown in place), ``n_kept`` and ``tail_first`` live on the device; the write
  slot of the token at position ``p`` is ``n_kept + p // cs - tail_first`` (kept chunks fill slots
  ``0 .. n_kept - 1``, the tail follows them), written into the block table on the device;
- attention runs over the block table with per-row lengths (the Triton split-KV kernel on CUDA,
  the reference elsewhere): one launch per layer for rows of any lengths.

The host keeps the same bookkeeping in plain Python (:meth:`StaticDecode.host_step`, no device
work) so that the refresh, which runs between replays every τ steps, sees the state it always
saw. Chunks that complete between refreshes reach the mirror (and the scorer's chunk keys) at the
next refresh instead of at once: until then their tokens are in the reserve's tail, which a
refresh never drops before copying. Refresh writes its results into the same device tensors, in
place, so a captured step stays valid across refreshes.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

import torch

from lsa.backends import reserve_impl
from lsa.cache.attention import hand_over

if TYPE_CHECKING:
    from lsa.cache.cache import LSACache
    from lsa.cache.layer import LSALayer


class StaticDecode:
    """The static decode state of one request of ``cache`` (after its prefill)."""

    def __init__(self, cache: LSACache, max_new_tokens: int) -> None:
        if cache.phase != "decoding" or cache.decode_step != 0:
            raise RuntimeError(
                "a static decode starts right after the prefill (phase 'decoding', decode step "
                f"0); this cache is in phase {cache.phase!r} at decode step {cache.decode_step}"
            )
        self.cache = cache
        longest = max(cache.kv_len_host) + max_new_tokens
        slots = cache._worst_case_slots(longest)
        if slots > cache.n_slots:
            cache._slot_cap = max(slots, cache._slot_cap or 0)
            cache._grow(slots, "static")
        if cache.block_table is None or cache.block_table.shape[-1] != cache.n_slots:
            cache._push_block_table()
        self.max_new_tokens = max_new_tokens
        self.steps_left = max_new_tokens
        device = cache.device
        self.rows = torch.arange(cache.batch, device=device)
        self.n_kept = torch.zeros(cache.batch, dtype=torch.long, device=device)
        self.tail_first = torch.zeros(cache.batch, dtype=torch.long, device=device)
        self.write_tok = torch.zeros(cache.batch, dtype=torch.long, device=device)
        self.completed: list[tuple[int, int, int]] = []  # (row, chunk, slot) not yet mirrored
        self.attend = reserve_impl(device)
        self.thread = threading.get_ident()
        cache.hidden = cache._captures.setdefault(self.thread, {})
        self._push_rows()

    # -- host side, between replays -----------------------------------------------------------

    def host_step(self) -> None:
        """The host's bookkeeping of one decode step (what the eager step does before its
        layer 0): new chunks take the tail's next slot in ``bt_host``, completed chunks are noted
        for the next refresh, lengths grow by one. No device work, except placing the set of a
        lagged refresh when this is the step it was chosen for."""
        cache = self.cache
        if self.steps_left <= 0:
            raise RuntimeError(
                f"this static decode was set up for {self.max_new_tokens} new tokens; a further "
                "step would outgrow the reserve allocated for it"
            )
        if cache._pending is not None and cache._pending.step == cache.decode_step + 1:
            # chunks completed since the last refresh may move: mirror them from where they are
            self._mirror_completed()
            grows = len(cache.grows)
            cache._apply_pending()
            self._check_no_grow(grows)
            self._push_rows()
        self.steps_left -= 1
        cs = cache.chunk_size
        cache.decode_step += 1
        cache.seq_len += 1
        for b in range(cache.batch):
            pos = cache.kv_len_host[b]
            c, off = divmod(pos, cs)
            if c not in cache.slot_of[b]:
                slot = cache.n_kept[b] + c - cache.tail_first[b]
                cache.slot_of[b][c] = slot
                cache.bt_host[b, slot] = c
            if off == cs - 1:
                self.completed.append((b, c, cache.slot_of[b][c]))
            cache.kv_len_host[b] = pos + 1
            cache.visible[b] = cache.n_kept[b] * cs + pos + 1 - cache.tail_first[b] * cs

    def refresh_due(self) -> bool:
        """Whether the step just run was a refresh step (every τ decode steps; the prefill ran
        the first refresh itself)."""
        step = self.cache.decode_step
        return step > 0 and step % self.cache.refresh_every == 0

    def refresh(self) -> None:
        """The refresh after the current step (between replays): chunks completed since the
        last one go to the mirror and get their chunk keys, then the usual refresh runs, and
        its results land in the device tensors the captured step reads."""
        cache = self.cache
        self._mirror_completed()
        grows = len(cache.grows)
        cache._refresh()
        self._check_no_grow(grows)
        if cache._pending is None:  # placed at once (a lagged set is placed by host_step)
            self.ready()
            self._push_rows()

    def _check_no_grow(self, grows: int) -> None:
        if len(self.cache.grows) != grows:
            raise RuntimeError(
                "the reserve grew during a static decode (its worst case was undercounted): "
                f"{self.cache.grows[-1]}"
            )

    def ready(self) -> None:
        """Make the current stream wait for the recall's side stream (a captured step cannot
        wait on the per-layer events the eager step waits on)."""
        cache = self.cache
        if cache._stream is not None:
            torch.cuda.current_stream(cache.device).wait_stream(cache._stream)
        for layer in cache.layers:
            layer.ready = None

    def _push_rows(self) -> None:
        cache = self.cache
        self.n_kept.copy_(torch.tensor(cache.n_kept, dtype=torch.long))
        self.tail_first.copy_(torch.tensor(cache.tail_first, dtype=torch.long))

    def finish(self) -> None:
        """After the last step: completed chunks to the mirror (the partial one stays in the
        tail, as after an eager step; :meth:`LSACache.flush` copies it)."""
        self._mirror_completed()

    def _mirror_completed(self) -> None:
        """The chunks completed since the last refresh: to the mirror, every layer, and their
        chunk keys (what the eager step does as each chunk completes)."""
        cache = self.cache
        if self.completed:
            cache._completing = self.completed
            for layer in cache.layers:
                cache._complete_chunks(layer)
            cache._completing = []
            self.completed = []

    # -- device side, inside the captured step ----------------------------------------------

    def update(
        self, key: torch.Tensor, value: torch.Tensor, layer: LSALayer
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write one layer's new K/V [B, H_kv, 1, D] into its reserve slot (device only)."""
        cache = self.cache
        cs = cache.chunk_size
        if layer.layer_idx == 0:
            pos = cache.kv_len.long()  # the new token's position, per row
            chunk = pos // cs
            slot = self.n_kept + chunk - self.tail_first
            cache.block_table[self.rows, 0, slot] = chunk.to(cache.block_table.dtype)
            self.write_tok.copy_(slot * cs + pos % cs)
            cache.kv_len.add_(1)
        b, h, _, d = key.shape
        rk = layer.reserve_k.view(b, h, cache.n_slots * cs, d)
        rv = layer.reserve_v.view(b, h, cache.n_slots * cs, d)
        rk[self.rows, :, self.write_tok] = key[:, :, 0]
        rv[self.rows, :, self.write_tok] = value[:, :, 0]
        hand_over(layer, rk, "decode")
        return rk, rv

    def attention(
        self, query: torch.Tensor, k_reserve: torch.Tensor, v_reserve: torch.Tensor, scaling
    ) -> torch.Tensor:
        """One query per row over its resident chunks and tail: [B, H_q, 1, D] -> [B, 1, H_q, D]."""
        cache = self.cache
        out = self.attend(
            query,
            k_reserve,
            v_reserve,
            cache.block_table,
            cache.kv_len,
            chunk_size=cache.chunk_size,
            causal=True,
            scale=scaling,
        )
        return out.transpose(1, 2).contiguous()
