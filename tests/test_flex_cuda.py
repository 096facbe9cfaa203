"""CUDA-only checks of the flex backend against the reference (skipped without a GPU)."""

import math

import pytest
import torch

import lsa

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("per_head", [False, True])
def test_chunk_size_change_after_dynamic_batch(per_head):
    """Once batch size became dynamic, torch 2.11 reused a 64-token-block kernel for 128-token
    blocks (wrong outputs); each chunk size now compiles on its own."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    for b, cs in [(1, 64), (1, 128), (8, 64), (8, 128), (2, 32), (8, 16)]:
        s = 8192
        q = torch.randn(b, 32, 1, 128, generator=gen, device="cuda").bfloat16()
        k = torch.randn(b, 8, s, 128, generator=gen, device="cuda").bfloat16()
        v = torch.randn(b, 8, s, 128, generator=gen, device="cuda").bfloat16()
        keep = torch.rand(b, 8 if per_head else 1, math.ceil(s / cs), generator=gen, device="cuda")
        keep = keep < 0.1
        out = lsa.sparse_attention(
            q, k, v, keep=keep, chunk_size=cs, enable_gqa=True, backend="flex"
        ).float()
        ref = lsa.sparse_attention(
            q.float(),
            k.float(),
            v.float(),
            keep=keep,
            chunk_size=cs,
            enable_gqa=True,
            backend="reference",
        )
        rel = ((out - ref).norm() / ref.norm()).item()
        assert rel < 1e-2, f"B={b} chunk={cs}: relative error {rel:.2e}"
