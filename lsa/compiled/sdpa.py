"""Reserve attention through SDPA with a token mask: no compile, any block table.

A mask over the reserve's tokens (occupied slot, position < kv_len, causal) makes any table exact.
With a mask PyTorch runs its memory-efficient kernel, not flash: on an H200 that is 2.6x the HBM
floor at B=8 (where flex's decode kernel is far slower) but 20x at B=1 (bench/README.md), so
"auto" picks it only for wide batches. Each KV head's query group is folded into rows so that
grouped-query attention needs no head expansion.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lsa.reference.reserve import reserve_positions


def sdpa_supports(q: torch.Tensor, return_lse: bool) -> str | None:
    """Why the sdpa backend cannot serve this call, or None when it can."""
    if return_lse:
        return "SDPA does not return the log-sum-exp (use backend='flex' or 'reference')"
    if q.dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        return f"the sdpa backend takes floating-point inputs, got {q.dtype}"
    return None


def sdpa_reserve_attention(
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
) -> torch.Tensor:
    """Same contract as ``reference_reserve_attention`` (without the LSE); inputs validated."""
    b, hq, sq, d = q.shape
    hkv = k_reserve.shape[1]
    group = hq // hkv
    pos = reserve_positions(block_table, chunk_size)  # [B, 1|H_kv, T]
    valid = (pos >= 0) & (pos < kv_len[:, None, None])
    mask = valid[:, :, None, :]  # [B, 1|H_kv, 1, T]: the same for every query row
    if causal and sq > 1:
        # Folded row r holds query r % S_q at logical position kv_len - S_q + r % S_q.
        rows = torch.arange(group * sq, device=q.device) % sq
        q_pos = kv_len[:, None] - sq + rows  # [B, G * S_q]
        mask = mask & (pos[:, :, None, :] <= q_pos[:, None, :, None])
    qf = q.reshape(b, hkv, group * sq, d)  # [B, H_kv, G * S_q, D]
    out = F.scaled_dot_product_attention(qf, k_reserve, v_reserve, attn_mask=mask, scale=scale)
    # A row that sees no key is zero by contract (SDPA would give NaN).
    out = torch.where(mask.any(-1, keepdim=True), out, 0.0)
    return out.reshape(b, hq, sq, -1)
