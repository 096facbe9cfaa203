"""Keep masks and block tables -> FlexAttention block lists, built on the device with no host sync.

A FlexAttention ``BlockMask`` lists, per (batch, mask head, query tile), the KV blocks to visit.
Here a KV block is one chunk (``KV_BLOCK_SIZE == chunk_size``), so the lists are the kept chunks
that causality lets the tile see. Chunks every query of the tile sees in full may go in the "full"
lists, where the kernel skips ``mask_mod``; the rest are "partial" and get ``mask_mod`` applied.

Query rows may be *folded*: ``[B, H_q, S_q, D] -> [B, H_kv, G * S_q, D]`` so that a per-KV-head
mask has one head per KV head (FlexDecoding needs mask heads of 1 or H_q). Row ``r`` then holds
query ``r % S_q`` of group member ``r // S_q``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

Q_TILE = 128  # FlexAttention's default query tile; decode (< 128 rows) is one tile


@dataclass(frozen=True)
class BlockLists:
    """kv_num_blocks [B, h, n_tiles] int32 and kv_indices [B, h, n_tiles, n_blocks] int32, for the
    partial blocks and (optionally) the full blocks."""

    kv_num_blocks: torch.Tensor
    kv_indices: torch.Tensor
    full_kv_num_blocks: torch.Tensor | None
    full_kv_indices: torch.Tensor | None


def row_positions(
    len_q: int, rows: int, offset: torch.Tensor | int, device: torch.device
) -> torch.Tensor:
    """Logical position of each query row, padded to whole tiles: [..., n_tiles * Q_TILE].

    ``offset`` is S_kv - S_q (an int, or an int tensor [B] per batch row); padded rows repeat the
    last row so they never widen a tile's bounds.
    """
    n_tiles = max(1, -(-rows // Q_TILE))
    r = torch.arange(n_tiles * Q_TILE, device=device).clamp(max=max(rows - 1, 0))
    pos = r % len_q if len_q > 0 else r
    if isinstance(offset, torch.Tensor):
        return pos + offset[:, None]  # [B, T]
    return pos + offset


def _lists(live: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """bool [..., n] -> (count [...] int32, indices [..., n] int32 with the True ones first)."""
    num = live.sum(-1, dtype=torch.int32)
    idx = torch.argsort((~live).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    return num, idx


def _split(live: torch.Tensor, full: torch.Tensor | None, full_lists: bool | None) -> BlockLists:
    """Partial = live and not full. ``full_lists``: True = full lists from ``full``; False =
    zero-filled full lists (compiled CPU flex needs them present); None = no full lists."""
    if full_lists and full is not None:
        full = full & live
        num, idx = _lists(live & ~full)
        fnum, fidx = _lists(full)
        return BlockLists(num, idx, fnum, fidx)
    num, idx = _lists(live)
    if full_lists is False:
        return BlockLists(num, idx, torch.zeros_like(num), torch.zeros_like(idx))
    return BlockLists(num, idx, None, None)


def chunk_block_lists(
    keep: torch.Tensor,
    *,
    chunk_size: int,
    len_q: int,
    len_kv: int,
    rows: int,
    causal: bool,
    full_lists: bool | None,
) -> BlockLists:
    """Block lists for sparse attention over the full logical KV.

    Args:
        keep: bool [B, h, n_chunks].
        rows: query rows per head (S_q, or G * S_q when folded).
        full_lists: see :func:`_split`.
    """
    device = keep.device
    n_chunks = keep.shape[-1]
    pos = row_positions(len_q, rows, len_kv - len_q, device).view(-1, Q_TILE)  # [n_tiles, Q_TILE]
    lo, hi = pos.amin(-1), pos.amax(-1)  # [n_tiles]
    first = torch.arange(n_chunks, device=device) * chunk_size  # first token of each chunk
    last = (first + chunk_size).clamp(max=len_kv) - 1
    live = keep[:, :, None, :]  # [B, h, 1, n]
    if causal:
        live = live & (first <= hi[:, None])  # [B, h, n_tiles, n]
        full = (last <= lo[:, None]) & (first + chunk_size <= len_kv)
    else:
        live = live.expand(-1, -1, pos.shape[0], -1)
        full = (first + chunk_size <= len_kv).expand(pos.shape[0], -1)
    return _split(live, full[None, None], full_lists)


def reserve_block_lists(
    block_table: torch.Tensor,
    kv_len: torch.Tensor,
    *,
    chunk_size: int,
    len_q: int,
    rows: int,
    causal: bool,
    full_lists: bool | None,
) -> BlockLists:
    """Block lists for attention over a compacted reserve (KV block = reserve slot).

    Every occupied slot is listed whatever ``kv_len`` is (mask_mod drops tokens past it), and a
    slot is full only once complete and visible to the whole tile; both stay true as ``kv_len``
    grows, so the lists stay valid until the block table changes.

    Args:
        block_table: int [B, h, n_slots], logical chunk per slot, -1 = empty.
        kv_len: int [B], logical KV length per row.
    """
    device = block_table.device
    pos = row_positions(len_q, rows, kv_len - len_q, device)  # [B, T]
    lo = pos.view(pos.shape[0], -1, Q_TILE).amin(-1)  # [B, n_tiles]
    end = (block_table + 1) * chunk_size  # [B, h, n_slots]
    occupied = (block_table >= 0)[:, :, None, :]  # [B, h, 1, n_slots]
    full = occupied & (end <= kv_len[:, None, None])[:, :, None, :]
    if causal:
        full = full & (end[:, :, None, :] - 1 <= lo[:, None, :, None])
    live = occupied.expand(-1, -1, lo.shape[1], -1)
    return _split(live, full.expand_as(live), full_lists)
