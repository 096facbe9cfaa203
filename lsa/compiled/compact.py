"""Attention over a compacted reserve through SDPA's fused kernels, merged exactly by log-sum-exp.

A decode query sees every token of every resident chunk, so attention over a reserve that holds
only complete resident chunks needs no mask at all: SDPA's fused kernels run it at the speed of
dense decoding over a tenth of the bytes (bench/README.md). The tokens written since the last
refresh (the tail) are attended separately and the two partial results are merged exactly with
their log-sum-exps — the same function as one softmax over both.
"""

from __future__ import annotations

import torch

from lsa.reference.dense import compute_dtype, masked_attention


def visible_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of every query over every key (no mask), with the log-sum-exp.

    Args:
        q: [B, H_q, S_q, D]; k, v: [B, H_kv, S, D] with H_q % H_kv == 0.

    Returns:
        (out [B, H_q, S_q, D] in q's dtype, lse [B, H_q, S_q] in fp32 (fp64 for fp64 inputs);
        zeros and -inf when S = 0).
    """
    b, hq, sq, d = q.shape
    hkv = k.shape[1]
    # With no mask, query rows are interchangeable: folding each KV head's query group into rows
    # turns grouped-query attention into plain multi-head attention for the fused kernels.
    qf = q.reshape(b, hkv, (hq // hkv) * sq, d)
    rows = qf.shape[2]
    if k.shape[2] == 0:
        out = q.new_zeros(b, hq, sq, v.shape[-1])
        lse = torch.full((b, hq, sq), -torch.inf, device=q.device, dtype=compute_dtype(q.dtype))
        return out, lse
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(
            qf, k, v, 0.0, False, False, scale=scale
        )[:2]
    elif q.is_cuda:
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(
            qf, k, v, None, True, 0.0, False, scale=scale
        )[:2]
    else:
        out, lse = masked_attention(qf, k, v, None, scale=scale, return_lse=True)
    lse = lse[..., :rows].to(compute_dtype(q.dtype))  # the efficient kernel pads the LSE's rows
    return out.reshape(b, hq, sq, -1), lse.reshape(b, hq, sq)


def prefix_mask(lengths: torch.Tensor, n: int) -> torch.Tensor:
    """bool [B, 1, 1, n]: row ``b`` sees its first ``lengths[b]`` keys (built once per decode step
    and shared by the layers)."""
    return (torch.arange(n, device=lengths.device)[None, :] < lengths[:, None])[:, None, None, :]


def prefix_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor, *, scale=None
) -> torch.Tensor:
    """Each row's queries over a prefix of its row's keys, in one SDPA call.

    Args:
        q: [B, H_q, S_q, D]; k, v: [B, H_kv, S, D] with H_q % H_kv == 0.
        allowed: :func:`prefix_mask` of the rows' lengths (each in [1, S]) and ``S``.

    Returns:
        out [B, H_q, S_q, D]. A batch whose rows see different prefixes needs a key-padding
        mask, which the flash kernel does not take; SDPA then runs its memory-efficient kernel
        (CUDA) or its CPU kernel with a boolean mask, instead of one call per row.
    """
    b, hq, sq, d = q.shape
    hkv = k.shape[1]
    qf = q.reshape(b, hkv, (hq // hkv) * sq, d)  # GQA folded into rows, as in visible_attention
    out = torch.nn.functional.scaled_dot_product_attention(qf, k, v, attn_mask=allowed, scale=scale)
    return out.reshape(b, hq, sq, -1)


def merge_attention(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine attention over two disjoint key sets into attention over their union.

    out_*: [..., D]; lse_*: [...] (-inf where a side saw no key). A row neither side saw
    stays zero with an LSE of -inf.
    """
    lse = torch.logaddexp(lse_a, lse_b)
    seen = torch.isfinite(lse)
    safe = torch.where(seen, lse, 0.0)
    w_a = torch.where(seen, torch.exp(lse_a - safe), 0.0)[..., None]
    w_b = torch.where(seen, torch.exp(lse_b - safe), 0.0)[..., None]
    ct = compute_dtype(out_a.dtype)
    out = out_a.to(ct) * w_a + out_b.to(ct) * w_b
    return out.to(out_a.dtype), lse
