"""Every compiled path, called with 50+ distinct random shapes in one process, equals the oracle.

What an evaluation loop over real prompts does: batch, heads, lengths and chunk sizes change from
call to call. The compiled paths must neither fail (Dynamo's recompile limit, 8 by default, is
not raised here) nor drift from the reference on a shape they have not met. Shapes are drawn
from one seeded generator (awkward on purpose: KV shorter than a chunk, partial last chunks,
decode with one query, GQA with odd groups, shared and per-KV-head masks).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest
import torch

import lsa
from lsa.backends import available_reserve_backends
from lsa.testing import attention_oracle, make_keep, make_qkv, visible_keys

N_SHAPES = 50


@dataclass(frozen=True)
class Shape:
    batch: int
    heads_kv: int
    group: int
    len_q: int
    len_kv: int
    head_dim: int
    chunk_size: int
    causal: bool
    per_head: bool
    dtype: torch.dtype

    @property
    def heads_q(self) -> int:
        return self.heads_kv * self.group

    @property
    def n_chunks(self) -> int:
        return -(-self.len_kv // self.chunk_size)


#: (heads_kv, group, head_dim, chunk_size, dtype) of the "models" an evaluation loop would serve
MODELS = (
    (1, 3, 16, 16, torch.float32),
    (2, 2, 32, 32, torch.float32),
    (3, 1, 16, 64, torch.float32),
    (2, 4, 16, 16, torch.bfloat16),
)


def shapes(seed: int, n: int = N_SHAPES) -> list[Shape]:
    """Per "model" (heads, head dim, chunk size, dtype) the batch, the lengths, causality and the
    mask layout change from call to call, as over the prompts of an evaluation."""
    rnd = random.Random(seed)
    out: set[Shape] = set()
    while len(out) < n:
        heads_kv, group, head_dim, cs, dtype = MODELS[len(out) % len(MODELS)]
        len_kv = rnd.choice(
            [rnd.randint(1, cs - 1), rnd.randint(cs, 6 * cs), cs * rnd.randint(1, 4)]
        )
        causal = rnd.random() < 0.75
        len_q = rnd.choice([1, 1, rnd.randint(1, min(len_kv, 40)), len_kv if causal else 7])
        out.add(
            Shape(
                batch=rnd.randint(1, 3),
                heads_kv=heads_kv,
                group=group,
                len_q=min(len_q, len_kv) if causal else len_q,
                len_kv=len_kv,
                head_dim=head_dim,
                chunk_size=cs,
                causal=causal,
                per_head=heads_kv > 1 and rnd.random() < 0.4,
                dtype=dtype,
            )
        )
    return sorted(out, key=repr)


def _inputs(s: Shape, seed: int):
    q, k, v = make_qkv(
        s.batch, s.heads_q, s.heads_kv, s.len_q, s.len_kv, s.head_dim, seed=seed, dtype=s.dtype
    )
    keep = make_keep(s.batch, s.heads_kv if s.per_head else 1, s.n_chunks, seed=seed, density=0.6)
    return q, k, v, keep


def test_flex_sparse_attention_over_many_shapes():
    for i, s in enumerate(shapes(seed=0)):
        q, k, v, keep = _inputs(s, seed=i)
        out = lsa.sparse_attention(
            q, k, v, keep=keep, chunk_size=s.chunk_size, causal=s.causal,
            enable_gqa=s.group > 1, backend="flex",
        )  # fmt: skip
        allowed = visible_keys(
            keep, s.chunk_size, s.len_q, s.len_kv, causal=s.causal, heads_q=s.heads_q
        )
        attention_oracle(q, k, v, allowed).assert_close(out, what=f"flex, shape {i}: {s}")


def _reserve(s: Shape, keep: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seed: int):
    """The kept chunks of each row copied into shuffled slots of a reserve, plus one empty slot;
    the rest of the reserve is finite garbage (a leak shows)."""
    gen = torch.Generator().manual_seed(seed)
    h = keep.shape[1]
    n_slots = int(keep.sum(-1).max()) + 1
    table = torch.full((s.batch, h, n_slots), -1, dtype=torch.int32)
    rk = torch.full((s.batch, s.heads_kv, n_slots * s.chunk_size, s.head_dim), 7.0, dtype=k.dtype)
    rv = rk.clone()
    pad = s.n_chunks * s.chunk_size - s.len_kv
    kp = torch.nn.functional.pad(k, (0, 0, 0, pad))
    vp = torch.nn.functional.pad(v, (0, 0, 0, pad))
    for b in range(s.batch):
        for hh in range(h):
            chunks = keep[b, hh].nonzero().flatten()
            slots = torch.randperm(n_slots, generator=gen)[: len(chunks)]
            table[b, hh, slots] = chunks.to(torch.int32)
    for b in range(s.batch):
        for head in range(s.heads_kv):
            row = table[b, head if h > 1 else 0]
            for slot, c in enumerate(row.tolist()):
                if c >= 0:
                    dst = slice(slot * s.chunk_size, (slot + 1) * s.chunk_size)
                    src = slice(c * s.chunk_size, (c + 1) * s.chunk_size)
                    rk[b, head, dst] = kp[b, head, src]
                    rv[b, head, dst] = vp[b, head, src]
    return rk, rv, table


@pytest.mark.parametrize("backend", [b for b in available_reserve_backends() if b != "reference"])
def test_reserve_attention_over_many_shapes(backend):
    for i, s in enumerate(shapes(seed=1)):
        q, k, v, keep = _inputs(s, seed=100 + i)
        rk, rv, table = _reserve(s, keep, k, v, seed=i)
        kv_len = torch.full((s.batch,), s.len_kv, dtype=torch.int64)
        out = lsa.reserve_attention(
            q, rk, rv, table, kv_len, chunk_size=s.chunk_size, causal=s.causal,
            enable_gqa=s.group > 1, backend=backend,
        )  # fmt: skip
        allowed = visible_keys(
            keep, s.chunk_size, s.len_q, s.len_kv, causal=s.causal, heads_q=s.heads_q
        )
        attention_oracle(q, k, v, allowed).assert_close(out, what=f"{backend}, shape {i}: {s}")


def test_shapes_are_distinct_and_awkward():
    """The draw covers what it claims to (so the tests above cannot pass on easy shapes only)."""
    drawn = shapes(seed=0) + shapes(seed=1)
    assert len(set(shapes(seed=0))) == N_SHAPES
    assert any(s.len_kv < s.chunk_size and s.len_q > 1 for s in drawn)
    assert any(s.len_kv % s.chunk_size for s in drawn)
    assert any(s.len_q == 1 for s in drawn) and any(s.group == 3 for s in drawn)
    assert any(s.per_head and s.group > 1 for s in drawn)
    assert {s.chunk_size for s in drawn} == {16, 32, 64}


def test_flex_with_keys_shorter_than_one_chunk():
    """8 keys in a 16-token chunk, 8 queries: compiled CPU flex gave NaN / errors of 1.4 here."""
    q, k, v = make_qkv(1, 2, 2, 8, 8, 16, seed=3)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        qd, kd, vd = q.to(dtype), k.to(dtype), v.to(dtype)
        keep = torch.ones(1, 1, 1, dtype=torch.bool)
        out = lsa.sparse_attention(qd, kd, vd, keep=keep, chunk_size=16, backend="flex")
        attention_oracle(qd, kd, vd, visible_keys(keep, 16, 8, 8, causal=True)).assert_close(
            out, what=f"flex, 8 keys, {dtype}"
        )


def test_dynamo_recompile_limit_is_torch_default():
    """The tests above must meet the limit a user's process has (conftest must not raise it)."""
    assert torch._dynamo.config.recompile_limit == 8
