"""The "triton" reserve backend (lsa/compiled/triton_decode.py) against the fp64 oracle.

On CPU the kernels run in Triton's interpreter, which must be chosen before triton is imported::

    TRITON_INTERPRET=1 python -m pytest -q tests/test_triton_decode.py

Without it the CPU cases are skipped; on CUDA the compiled kernels run (torch's CUDA wheels ship
triton). CI installs triton==3.6.0 and runs this file with TRITON_INTERPRET=1.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import pytest
import torch

import lsa
from lsa.backends import available_reserve_backends
from lsa.compiled import triton_decode
from lsa.reference.reserve import reserve_positions
from lsa.testing import attention_oracle

TRITON = triton_decode.triton_available() is None
DEVICES = [
    pytest.param(
        "cpu",
        id="interpreter",
        marks=pytest.mark.skipif(
            not triton_decode.interpreting(),
            reason="CPU runs need triton and TRITON_INTERPRET=1 set before the process starts",
        ),
    )
] + (
    [pytest.param("cuda", id="cuda", marks=pytest.mark.gpu)]
    if TRITON and torch.cuda.is_available()
    else []
)


@dataclass(frozen=True)
class Case:
    batch: int
    heads_kv: int
    group: int
    len_q: int
    kv_lens: tuple[int, ...]
    head_dim: int
    chunk_size: int
    n_slots: int
    causal: bool
    dtype: torch.dtype
    per_head: bool
    seed: int = 0

    def name(self) -> str:
        kind = str(self.dtype).removeprefix("torch.")
        return (
            f"B{self.batch}-G{self.group}-Sq{self.len_q}-kv{'/'.join(map(str, self.kv_lens))}-"
            f"c{self.chunk_size}-D{self.head_dim}-{'causal' if self.causal else 'full'}-"
            f"{'perhead' if self.per_head else 'shared'}-{kind}"
        )


CASES = [
    # Decode under GQA 4, kv_len not a chunk multiple, rows with different lengths.
    Case(2, 2, 4, 1, (150, 70), 64, 64, 4, True, torch.bfloat16, False),
    # S_q > 1 causal at the end of the sequence, per-KV-head tables, fp16, chunk 16.
    Case(2, 2, 2, 5, (83, 40), 32, 16, 7, True, torch.float16, True),
    # S_q = 16 x G = 4: 64 folded rows in one tile; fp32 (exact dot products); not causal.
    Case(1, 1, 4, 16, (100,), 16, 32, 5, False, torch.float32, False),
    # 8 x 16 = 128 folded rows: two row blocks per KV head.
    Case(1, 1, 8, 16, (64,), 16, 16, 6, True, torch.float32, True),
    # A chunk size and head dim that are no powers of two (padded tiles).
    Case(2, 1, 2, 3, (20, 9), 24, 3, 9, True, torch.float32, False),
    # chunk 128, one KV head, long-ish row with few resident chunks.
    Case(1, 1, 4, 2, (1000,), 64, 128, 3, True, torch.bfloat16, False),
]


def make_reserve(case: Case, device: str):
    """Random q and reserve; a table with the resident chunks of each row in a random slot order,
    empty slots (-1) and a stale chunk at or past kv_len (must be ignored)."""
    gen = torch.Generator().manual_seed(case.seed)
    hq = case.heads_kv * case.group
    t = case.n_slots * case.chunk_size
    q = torch.randn(case.batch, hq, case.len_q, case.head_dim, generator=gen)
    k = torch.randn(case.batch, case.heads_kv, t, case.head_dim, generator=gen)
    v = torch.randn(case.batch, case.heads_kv, t, case.head_dim, generator=gen)
    heads = case.heads_kv if case.per_head else 1
    table = torch.full((case.batch, heads, case.n_slots), -1, dtype=torch.int64)
    for b, length in enumerate(case.kv_lens):
        n_chunks = math.ceil(length / case.chunk_size)
        for h in range(heads):
            chunks = torch.randperm(n_chunks + 1, generator=gen)[: case.n_slots - 1]
            slots = torch.randperm(case.n_slots, generator=gen)[: len(chunks)]
            table[b, h, slots] = chunks  # chunk n_chunks is stale: all its tokens >= kv_len
    kv_len = torch.tensor(case.kv_lens, dtype=torch.int64)
    q, k, v = q.to(case.dtype), k.to(case.dtype), v.to(case.dtype)
    return [x.to(device) for x in (q, k, v, table, kv_len)]


def reserve_oracle(case: Case, q, k, v, table, kv_len):
    """The fp64 oracle over the reserve's own tokens, with the reference's visibility rule."""
    pos = reserve_positions(table.cpu(), case.chunk_size)  # [B, h, T]
    kv_len = kv_len.cpu()
    valid = (pos >= 0) & (pos < kv_len[:, None, None])
    if pos.shape[1] > 1:
        valid = valid.repeat_interleave(case.group, 1)
        pos = pos.repeat_interleave(case.group, 1)
    allowed = valid[:, :, None, :]
    if case.causal:
        q_pos = kv_len[:, None] - case.len_q + torch.arange(case.len_q)
        allowed = allowed & (pos[:, :, None, :] <= q_pos[:, None, :, None])
    return attention_oracle(q, k, v, allowed)


def attend(case: Case, q, k, v, table, kv_len, **kwargs):
    return lsa.reserve_attention(
        q,
        k,
        v,
        table,
        kv_len,
        chunk_size=case.chunk_size,
        causal=case.causal,
        enable_gqa=case.group > 1,
        backend="triton",
        **kwargs,
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES, ids=Case.name)
def test_matches_oracle(device, case):
    inputs = make_reserve(case, device)
    oracle = reserve_oracle(case, *inputs)
    out, lse = attend(case, *inputs, return_lse=True)
    oracle.assert_close(out, lse=lse, what=f"triton {case.name()}")
    # Without the LSE the same output comes back.
    assert torch.equal(attend(case, *inputs), out)


@pytest.mark.parametrize("device", DEVICES)
def test_split_count_does_not_change_the_result(device):
    """Every split count (1 = one program walks all slots, n_slots = one slot each, and a count
    whose last split runs past the table) merges to the same attention."""
    case = Case(2, 2, 2, 2, (150, 33), 32, 16, 10, True, torch.float32, True, seed=3)
    q, k, v, table, kv_len = make_reserve(case, device)
    oracle = reserve_oracle(case, q, k, v, table, kv_len)
    for splits in (1, 3, 4, 10):
        out, lse = triton_decode.triton_reserve_attention(
            q, k, v, table, kv_len, chunk_size=16, causal=True, return_lse=True, splits=splits
        )
        oracle.assert_close(out, lse=lse, what=f"splits={splits}")


@pytest.mark.parametrize("device", DEVICES)
def test_queries_that_see_nothing(device):
    """An all-empty row returns zeros and LSE -inf; so do early causal queries whose only
    resident chunk lies after them; other rows are unaffected."""
    case = Case(2, 1, 2, 4, (64, 64), 16, 16, 3, True, torch.bfloat16, False, seed=5)
    q, k, v, _, kv_len = make_reserve(case, device)
    table = torch.tensor([[[-1, -1, -1]], [[-1, 3, -1]]], device=device)
    # Row 1: chunk 3 holds positions 48..63 and the queries sit at 60..63, so all see keys; with
    # kv_len 50 they sit at 46..49 and the first two see nothing.
    kv_len = torch.tensor([64, 50], device=device)
    oracle = reserve_oracle(case, q, k, v, table, kv_len)
    assert bool(oracle.empty[0].all()) and bool(oracle.empty[1, :, :2].all())
    assert not bool(oracle.empty[1, :, 2:].any())
    out, lse = attend(case, q, k, v, table, kv_len, return_lse=True)
    oracle.assert_close(out, lse=lse, what="empty rows")


@pytest.mark.parametrize("device", DEVICES)
def test_int32_indices_and_strided_inputs(device):
    """int32 tables / kv_len and a non-contiguous q and reserve (kernels read through strides)."""
    case = Case(1, 2, 2, 3, (90,), 32, 16, 7, True, torch.float32, True, seed=9)
    q, k, v, table, kv_len = make_reserve(case, device)
    oracle = reserve_oracle(case, q, k, v, table, kv_len)
    q_t = q.transpose(1, 2).contiguous().transpose(1, 2)  # [B, H, S, D] view of [B, S, H, D]
    k_t = k.transpose(1, 2).contiguous().transpose(1, 2)
    out = attend(case, q_t, k_t, v, table.int(), kv_len.int())
    oracle.assert_close(out, what="strided")


def test_refuses_what_it_cannot_run():
    """No silent fallback: each refusal names the backend and the reason."""
    q, k, v, table, kv_len = make_reserve(CASES[0], "cpu")
    kw = {"chunk_size": 64, "enable_gqa": True, "backend": "triton"}
    assert ("triton" in available_reserve_backends("cpu")) == triton_decode.interpreting()
    if not TRITON:
        with pytest.raises(ValueError, match=r"backend='triton' cannot serve .* not installed"):
            lsa.reserve_attention(q, k, v, table, kv_len, **kw)
        return
    with pytest.raises(ValueError, match=r"backend='triton' does not serve sparse attention"):
        keep = torch.ones(2, 1, 3, dtype=torch.bool)
        lsa.sparse_attention(q, k[:, :, :150], v[:, :, :150], keep=keep, **kw)
    if not triton_decode.interpreting():
        with pytest.raises(ValueError, match=r"backend='triton' cannot serve .* CUDA tensors"):
            lsa.reserve_attention(q, k, v, table, kv_len, **kw)
        return
    q64, k64, v64 = q.double(), k.double(), v.double()
    with pytest.raises(ValueError, match=r"backend='triton' cannot serve .* got torch.float64"):
        lsa.reserve_attention(q64, k64, v64, table, kv_len, **kw)


@pytest.mark.gpu
@pytest.mark.skipif(not (TRITON and torch.cuda.is_available()), reason="needs CUDA and triton")
@pytest.mark.parametrize("chunk", [64, 128])
@pytest.mark.parametrize("batch", [1, 3])
def test_cuda_decode_at_model_shape(chunk, batch):
    """Hq=32, Hkv=8, D=128 bf16 decode over a few hundred slots (many splits, pipelined loads),
    per-KV-head tables with empty slots, rows of different lengths; then the same call replayed
    from a CUDA graph with a grown kv_len gives the eager result for that kv_len."""
    lengths = tuple(300 * chunk - 17 * b for b in range(batch))
    case = Case(batch, 8, 4, 1, lengths, 128, chunk, 200, True, torch.bfloat16, True, seed=chunk)
    q, k, v, table, kv_len = make_reserve(case, "cuda")
    oracle = reserve_oracle(case, q, k, v, table, kv_len)
    out, lse = attend(case, q, k, v, table, kv_len, return_lse=True)
    oracle.assert_close(out, lse=lse, what=f"cuda chunk={chunk} B={batch}")

    static_len = kv_len.clone()
    attend(case, q, k, v, table, static_len)  # compiled before capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        replayed = attend(case, q, k, v, table, static_len)
    static_len.add_(5)  # the decode loop grows kv_len in place between replays
    graph.replay()
    grown = dataclasses.replace(case, kv_lens=tuple(x + 5 for x in lengths))
    expected = reserve_oracle(grown, q, k, v, table, static_len)
    expected.assert_close(replayed, what="graph replay after kv_len grew")


@pytest.mark.gpu
@pytest.mark.skipif(not (TRITON and torch.cuda.is_available()), reason="needs CUDA and triton")
@pytest.mark.parametrize(("len_q", "expected"), [(1, "triton"), (16, "triton"), (17, "flex")])
def test_cuda_auto_picks_triton_for_decode(len_q, expected):
    """``auto`` over a reserve on CUDA: the Triton kernel for decode-shaped calls (the measured
    winner, bench/README.md), the previous rule (flex at B * H_kv < 64) beyond 16 queries."""
    from lsa._validation import AttentionShape
    from lsa.backends import resolve_reserve_backend, triton_reserve_attention

    q = torch.zeros(1, 8, len_q, 64, device="cuda", dtype=torch.bfloat16)
    shape = AttentionShape(batch=1, heads_q=8, heads_kv=1, len_q=len_q, len_kv=4096, head_dim=64)
    impl = resolve_reserve_backend("auto", shape, (q,), 64, False)
    assert (impl is triton_reserve_attention) == (expected == "triton")
    assert impl.__name__.startswith(expected)
