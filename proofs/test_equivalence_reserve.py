"""Equivalence of ``lsa.reserve_attention`` (compacted reserve + block table) with
``lsa.sparse_attention`` over the logical KV, for every available backend.

A reserve is built by copying the kept chunks of a logical KV into slots in a random order; the
other slots are empty (-1) or hold a stale chunk at or past ``kv_len`` (which must be ignored),
and everything not copied is large finite garbage, so a leak shows. Rows of the batch have their
own ``kv_len``; each row is compared with ``sparse_attention`` on that row's logical KV, keep =
the chunks in the table, and both with the fp64 oracle (tolerance from ``lsa.testing``).

Examples per CI run (``ci`` profile, derandomized), for the reference on CPU and every backend
on CUDA, and the eager "sdpa" backend (a compiled backend on CPU gets 150 // 40 plus the explicit
examples; "triton" gets 150 // 4 on CUDA and, under TRITON_INTERPRET=1, in Triton's CPU
interpreter):
    test_reserve_equivalence    150
(see proofs/test_equivalence_attention.py for the total over proofs/).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from hypothesis import strategies as st
from proving import backend_params, call, prove

import lsa
from lsa.backends import available_backends, available_reserve_backends
from lsa.testing import attention_oracle, make_keep, make_qkv, visible_keys

GARBAGE = 1e3


@dataclass(frozen=True)
class ReserveCase:
    batch: int
    heads_kv: int
    group: int
    len_q: int
    kv_lens: tuple[int, ...]  # logical KV length per batch row
    head_dim: int
    chunk_size: int
    causal: bool
    dtype: torch.dtype
    per_head: bool  # block table [B, H_kv, n_slots] rather than [B, 1, n_slots]
    density: float
    stale: bool  # also put chunks at or past kv_len in the table
    empty_slots: int  # extra empty slots beyond the largest row
    index_dtype: torch.dtype
    seed: int

    @property
    def heads_q(self) -> int:
        return self.heads_kv * self.group


@st.composite
def reserve_cases(draw) -> ReserveCase:
    chunk = draw(st.sampled_from([1, 3, 16, 32, 64]))
    batch = draw(st.integers(1, 2))
    length = st.integers(1, 300) | st.sampled_from([chunk, chunk + 1, 2 * chunk - 1])
    kv_lens = tuple(draw(st.lists(length, min_size=batch, max_size=batch)))
    causal = draw(st.booleans())
    return ReserveCase(
        batch=batch,
        heads_kv=draw(st.integers(1, 2)),
        group=draw(st.sampled_from([1, 2, 4])),
        len_q=draw(st.integers(1, min(8, *kv_lens) if causal else 8)),
        kv_lens=kv_lens,
        head_dim=draw(st.sampled_from([8, 16, 24, 64])),
        chunk_size=chunk,
        causal=causal,
        dtype=draw(st.sampled_from([torch.float32, torch.bfloat16])),
        per_head=draw(st.booleans()),
        density=draw(st.sampled_from([0.0, 0.3, 0.7, 1.0])),
        stale=draw(st.booleans()),
        empty_slots=draw(st.integers(0, 3)),
        index_dtype=draw(st.sampled_from([torch.int64, torch.int32])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def build_reserve(case: ReserveCase, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor):
    """Copy the kept chunks of the logical k, v [B, H_kv, S_max, D] into a reserve whose slots
    are in a random order. Returns k_reserve, v_reserve, block_table."""
    gen = torch.Generator().manual_seed(case.seed + 7)
    c = case.chunk_size
    rows = []  # the table's chunk list per (b, h)
    for b in range(case.batch):
        n_valid = math.ceil(case.kv_lens[b] / c)
        for h in range(keep.shape[1]):
            chunks = torch.nonzero(keep[b, h, :n_valid]).flatten().tolist()
            if case.stale:  # ignored: all their tokens sit at positions >= kv_len
                chunks += [n_valid, n_valid + 2]
            rows.append(chunks)
    n_slots = max(len(r) for r in rows) + case.empty_slots
    n_slots = max(n_slots, 1)
    table = torch.full((case.batch, keep.shape[1], n_slots), -1, dtype=case.index_dtype)
    shape = (case.batch, case.heads_kv, n_slots * c, case.head_dim)
    noise = torch.randn(shape, generator=gen)
    k_res = (GARBAGE * noise).to(k.dtype)
    v_res = (-GARBAGE * noise.flip(-1)).to(v.dtype)
    for row, chunks in enumerate(rows):
        b, h = divmod(row, keep.shape[1])
        slots = torch.randperm(n_slots, generator=gen)[: len(chunks)].tolist()
        heads = slice(h, h + 1) if case.per_head else slice(None)
        for slot, chunk in zip(slots, chunks, strict=True):
            table[b, h, slot] = chunk
            src = k[b, heads, chunk * c : (chunk + 1) * c]  # may be short or empty
            n = src.shape[1]
            k_res[b, heads, slot * c : slot * c + n] = src
            v_res[b, heads, slot * c : slot * c + n] = v[b, heads, chunk * c : chunk * c + n]
    return k_res, v_res, table


RESERVE_EDGE_CASES = [
    # Decode (S_q = 1) with kv_len shorter than one chunk, one row at chunk + 1 tokens.
    ReserveCase(
        2, 1, 1, 1, (10, 17), 16, 16, True, torch.float32, False, 1.0, True, 1, torch.int64, 0
    ),
    # GQA group 4, per-head table, bf16, stale chunks and empty slots.
    ReserveCase(
        1, 2, 4, 3, (100,), 8, 16, True, torch.bfloat16, True, 0.5, True, 2, torch.int32, 1
    ),
    # Nothing kept: the table is all -1 and every query returns zeros.
    ReserveCase(
        1, 1, 2, 2, (40,), 24, 3, False, torch.float32, False, 0.0, False, 2, torch.int64, 2
    ),
]


@pytest.mark.parametrize(("device", "backend"), backend_params(available_reserve_backends))
def test_reserve_equivalence(device: str, backend: str) -> None:
    """reserve_attention over the compacted reserve equals sparse_attention over the logical KV
    with keep = the chunks in the block table, row by row."""

    def prop(case: ReserveCase) -> None:
        s_max = max(case.kv_lens)
        q, k, v = make_qkv(
            case.batch,
            case.heads_q,
            case.heads_kv,
            case.len_q,
            s_max,
            case.head_dim,
            seed=case.seed,
            dtype=case.dtype,
        )
        n_max = math.ceil(s_max / case.chunk_size)
        heads = case.heads_kv if case.per_head else 1
        keep = make_keep(case.batch, heads, n_max, seed=case.seed + 1, density=case.density)
        k_res, v_res, table = build_reserve(case, k, v, keep)
        kv_len = torch.tensor(case.kv_lens, dtype=case.index_dtype)

        to = {"device": device}
        out = call(
            lsa.reserve_attention,
            q.to(**to),
            k_res.to(**to),
            v_res.to(**to),
            table.to(**to),
            kv_len.to(**to),
            chunk_size=case.chunk_size,
            causal=case.causal,
            enable_gqa=case.group > 1,
            backend=backend,
        )
        assert out.shape == q.shape and out.dtype == q.dtype

        for b, length in enumerate(case.kv_lens):
            n_chunks = math.ceil(length / case.chunk_size)
            row_keep = keep[b : b + 1, :, :n_chunks]
            row = (q[b : b + 1], k[b : b + 1, :, :length], v[b : b + 1, :, :length])
            allowed = visible_keys(
                row_keep,
                case.chunk_size,
                case.len_q,
                length,
                causal=case.causal,
                heads_q=case.heads_q,
            )
            oracle = attention_oracle(*row, allowed)
            # A reserve-only backend ("sdpa") is compared with the reference sparse path.
            sparse_backend = backend if backend in available_backends(device) else "reference"
            sparse = call(
                lsa.sparse_attention,
                *(t.to(**to) for t in row),
                keep=row_keep.to(**to),
                chunk_size=case.chunk_size,
                causal=case.causal,
                enable_gqa=case.group > 1,
                backend=sparse_backend,
            )
            oracle.assert_close(sparse, what=f"sparse_attention[{sparse_backend}] row {b}")
            oracle.assert_close(out[b : b + 1], what=f"reserve_attention[{backend}] row {b}")

    explicit = [{"case": case} for case in RESERVE_EDGE_CASES]
    prove(
        prop, device, backend, examples=150, strategies={"case": reserve_cases()}, explicit=explicit
    )
