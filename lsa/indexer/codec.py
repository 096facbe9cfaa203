"""The chunk-key codec of the original: fp8 e4m3 values plus one fp32 scale per key.

A key of ``D`` dims is stored as ``D`` fp8 bytes followed by 4 bytes of fp32 scale, so a
128-dim key takes 132 bytes (the original's index-K format). ``scale = max(amax, 1e-4) / 448``
(448 is the largest finite e4m3 value), and ``key ≈ fp8.float() * scale``.
"""

from __future__ import annotations

import torch

FP8_MAX = 448.0
SCALE_FLOOR = 1e-4


def encode_fp8(keys: torch.Tensor) -> torch.Tensor:
    """Float keys ``[..., D]`` -> uint8 ``[..., D + 4]`` (fp8 e4m3 bytes, then the fp32 scale)."""
    if not isinstance(keys, torch.Tensor) or not keys.is_floating_point():
        raise TypeError(f"keys must be a floating-point torch.Tensor, got {type(keys).__name__}")
    if keys.dim() < 1 or keys.shape[-1] < 1:
        raise ValueError(f"keys must be [..., D] with D >= 1, got shape {tuple(keys.shape)}")
    x = keys.float()
    scale = x.abs().amax(dim=-1, keepdim=True).clamp_min(SCALE_FLOOR) / FP8_MAX  # [..., 1]
    q = (x / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    q_bytes = q.view(torch.uint8)  # [..., D]
    s_bytes = scale.contiguous().view(torch.uint8)  # [..., 4]
    return torch.cat([q_bytes, s_bytes], dim=-1)


def decode_fp8(packed: torch.Tensor) -> torch.Tensor:
    """uint8 ``[..., D + 4]`` from :func:`encode_fp8` -> float32 keys ``[..., D]``."""
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8:
        raise TypeError(
            "packed must be a uint8 torch.Tensor, got "
            f"{packed.dtype if isinstance(packed, torch.Tensor) else type(packed).__name__}"
        )
    if packed.dim() < 1 or packed.shape[-1] < 5:
        raise ValueError(f"packed must be [..., D + 4] with D >= 1, got {tuple(packed.shape)}")
    packed = packed.contiguous()
    q = packed[..., :-4].contiguous().view(torch.float8_e4m3fn).float()
    scale = packed[..., -4:].contiguous().view(torch.float32)  # [..., 1]
    return q * scale


def fake_quantize_fp8(keys: torch.Tensor) -> torch.Tensor:
    """``decode_fp8(encode_fp8(keys))`` in the keys' dtype: what the indexer reads from fp8."""
    return decode_fp8(encode_fp8(keys)).to(keys.dtype)
