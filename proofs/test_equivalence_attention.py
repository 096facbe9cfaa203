"""Equivalence properties of ``lsa.sparse_attention``, proven for every available backend.

Each property runs once per (device, backend) from ``lsa.backends.available_backends`` ("cuda"
too when it is available), so a new backend is proven as soon as it is listed there. Outputs are
compared with an fp64 oracle within a tolerance derived from the reference's noise at the dtype
(``lsa.testing``); structure (which queries see nothing, which chunks are kept) is compared
exactly.

Examples per CI run (``ci`` profile, derandomized), for the reference on CPU and CUDA:
    test_keep_all_equivalence             200
    test_kept_subset_equivalence          250
    test_scores_path_equivalence           80
    test_batch_permutation_equivalence     80
    this file                             610
With proofs/test_equivalence_select.py (590) and proofs/test_equivalence_reserve.py (150): 1350
drawn examples per run for the reference backend and selection alone (``proving.prove`` fails if
fewer run to the end). A compiled backend costs seconds of compilation per shape class, so it
gets 1/40 of the examples on CPU and 1/8 on CUDA (at least 2), plus the explicit examples; the
many-shapes test (tests/test_many_shapes.py) covers its shape classes instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from hypothesis import strategies as st
from proving import backend_params, call, prove

import lsa
from lsa.backends import available_backends
from lsa.testing import attention_oracle, make_keep, make_qkv, make_scores, visible_keys

BACKENDS = backend_params(available_backends)


CHUNK_SIZES = (1, 3, 16, 32, 64)
HEAD_DIMS = (8, 16, 24, 64)
DTYPES = (torch.float32, torch.bfloat16)


@dataclass(frozen=True)
class Case:
    """One attention problem; tensors are built from ``seed`` by ``lsa.testing``."""

    batch: int
    heads_kv: int
    group: int
    len_q: int
    len_kv: int
    head_dim: int
    chunk_size: int
    causal: bool
    dtype: torch.dtype
    per_head: bool  # keep is [B, H_kv, n_chunks] rather than [B, 1, n_chunks]
    density: float  # probability that a chunk is kept (0: keep all False)
    seed: int

    @property
    def heads_q(self) -> int:
        return self.heads_kv * self.group

    @property
    def n_chunks(self) -> int:
        return math.ceil(self.len_kv / self.chunk_size)

    def qkv(self, device: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return make_qkv(
            self.batch,
            self.heads_q,
            self.heads_kv,
            self.len_q,
            self.len_kv,
            self.head_dim,
            seed=self.seed,
            dtype=self.dtype,
            device=device,
        )

    def keep(self, device: str) -> torch.Tensor:
        heads = self.heads_kv if self.per_head else 1
        return make_keep(
            self.batch,
            heads,
            self.n_chunks,
            seed=self.seed + 1,
            density=self.density,
            device=device,
        )

    def kwargs(self) -> dict:
        return dict(chunk_size=self.chunk_size, causal=self.causal, enable_gqa=self.group > 1)


@st.composite
def cases(draw, *, max_batch: int = 2) -> Case:
    chunk = draw(st.sampled_from(CHUNK_SIZES))
    # Awkward lengths on purpose: around chunk boundaries, shorter than a chunk, or anything.
    edge = st.sampled_from([1, chunk - 1, chunk, chunk + 1, 2 * chunk + 1, 3 * chunk - 1])
    len_kv = draw(st.one_of(st.integers(1, 300), edge.filter(lambda n: 1 <= n <= 300)))
    causal = draw(st.booleans())
    len_q = draw(st.integers(1, min(8, len_kv) if causal else 8))
    heads_kv = draw(st.integers(1, 2))
    return Case(
        batch=draw(st.integers(1, max_batch)),
        heads_kv=heads_kv,
        group=draw(st.sampled_from([1, 2, 4])),
        len_q=len_q,
        len_kv=len_kv,
        head_dim=draw(st.sampled_from(HEAD_DIMS)),
        chunk_size=chunk,
        causal=causal,
        dtype=draw(st.sampled_from(DTYPES)),
        per_head=draw(st.booleans()),
        density=draw(st.sampled_from([0.0, 0.25, 0.5, 0.75, 1.0])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


# The edge cases every run covers, whatever Hypothesis draws.
EDGE_CASES = [
    # decode: one query; S_kv shorter than one chunk
    Case(1, 1, 1, 1, 10, 16, 16, True, torch.float32, False, 0.5, 0),
    # S_kv = chunk + 1 (a one-token last chunk), GQA group 4, per-head keep, bf16
    Case(2, 2, 4, 3, 33, 8, 32, True, torch.bfloat16, True, 0.5, 1),
    # keep all False: every query sees nothing and returns zeros
    Case(1, 2, 2, 4, 50, 24, 16, True, torch.float32, True, 0.0, 2),
    # non-causal with more queries than keys, chunk 1 (token-level selection)
    Case(2, 1, 2, 8, 5, 64, 1, False, torch.float32, False, 0.5, 3),
    # S_kv not a multiple of the chunk, chunk 3, bf16, shared keep
    Case(1, 2, 1, 7, 298, 16, 3, True, torch.bfloat16, False, 0.75, 4),
]


EDGE_EXAMPLES = [{"case": case} for case in EDGE_CASES]


@pytest.mark.parametrize(("device", "backend"), BACKENDS)
def test_keep_all_equivalence(device: str, backend: str) -> None:
    """keep all True (shared or per head) gives dense_attention, output and LSE."""

    def prop(case) -> None:
        q, k, v = case.qkv(device)
        heads = case.heads_kv if case.per_head else 1
        keep = torch.ones(case.batch, heads, case.n_chunks, dtype=torch.bool, device=device)
        out = call(lsa.sparse_attention, q, k, v, keep=keep, backend=backend, **case.kwargs())
        # return_lse may take another path (compiled CPU flex cannot return the LSE).
        out_lse, lse = call(
            lsa.sparse_attention,
            q,
            k,
            v,
            keep=keep,
            backend=backend,
            return_lse=True,
            **case.kwargs(),
        )
        dense, dense_lse = lsa.dense_attention(
            q, k, v, causal=case.causal, enable_gqa=case.group > 1, return_lse=True
        )
        everything = visible_keys(None, 1, case.len_q, case.len_kv, causal=case.causal)
        oracle = attention_oracle(q, k, v, everything)
        assert not bool(oracle.empty.any()), "with keep all, every query sees at least one key"
        oracle.assert_close(out, what=f"sparse_attention[{backend}] keep all")
        oracle.assert_close(
            out_lse, lse=lse, what=f"sparse_attention[{backend}] keep all, with LSE"
        )
        oracle.assert_close(dense, lse=dense_lse, what="dense_attention")

    strategies = {"case": cases()}
    prove(prop, device, backend, examples=200, strategies=strategies, explicit=EDGE_EXAMPLES)


def _gathered_oracle(q, k, v, keep, case: Case) -> torch.Tensor:
    """Dense attention over only the kept tokens, gathered, in fp64: for each query, the keys of
    kept chunks at original positions <= the query's position (bottom-right) form a prefix of the
    gathered keys, which ``lsa.dense_attention`` attends to in full. No key: zeros."""
    q64, k64, v64 = (t.detach().cpu().double() for t in (q, k, v))
    keep = keep.cpu()
    out = torch.zeros_like(q64)
    for b in range(case.batch):
        for h in range(case.heads_kv):
            kept = keep[b, h if case.per_head else 0]
            idx = torch.nonzero(kept[torch.arange(case.len_kv) // case.chunk_size]).flatten()
            heads = slice(h * case.group, (h + 1) * case.group)
            for i in range(case.len_q):
                if case.causal:
                    n_seen = int((idx <= case.len_kv - case.len_q + i).sum())
                else:
                    n_seen = idx.numel()
                if n_seen == 0:
                    continue  # zeros
                seen = idx[:n_seen]
                out[b, heads, i] = lsa.dense_attention(
                    q64[b : b + 1, heads, i : i + 1],
                    k64[b : b + 1, h : h + 1, seen],
                    v64[b : b + 1, h : h + 1, seen],
                    causal=False,
                    enable_gqa=case.group > 1,
                )[0, :, 0]
    return out


@pytest.mark.parametrize(("device", "backend"), BACKENDS)
def test_kept_subset_equivalence(device: str, backend: str) -> None:
    """keep = S gives dense attention over only the tokens of S, causal by original positions;
    a query that sees no key returns exact zeros."""

    def prop(case) -> None:
        q, k, v = case.qkv(device)
        keep = case.keep(device)
        out = call(lsa.sparse_attention, q, k, v, keep=keep, backend=backend, **case.kwargs())

        allowed = visible_keys(
            keep, case.chunk_size, case.len_q, case.len_kv, causal=case.causal, heads_q=case.heads_q
        )
        oracle = attention_oracle(q, k, v, allowed)
        gathered = _gathered_oracle(q, k, v, keep, case)
        # The two fp64 oracles (mask over all tokens, gather of the kept ones) agree.
        torch.testing.assert_close(gathered, oracle.out, rtol=1e-12, atol=1e-12)
        if case.density == 0.0:
            assert bool(oracle.empty.all()), "keep all False: no query sees a key"
        oracle.assert_close(out, what=f"sparse_attention[{backend}] keep subset")

    strategies = {"case": cases()}
    prove(prop, device, backend, examples=250, strategies=strategies, explicit=EDGE_EXAMPLES)


@st.composite
def selections(draw) -> dict:
    """budget and/or threshold, and forced chunk counts."""
    kind = draw(st.sampled_from(["int", "fraction", "threshold", "both"]))
    select: dict = {
        "sink_chunks": draw(st.integers(0, 2)),
        "recent_chunks": draw(st.integers(0, 2)),
    }
    if kind in ("int", "both"):
        select["budget"] = draw(st.integers(1, 12))
    if kind == "fraction":
        select["budget"] = draw(st.sampled_from([0.1, 0.25, 0.5, 1.0]) | st.floats(0.01, 1.0))
    if kind in ("threshold", "both"):
        select["threshold"] = draw(st.sampled_from([-0.5, 0.0, 1.0, 2.0]))
    return select


@pytest.mark.parametrize(("device", "backend"), BACKENDS)
def test_scores_path_equivalence(device: str, backend: str) -> None:
    """scores + budget/threshold gives the same keep mask, hence the same output, as keep =
    select_chunks(scores, ...)."""

    def prop(case, select, levels) -> None:
        q, k, v = case.qkv(device)
        heads = case.heads_kv if case.per_head else 1
        scores = make_scores(
            case.batch, heads, case.n_chunks, seed=case.seed + 2, levels=levels, device=device
        )
        keep = lsa.select_chunks(scores, **select)
        assert keep.dtype == torch.bool and keep.shape == scores.shape

        out = call(
            lsa.sparse_attention, q, k, v, scores=scores, backend=backend, **select, **case.kwargs()
        )
        allowed = visible_keys(
            keep, case.chunk_size, case.len_q, case.len_kv, causal=case.causal, heads_q=case.heads_q
        )
        oracle = attention_oracle(q, k, v, allowed)
        oracle.assert_close(out, what=f"sparse_attention[{backend}] scores={select}")
        via_keep = call(lsa.sparse_attention, q, k, v, keep=keep, backend=backend, **case.kwargs())
        oracle.assert_close(via_keep, what=f"sparse_attention[{backend}] keep=select_chunks(...)")

    strategies = {"case": cases(), "select": selections(), "levels": st.sampled_from([None, 3])}
    prove(prop, device, backend, examples=80, strategies=strategies)


@pytest.mark.parametrize(("device", "backend"), BACKENDS)
def test_batch_permutation_equivalence(device: str, backend: str) -> None:
    """Permuting the batch rows of q, k, v and keep (or scores) permutes the output rows."""

    def prop(case, data) -> None:
        perm = torch.tensor(data.draw(st.permutations(range(case.batch)), label="perm"))
        q, k, v = case.qkv(device)
        keep = case.keep(device)
        heads = keep.shape[1]
        scores = make_scores(
            case.batch, heads, case.n_chunks, seed=case.seed + 3, levels=4, device=device
        )
        select = {"budget": 0.5, "sink_chunks": 1, "recent_chunks": 1}
        p = perm.to(device)

        # Structure, exactly: selection commutes with the permutation.
        assert torch.equal(
            lsa.select_chunks(scores[p], **select), lsa.select_chunks(scores, **select)[p]
        )

        for name, chunks in (("keep", {"keep": keep}), ("scores", {"scores": scores, **select})):
            out = call(lsa.sparse_attention, q, k, v, backend=backend, **chunks, **case.kwargs())
            permuted_chunks = {
                key: val[p] if torch.is_tensor(val) else val for key, val in chunks.items()
            }
            out_p = call(
                lsa.sparse_attention,
                q[p],
                k[p],
                v[p],
                backend=backend,
                **permuted_chunks,
                **case.kwargs(),
            )
            kept = keep if name == "keep" else lsa.select_chunks(scores, **select)
            allowed = visible_keys(
                kept,
                case.chunk_size,
                case.len_q,
                case.len_kv,
                causal=case.causal,
                heads_q=case.heads_q,
            )
            oracle = attention_oracle(q, k, v, allowed)
            oracle.assert_close(out, what=f"sparse_attention[{backend}] {name}")
            oracle_p = attention_oracle(
                q[p], k[p], v[p], allowed[p] if allowed.shape[0] > 1 else allowed
            )
            oracle_p.assert_close(out_p, what=f"sparse_attention[{backend}] {name}, permuted batch")
            torch.testing.assert_close(oracle_p.out, oracle.out[perm], rtol=0, atol=0)
            torch.testing.assert_close(out_p, out[p], rtol=0, atol=2 * oracle.atol)

    strategies = {"case": cases(max_batch=4), "data": st.data()}
    prove(prop, device, backend, examples=80, strategies=strategies)
