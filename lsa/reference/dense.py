"""Plain-PyTorch attention over an explicit token mask: the oracle for every fast path.

Readable first: it materialises the [B, H_q, S_q, S_kv] logits in fp32 (fp64 for fp64 inputs).
"""

from __future__ import annotations

import math

import torch


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp64 stays fp64; everything else is computed in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def causal_mask(len_q: int, len_kv: int, device: torch.device | None = None) -> torch.Tensor:
    """Bool [S_q, S_kv], bottom-right aligned: query i sits at position S_kv - S_q + i.

    For S_q = 2, S_kv = 5 (1 = may attend)::

        1 1 1 1 0
        1 1 1 1 1
    """
    pos_q = torch.arange(len_q, device=device) + (len_kv - len_q)
    return torch.arange(len_kv, device=device)[None, :] <= pos_q[:, None]


def masked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    allowed: torch.Tensor | None,
    *,
    scale: float | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """softmax(q k^T * scale) v where only ``allowed`` (bool, broadcastable to [B, H_q, S_q, S_kv])
    keys take part. Inputs are [B, H, S, D]; k/v heads are repeated for grouped-query attention.

    A query with no allowed key returns zeros and an LSE of -inf (FlexAttention's convention).
    """
    group = q.shape[1] // k.shape[1]
    ct = compute_dtype(q.dtype)
    qf, kf, vf = q.to(ct), k.to(ct), v.to(ct)
    if group > 1:
        kf = kf.repeat_interleave(group, dim=1)  # [B, H_q, S_kv, D]
        vf = vf.repeat_interleave(group, dim=1)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    logits = (qf @ kf.transpose(-1, -2)) * scale  # [B, H_q, S_q, S_kv]
    if allowed is not None:
        allowed = allowed.expand_as(logits)
        logits = logits.masked_fill(~allowed, -math.inf)
        visible = allowed.any(dim=-1, keepdim=True)
    else:
        visible = torch.ones((*logits.shape[:-1], 1), dtype=torch.bool, device=q.device)
    lse = torch.logsumexp(logits, dim=-1, keepdim=True)  # -inf on rows with no visible key
    probs = torch.exp(logits - lse).masked_fill(~visible, 0.0)
    out = (probs @ vf).to(q.dtype)
    if return_lse:
        return out, lse.squeeze(-1)
    return out


def reference_dense_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    scale: float | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Dense attention; inputs already validated."""
    allowed = causal_mask(q.shape[2], k.shape[2], q.device) if causal else None
    return masked_attention(q, k, v, allowed, scale=scale, return_lse=return_lse)
