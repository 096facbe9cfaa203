"""Attention over a compacted reserve: only resident chunks are stored, addressed by a block table.

The reserve holds ``n_slots`` chunk-sized slots per batch row and KV head; ``block_table[b, h, s]``
is the logical chunk in slot ``s`` (-1 = empty). Token ``o`` of slot ``s`` sits at the logical
position ``block_table[b, h, s] * chunk_size + o`` and exists iff that position is < ``kv_len[b]``.
The result equals :func:`reference_sparse_attention` over the logical KV with keep = the chunks in
the table, whatever order the slots are in.
"""

from __future__ import annotations

import torch

from lsa.reference.dense import masked_attention


def reserve_positions(block_table: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """Logical position of every reserve token, [B, h, n_slots * chunk_size]; -1 for empty slots."""
    offsets = torch.arange(chunk_size, device=block_table.device)
    pos = block_table[..., :, None] * chunk_size + offsets  # [B, h, n_slots, chunk_size]
    pos = pos.masked_fill(block_table[..., :, None] < 0, -1)
    return pos.flatten(-2)


def reference_reserve_attention(
    q: torch.Tensor,
    k_reserve: torch.Tensor,
    v_reserve: torch.Tensor,
    block_table: torch.Tensor,
    kv_len: torch.Tensor,
    *,
    chunk_size: int,
    causal: bool = True,
    scale: float | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """q [B, H_q, S_q, D]; k/v_reserve [B, H_kv, n_slots * chunk_size, D]; block_table
    [B, 1|H_kv, n_slots] int; kv_len [B] int, the logical KV length (query i of S_q sits at
    position kv_len - S_q + i). Inputs validated by the caller."""
    group = q.shape[1] // k_reserve.shape[1]
    pos = reserve_positions(block_table, chunk_size)  # [B, h, T]
    valid = (pos >= 0) & (pos < kv_len[:, None, None])
    if valid.shape[1] > 1 and group > 1:
        valid = valid.repeat_interleave(group, dim=1)
        pos = pos.repeat_interleave(group, dim=1)
    allowed = valid[:, :, None, :]  # [B, 1|H_q, 1, T]
    if causal:
        len_q = q.shape[2]
        q_pos = kv_len[:, None] - len_q + torch.arange(len_q, device=q.device)  # [B, S_q]
        allowed = allowed & (pos[:, :, None, :] <= q_pos[:, None, :, None])
    return masked_attention(q, k_reserve, v_reserve, allowed, scale=scale, return_lse=return_lse)
