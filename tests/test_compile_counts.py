"""The compiled path must not recompile inside a decode loop (torch's own counters)."""

import pytest
import torch
from torch._dynamo.utils import counters

import lsa


def _graphs() -> int:
    return counters["stats"]["unique_graphs"]


def test_reserve_decode_loop_compiles_once():
    """256 steps over a fixed reserve: kv_len grows by one and the block table changes each step."""
    gen = torch.Generator().manual_seed(0)
    b, hq, hkv, d, cs, slots = 2, 4, 2, 16, 16, 6
    k = torch.randn(b, hkv, slots * cs, d, generator=gen)
    v = torch.randn(b, hkv, slots * cs, d, generator=gen)
    n_logical = 40  # chunks that exist by the end of the loop

    def step(i: int) -> torch.Tensor:
        kv_len = torch.full((b,), 300 + i)
        chunks = torch.randperm(n_logical - 22, generator=gen)[:slots]  # resident chunk ids
        table = chunks.expand(b, 1, slots).clone()
        q = torch.randn(b, hq, 1, d, generator=gen)
        out = lsa.reserve_attention(
            q, k, v, table, kv_len, chunk_size=cs, enable_gqa=True, backend="flex"
        )
        ref = lsa.reserve_attention(
            q, k, v, table, kv_len, chunk_size=cs, enable_gqa=True, backend="reference"
        )
        torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
        return out

    for i in range(2):
        step(i)
    before = _graphs()
    for i in range(2, 258):
        step(i)
    assert before > 0, "the flex backend compiled nothing: the test would prove nothing"
    assert _graphs() == before, f"{_graphs() - before} recompilations in 256 decode steps"


@pytest.mark.gpu
def test_growing_kv_decode_loop_compiles_once_cuda():
    """Full-cache flex on CUDA: the KV grows by one token and the keep mask changes every step."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    b, hq, hkv, d, cs = 1, 8, 2, 64, 64
    k_all = torch.randn(b, hkv, 9000, d, generator=gen, device="cuda", dtype=torch.bfloat16)
    v_all = torch.randn_like(k_all)

    def step(i: int) -> None:
        s = 8000 + i
        k, v = k_all[:, :, :s], v_all[:, :, :s]
        n = -(-s // cs)
        scores = torch.rand(b, 1, n, generator=gen, device="cuda")
        q = torch.randn(b, hq, 1, d, generator=gen, device="cuda", dtype=torch.bfloat16)
        out = lsa.sparse_attention(
            q, k, v, scores=scores, budget=0.1, chunk_size=cs, enable_gqa=True, backend="flex"
        )
        keep = lsa.select_chunks(scores, budget=0.1)
        ref = lsa.sparse_attention(
            q, k, v, keep=keep, chunk_size=cs, enable_gqa=True, backend="reference"
        )
        torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)

    for i in range(3):
        step(i)
    before = _graphs()
    for i in range(3, 259):
        step(i)
    assert _graphs() == before, f"{_graphs() - before} recompilations in 256 decode steps"
