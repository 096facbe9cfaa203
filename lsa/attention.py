"""The public attention functions: validate once, then hand over to a backend."""

from __future__ import annotations

import math

import torch

from lsa._validation import (
    check_backend,
    check_bool,
    check_budget,
    check_chunk_mask,
    check_int,
    check_qkv,
    check_reserve,
    check_scores_finite,
)
from lsa.backends import resolve_backend, resolve_reserve_backend
from lsa.reference.dense import reference_dense_attention
from lsa.reference.select import RECENT_CHUNKS, SINK_CHUNKS, select_chunks


def _without_autograd(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Under no_grad, inputs that require grad are detached: kernels without a backward (flex on
    the CPU, Triton) refuse such inputs even when no graph would be recorded."""
    if torch.is_grad_enabled():
        return tensors
    return tuple(t.detach() for t in tensors)


def dense_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    scale: float | None = None,
    enable_gqa: bool = False,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Exact attention, computed in fp32 (fp64 for fp64 inputs), returned in the input dtype.

    Args:
        q: [B, H_q, S_q, D]. k, v: [B, H_kv, S_kv, D] with H_q % H_kv == 0.
        causal: bottom-right aligned: query i sits at position S_kv - S_q + i and sees keys
            j <= S_kv - S_q + i.
        scale: logit scale, default 1/sqrt(D).
        enable_gqa: required when H_q != H_kv.
        return_lse: also return the log-sum-exp of the scaled logits, [B, H_q, S_q] in fp32
            (-inf where a query sees no key), so partial attentions can be merged exactly.
    """
    check_qkv(q, k, v, causal=causal, scale=scale, enable_gqa=enable_gqa)
    check_bool("return_lse", return_lse)
    return reference_dense_attention(q, k, v, causal=causal, scale=scale, return_lse=return_lse)


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    keep: torch.Tensor | None = None,
    scores: torch.Tensor | None = None,
    budget: int | float | None = None,
    threshold: float | None = None,
    chunk_size: int = 64,
    sink_chunks: int = SINK_CHUNKS,
    recent_chunks: int = RECENT_CHUNKS,
    causal: bool = True,
    scale: float | None = None,
    enable_gqa: bool = False,
    backend: str = "auto",
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention over kept chunks only: query i attends to key j iff j's chunk is kept and
    causality allows it. A query with no visible key returns zeros.

    Args:
        q, k, v: as in :func:`dense_attention`, [B, H, S, D].
        keep: bool [B, 1|H_kv, n_chunks], n_chunks = ceil(S_kv / chunk_size); True = kept.
            A per-KV-head mask applies to all query heads of that KV head's group.
        scores: float [B, 1|H_kv, n_chunks]; turned into ``keep`` by :func:`select_chunks` with
            ``budget``/``threshold``/``sink_chunks``/``recent_chunks``. Give exactly one of
            ``keep`` and ``scores``.
        chunk_size: tokens per chunk; the last chunk may be partial.
        backend: "reference", "flex" or "auto" (the fastest available for these inputs; every
            backend computes the same function within its dtype's rounding).
        return_lse: also return the log-sum-exp [B, H_q, S_q] (fp32, -inf for empty rows).
    """
    shape = check_qkv(q, k, v, causal=causal, scale=scale, enable_gqa=enable_gqa)
    chunk_size = check_int("chunk_size", chunk_size, minimum=1)
    sink_chunks = check_int("sink_chunks", sink_chunks, minimum=0)
    recent_chunks = check_int("recent_chunks", recent_chunks, minimum=0)
    check_bool("return_lse", return_lse)
    backend = check_backend(backend)
    n_chunks = math.ceil(shape.len_kv / chunk_size)
    if (keep is None) == (scores is None):
        got = "both" if keep is not None else "neither"
        raise ValueError(f"sparse_attention needs exactly one of keep or scores, got {got}")
    if keep is not None:
        check_chunk_mask("keep", keep, shape, n_chunks, q.device)
        if budget is not None or threshold is not None:
            raise ValueError(
                "budget and threshold select chunks from scores; with keep given they would be "
                f"ignored (got budget={budget!r}, threshold={threshold!r})"
            )
    else:
        check_chunk_mask("scores", scores, shape, n_chunks, q.device)
        check_scores_finite(scores)
        check_budget(budget, threshold)
        keep = select_chunks(
            scores,
            budget=budget,
            threshold=threshold,
            sink_chunks=sink_chunks,
            recent_chunks=recent_chunks,
        )
    impl = resolve_backend(backend, shape, (q, k, v), chunk_size, return_lse)
    q, k, v = _without_autograd(q, k, v)
    return impl(
        q, k, v, keep, chunk_size=chunk_size, causal=causal, scale=scale, return_lse=return_lse
    )


def reserve_attention(
    q: torch.Tensor,
    k_reserve: torch.Tensor,
    v_reserve: torch.Tensor,
    block_table: torch.Tensor,
    kv_len: torch.Tensor,
    *,
    chunk_size: int = 64,
    causal: bool = True,
    scale: float | None = None,
    enable_gqa: bool = False,
    backend: str = "auto",
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Sparse attention over a compacted reserve that holds only resident chunks.

    Args:
        q: [B, H_q, S_q, D]; query i sits at logical position kv_len - S_q + i.
        k_reserve, v_reserve: [B, H_kv, n_slots * chunk_size, D]; slot s holds the chunk
            ``block_table[b, h, s]``.
        block_table: int [B, 1|H_kv, n_slots], logical chunk per slot, -1 = empty. Each logical
            chunk may appear at most once per row; tokens at positions >= kv_len are ignored.
        kv_len: int [B], logical KV length per batch row.
        backend: "reference", "flex", "sdpa" (token mask, no LSE), "triton" (split-KV decode
            kernel, CUDA; CPU under TRITON_INTERPRET=1) or "auto".

    Equals ``sparse_attention`` over the logical KV with keep = the chunks in the table.
    """
    shape = check_qkv(
        q,
        k_reserve,
        v_reserve,
        causal=False,  # causality is checked against kv_len, not the reserve's length
        scale=scale,
        enable_gqa=enable_gqa,
        names=("q", "k_reserve", "v_reserve"),
    )
    check_bool("causal", causal)
    chunk_size = check_int("chunk_size", chunk_size, minimum=1)
    check_bool("return_lse", return_lse)
    backend = check_backend(backend)
    check_reserve(block_table, kv_len, shape, chunk_size, q.device)
    impl = resolve_reserve_backend(
        backend, shape, (q, k_reserve, v_reserve), chunk_size, return_lse
    )
    q, k_reserve, v_reserve = _without_autograd(q, k_reserve, v_reserve)
    return impl(
        q,
        k_reserve,
        v_reserve,
        block_table,
        kv_len,
        chunk_size=chunk_size,
        causal=causal,
        scale=scale,
        return_lse=return_lse,
    )
