"""Sparse attention over kept chunks in plain PyTorch: keep -> token mask -> masked attention."""

from __future__ import annotations

import torch

from lsa.reference.dense import causal_mask, masked_attention


def token_mask(keep: torch.Tensor, chunk_size: int, len_kv: int) -> torch.Tensor:
    """Expand a keep mask [B, h, n_chunks] to tokens [B, h, S_kv]; the last chunk may be partial."""
    return keep.repeat_interleave(chunk_size, dim=-1)[..., :len_kv]


def reference_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    keep: torch.Tensor,
    *,
    chunk_size: int,
    causal: bool = True,
    scale: float | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """A query attends to key j iff j's chunk is kept and causality allows it; inputs validated.

    ``keep`` is [B, 1|H_kv, n_chunks]; a per-KV-head mask applies to that head's query group.
    """
    group = q.shape[1] // k.shape[1]
    tokens = token_mask(keep, chunk_size, k.shape[2])  # [B, 1|H_kv, S_kv]
    if tokens.shape[1] > 1 and group > 1:
        tokens = tokens.repeat_interleave(group, dim=1)  # [B, H_q, S_kv]
    allowed = tokens[:, :, None, :]  # [B, 1|H_q, 1, S_kv]
    if causal:
        allowed = allowed & causal_mask(q.shape[2], k.shape[2], q.device)
    return masked_attention(q, k, v, allowed, scale=scale, return_lse=return_lse)
