"""Decode attention over the resident blocks of a vLLM-layout paged KV cache.

vLLM 0.26.0's Triton and FlashAttention backends hand each layer's cache to ``impl.forward`` as
``[num_blocks, H_kv, block_size, 2 * D]`` (K and V packed in the last dim; see
``TritonAttentionBackend.get_kv_cache_shape``). An LSA decode reads, per request, only its resident
blocks: ``physical[b, s]`` is the cache block of slot ``s`` and ``logical[b, s]`` the chunk it
holds (-1 = empty slot), which is what the LSA kernels take. This is the decode half of the
plugin's impl (``lsa/vllm/DESIGN.md``, phase 1): the blocks are gathered into a compact reserve,
then :func:`lsa.reserve_attention` runs (the Triton kernel on CUDA with ``backend="auto"``).
"""

from __future__ import annotations

import torch

from lsa.attention import reserve_attention


def paged_decode_attention(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    physical: torch.Tensor,
    logical: torch.Tensor,
    kv_len: torch.Tensor,
    *,
    scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Attention of ``q`` [B, H_q, S_q, D] over the resident blocks of each row.

    Args:
        kv_cache: [num_blocks, H_kv, block_size, 2 * D], vLLM's per-layer cache.
        physical, logical: int [B, n_slots]; slots past a row's resident count hold -1 in both.
        kv_len: int [B], the logical KV length of each row (the last query sits at kv_len - 1).

    Returns:
        [B, H_q, S_q, D], equal to sparse attention over each row's full history with keep =
        the chunks in ``logical``.
    """
    for name, t in (("q", q), ("kv_cache", kv_cache)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a 4-d tensor, got {got}")
    num_blocks, heads_kv, block_size, packed = kv_cache.shape
    d = q.shape[-1]
    if packed != 2 * d:
        raise ValueError(
            f"kv_cache must be [num_blocks, H_kv, block_size, 2 * D={2 * d}] (K and V packed), "
            f"got {tuple(kv_cache.shape)}"
        )
    for name, t in (("physical", physical), ("logical", logical)):
        if not isinstance(t, torch.Tensor) or t.dtype not in (torch.int32, torch.int64):
            got = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
            raise TypeError(f"{name} must be an int32/int64 tensor, got {got}")
        if t.shape != (q.shape[0], physical.shape[-1]):
            raise ValueError(
                f"{name} must be [B={q.shape[0]}, n_slots], got {tuple(t.shape)} "
                f"(physical is {tuple(physical.shape)})"
            )
    if not torch.equal(physical < 0, logical < 0):
        raise ValueError("physical and logical must mark the same slots empty (-1)")
    if bool((physical >= num_blocks).any()):
        raise ValueError(f"physical names a block >= num_blocks ({num_blocks})")
    b, n = physical.shape
    # Empty slots read block 0; logical = -1 masks them.
    blocks = kv_cache[physical.clamp(min=0).long()]  # [B, n, H_kv, block_size, 2D]
    kv = blocks.permute(0, 2, 1, 3, 4).reshape(b, heads_kv, n * block_size, 2 * d)
    k, v = kv.split(d, dim=-1)
    return reserve_attention(
        q,
        k.contiguous(),
        v.contiguous(),
        logical[:, None].to(torch.int64),
        kv_len,
        chunk_size=block_size,
        scale=scale,
        enable_gqa=q.shape[1] != heads_kv,
        backend=backend,
    )
