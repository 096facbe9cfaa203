"""The engine-independent serving core (lsa.vllm): block bookkeeping, lifecycle, decode attention.

A request's prompt and decode tokens are fed layer by layer as an engine would; after every decode
step, attention over the resident blocks is compared with sparse attention over the request's full
history with keep = the resident chunks (the reference backend), and with dense attention at
budget 1.0.
"""

import importlib.util

import pytest
import torch

import lsa
import lsa.vllm
from lsa.compiled.triton_decode import triton_supports
from lsa.scorers import IndexerConfig, LightningIndexer, RandomScorer, RecencyScorer
from lsa.vllm import DeviceBlockPool, LSARequestManager, PoolExhausted

LAYERS, H_KV, H_Q, CS, D, HIDDEN = 2, 2, 4, 4, 8, 16


def make(num_blocks=64, scorer=None, dtype=torch.float64, **kw):
    pool = DeviceBlockPool(
        num_blocks, layers=LAYERS, heads_kv=H_KV, block_size=CS, head_dim=D, dtype=dtype
    )
    scorer = scorer or RandomScorer(3, chunk_size=CS, target_layers=(0, 1))
    kw = {"budget": 0.3, "refresh_every": 3, "backend": "reference", **kw}
    return LSARequestManager(pool, scorer, **kw)


class Feed:
    """One request's true K/V history per layer, fed to the manager as an engine would."""

    def __init__(self, mgr, req_id, seed):
        self.mgr, self.req_id = mgr, req_id
        self.gen = torch.Generator().manual_seed(seed)
        self.dtype = mgr.pool.blocks.dtype
        self.k = [torch.zeros(H_KV, 0, D, dtype=self.dtype) for _ in range(LAYERS)]
        self.v = [t.clone() for t in self.k]
        mgr.add(req_id)

    def rand(self, *shape):
        return torch.randn(*shape, generator=self.gen, dtype=self.dtype)

    def hidden(self):
        return {layer: self.rand(HIDDEN) for layer in range(LAYERS)}

    def prefill(self, n):
        for layer in range(LAYERS):
            k, v = self.rand(H_KV, n, D), self.rand(H_KV, n, D)
            self.mgr.write(self.req_id, layer, k, v)
            self.k[layer] = torch.cat((self.k[layer], k), 1)
            self.v[layer] = torch.cat((self.v[layer], v), 1)
        return self.mgr.end_prefill(self.req_id, self.hidden())

    def step(self):
        """One decode step: per layer write the token and attend; returns [(got, q, keep)] per
        layer, ``keep`` = the resident chunks the attention read (before the step's refresh)."""
        outs = []
        for layer in range(LAYERS):
            k, v = self.rand(H_KV, 1, D), self.rand(H_KV, 1, D)
            self.mgr.write(self.req_id, layer, k, v)
            self.k[layer] = torch.cat((self.k[layer], k), 1)
            self.v[layer] = torch.cat((self.v[layer], v), 1)
            q = self.rand(1, H_Q, 1, D)
            outs.append((self.mgr.attend([self.req_id], layer, q), q, self.keep()))
        if self.mgr.end_step(self.req_id):
            self.mgr.refresh(self.req_id, self.hidden())
        return outs

    def keep(self):
        n = -(-self.k[0].shape[1] // CS)
        keep = torch.zeros(1, 1, n, dtype=torch.bool)
        keep[0, 0, sorted(self.mgr.requests[self.req_id].blocks)] = True
        return keep

    def expected(self, layer, q, keep):
        return lsa.sparse_attention(
            q,
            self.k[layer][None],
            self.v[layer][None],
            keep=keep,
            chunk_size=CS,
            enable_gqa=True,
            backend="reference",
        )


@pytest.mark.parametrize("prompt", [1, 4, 37])
def test_decode_equals_sparse_reference_over_resident_chunks(prompt):
    mgr = make()
    feed = Feed(mgr, "a", seed=prompt)
    feed.prefill(prompt)
    sparse_seen = False
    for _ in range(14):
        for layer, (got, q, keep) in enumerate(feed.step()):
            torch.testing.assert_close(got, feed.expected(layer, q, keep))
            sparse_seen |= not bool(keep.all())
    if prompt == 37:
        assert sparse_seen, "a 30% budget over 10+ chunks must leave chunks out"


def test_shipped_indexer_drives_refresh_and_triton_kernel_decodes():
    # A randomly initialised LightningIndexer (the shipped indexer's class) reads the captured
    # hidden states and the mirror's keys; decode runs the Triton kernel (Triton's interpreter on
    # CPU, see conftest.py).
    reason = triton_supports(torch.zeros(1, H_Q, 1, D), CS)
    if reason is not None:
        pytest.skip(reason)
    torch.manual_seed(0)
    config = IndexerConfig(
        hidden_size=HIDDEN,
        kv_heads=H_KV,
        kv_head_dim=D,
        target_layers=(0, 1),
        chunk_size=CS,
        n_heads=2,
        index_dim=16,
        q_rank=8,
        rope_dim=8,
        derotate_keys=False,
    )
    indexer = LightningIndexer(config).eval()
    mgr = make(scorer=indexer, dtype=torch.float32, backend="triton", budget=0.4)
    feed = Feed(mgr, "a", seed=8)
    first = feed.prefill(41)
    assert len(first.resident) < 11  # 10 completed chunks + the partial one, 40% kept
    with torch.no_grad():
        for _ in range(7):
            for layer, (got, q, keep) in enumerate(feed.step()):
                torch.testing.assert_close(got, feed.expected(layer, q, keep), rtol=2e-5, atol=2e-5)
    # The last refresh (step 6 of 7, every 3) saw 41 + 6 = 47 tokens: 11 completed chunks.
    assert [mgr.requests["a"].chunk_keys[layer].shape[1] for layer in (0, 1)] == [11, 11]


def test_full_budget_equals_dense_attention():
    mgr = make(budget=1.0)
    feed = Feed(mgr, "a", seed=7)
    feed.prefill(29)
    for _ in range(9):
        for layer, (got, q, keep) in enumerate(feed.step()):
            assert keep.all()
            want = lsa.dense_attention(q, feed.k[layer][None], feed.v[layer][None], enable_gqa=True)
            torch.testing.assert_close(got, want)


def test_mirror_holds_every_token_after_evictions():
    mgr = make(budget=2, sink_chunks=1, recent_chunks=0)
    feed = Feed(mgr, "a", seed=1)
    feed.prefill(23)
    for _ in range(11):
        feed.step()
    req = mgr.requests["a"]
    n = req.kv_len()
    assert len(req.blocks) < -(-n // CS)  # chunks were evicted from the device
    for layer in range(LAYERS):
        k, v = req.mirror.tokens(0, layer, n)
        torch.testing.assert_close(k, feed.k[layer], rtol=0, atol=0)
        torch.testing.assert_close(v, feed.v[layer], rtol=0, atol=0)


def test_refresh_recalls_and_evicts_the_right_blocks():
    # Recency ranks newer chunks higher: budget 3 = sink 0 + the two newest completed chunks.
    mgr = make(scorer=RecencyScorer(chunk_size=CS, target_layers=(0,)), budget=3, refresh_every=4)
    feed = Feed(mgr, "a", seed=2)
    first = feed.prefill(4 * CS + 2)  # 4 completed chunks, one partial
    assert first.resident == (0, 2, 3, 4) and first.evicted == ()
    assert first.recalled == (0, 2, 3, 4)
    for _ in range(3):
        feed.step()  # tokens 18..20: chunk 4 fills, chunk 5 begins and stays resident as tail
    assert sorted(mgr.requests["a"].blocks) == [0, 2, 3, 4, 5]
    feed.step()  # 4th step: refresh at kv_len 22 (5 completed chunks, partial chunk 5)
    req = mgr.requests["a"]
    assert sorted(req.blocks) == [0, 3, 4, 5]
    assert mgr.pool.num_free == mgr.pool.num_blocks - 4
    physical, logical = mgr.block_tables(["a"])
    assert logical.tolist() == [[0, 3, 4, 5]]
    assert physical.tolist() == [[req.blocks[c] for c in (0, 3, 4, 5)]]
    # The blocks hold exactly the mirror's chunks, all layers.
    for c, b in req.blocks.items():
        torch.testing.assert_close(mgr.pool.blocks[b], req.mirror.chunk(0, c))


def test_finish_frees_every_block():
    mgr = make()
    feed = Feed(mgr, "a", seed=3)
    feed.prefill(30)
    for _ in range(5):
        feed.step()
    assert mgr.pool.num_free < mgr.pool.num_blocks
    mgr.finish("a")
    assert mgr.pool.num_free == mgr.pool.num_blocks
    assert "a" not in mgr.requests
    with pytest.raises(KeyError, match="no active request 'a'"):
        mgr.attend(["a"], 0, torch.zeros(1, H_Q, 1, D, dtype=torch.float64))
    mgr.add("a")  # the id can be reused, with fresh state
    assert mgr.requests["a"].layer_len == [0] * LAYERS


def test_preempt_frees_blocks_and_resume_restores_the_same_attention():
    mgr = make()
    feed = Feed(mgr, "a", seed=4)
    feed.prefill(33)
    for _ in range(4):
        feed.step()
    resident = sorted(mgr.requests["a"].blocks)
    q = feed.rand(1, H_Q, 1, D)
    before = [mgr.attend(["a"], layer, q) for layer in range(LAYERS)]
    # Another request takes the freed blocks meanwhile, so resume must land elsewhere.
    mgr.preempt("a")
    assert mgr.pool.num_free == mgr.pool.num_blocks
    other = Feed(mgr, "b", seed=5)
    other.prefill(9)
    with pytest.raises(ValueError, match="preempted"):
        mgr.attend(["a"], 0, q)
    with pytest.raises(ValueError, match="preempted"):
        mgr.write("a", 0, q[0, :H_KV], q[0, :H_KV])
    mgr.resume("a")
    assert sorted(mgr.requests["a"].blocks) == resident
    for layer in range(LAYERS):
        torch.testing.assert_close(mgr.attend(["a"], layer, q), before[layer], rtol=0, atol=0)
    for _ in range(4):  # decoding goes on correctly after the resume
        for layer, (got, q, keep) in enumerate(feed.step()):
            torch.testing.assert_close(got, feed.expected(layer, q, keep))


def test_two_requests_never_share_state():
    mgr = make()
    a, b = Feed(mgr, "a", seed=10), Feed(mgr, "b", seed=11)
    a.prefill(21)
    b.prefill(42)
    for _ in range(7):
        a.step()
        b.step()
        blocks_a = set(mgr.requests["a"].blocks.values())
        blocks_b = set(mgr.requests["b"].blocks.values())
        assert not blocks_a & blocks_b
    # Batched decode of both equals each alone, and each equals its own reference.
    q = a.rand(2, H_Q, 1, D)
    for layer in range(LAYERS):
        both = mgr.attend(["a", "b"], layer, q)
        torch.testing.assert_close(both[:1], a.expected(layer, q[:1], a.keep()))
        torch.testing.assert_close(both[1:], b.expected(layer, q[1:], b.keep()))
    mgr.finish("a")
    for layer in range(LAYERS):
        torch.testing.assert_close(
            mgr.attend(["b"], layer, q[1:]), b.expected(layer, q[1:], b.keep())
        )


def test_exhausted_pool_raises_and_a_failed_refresh_changes_nothing():
    mgr = make(num_blocks=3, budget=1.0)
    feed = Feed(mgr, "a", seed=6)
    with pytest.raises(PoolExhausted, match="needs 2 more free blocks"):
        feed.prefill(5 * CS)  # 5 chunks resident at budget 1.0, the pool has 3 blocks
    req = mgr.requests["a"]
    assert not req.blocks and not req.placed and mgr.pool.num_free == 3


def test_bad_inputs_name_the_argument():
    mgr = make()
    mgr.add("a")
    with pytest.raises(ValueError, match="already active"):
        mgr.add("a")
    with pytest.raises(ValueError, match=r"k must be \[H_kv=2, n, D=8\]"):
        mgr.write("a", 0, torch.zeros(3, 1, D), torch.zeros(3, 1, D))
    with pytest.raises(ValueError, match="layer must be < 2"):
        mgr.write("a", 2, torch.zeros(H_KV, 1, D), torch.zeros(H_KV, 1, D))
    with pytest.raises(ValueError, match="still in prefill"):
        mgr.end_step("a")
    with pytest.raises(ValueError, match=r"requests \['a'\] are still in prefill"):
        mgr.attend(["a"], 0, torch.zeros(1, H_Q, 1, D, dtype=torch.float64))
    with pytest.raises(ValueError, match="no prompt tokens"):
        mgr.end_prefill("a", {0: torch.zeros(HIDDEN), 1: torch.zeros(HIDDEN)})
    mgr.write("a", 0, torch.zeros(H_KV, 2, D), torch.zeros(H_KV, 2, D))
    with pytest.raises(ValueError, match="layers hold different token counts"):
        mgr.end_prefill("a", {0: torch.zeros(HIDDEN), 1: torch.zeros(HIDDEN)})
    with pytest.raises(ValueError, match="must equal the pool's block_size"):
        make(scorer=RecencyScorer(chunk_size=CS * 2))
    with pytest.raises(ValueError, match="budget"):
        make(budget=None)
    with pytest.raises(ValueError, match="block 5 is not allocated"):
        mgr.pool.free([5])


def test_dense_baseline_names_the_extra_when_vllm_is_missing(tmp_path):
    from lsa.vllm import dense_baseline

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed here")
    with pytest.raises(ImportError, match=r"pip install 'lsa\[vllm\]'"):
        dense_baseline.main(["--out", str(tmp_path / "r.json"), "--context", "64"])
    assert not (tmp_path / "r.json").exists()


def test_dense_baseline_rejects_bad_sizes(tmp_path, capsys):
    from lsa.vllm import dense_baseline

    with pytest.raises(SystemExit):
        dense_baseline.parse_args(["--out", str(tmp_path / "r.json"), "--batch", "8", "0"])
    assert "--batch values must be >= 1, got [0]" in capsys.readouterr().err


def vllm_layout_cache(seed, lengths, num_blocks):
    """Rows' full K/V and a vLLM-layout cache [num_blocks, H_kv, CS, 2D] holding them in
    scattered blocks (written slot by slot as vLLM's slot_mapping does); returns the cache, each
    row's (k, v) [H_kv, T, D] and its chunk -> block map."""
    gen = torch.Generator().manual_seed(seed)
    cache = torch.randn(num_blocks, H_KV, CS, 2 * D, generator=gen)  # garbage outside the rows
    order = torch.randperm(num_blocks, generator=gen).tolist()
    rows = []
    for length in lengths:
        k, v = torch.randn(2, H_KV, length, D, generator=gen)
        blocks = [order.pop() for _ in range(-(-length // CS))]
        for pos in range(length):
            slot = blocks[pos // CS] * CS + pos % CS
            cache[slot // CS, :, slot % CS] = torch.cat((k[:, pos], v[:, pos]), dim=-1)
        rows.append((k, v, blocks))
    return cache, rows


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_paged_decode_over_resident_blocks_of_a_vllm_cache(backend):
    if backend == "triton" and triton_supports(torch.zeros(1, H_Q, 1, D), CS) is not None:
        pytest.skip(triton_supports(torch.zeros(1, H_Q, 1, D), CS))
    cache, rows = vllm_layout_cache(0, [37, 10], num_blocks=40)
    resident = [[0, 3, 5, 7, 9], [0, 2]]  # row 0: 10 chunks, a sparse set; row 1: all 3 chunks
    n = max(map(len, resident))
    physical = torch.full((2, n), -1, dtype=torch.int32)
    logical = torch.full((2, n), -1, dtype=torch.int32)
    for i, chunks in enumerate(resident):
        order = chunks[::-1]  # slot order must not matter
        logical[i, : len(order)] = torch.tensor(order)
        physical[i, : len(order)] = torch.tensor([rows[i][2][c] for c in order])
    q = torch.randn(2, H_Q, 1, D, generator=torch.Generator().manual_seed(1))
    got = lsa.vllm.paged_decode_attention(
        q, cache, physical, logical, torch.tensor([37, 10]), backend=backend
    )
    for i, (k, v, _) in enumerate(rows):
        keep = torch.zeros(1, 1, -(-k.shape[1] // CS), dtype=torch.bool)
        keep[0, 0, resident[i]] = True
        want = lsa.sparse_attention(
            q[i : i + 1], k[None], v[None], keep=keep, chunk_size=CS, enable_gqa=True
        )
        torch.testing.assert_close(got[i : i + 1], want, rtol=2e-5, atol=2e-5)
    with pytest.raises(ValueError, match="mark the same slots empty"):
        lsa.vllm.paged_decode_attention(
            q, cache, physical, torch.zeros_like(logical), torch.tensor([37, 10])
        )
    with pytest.raises(ValueError, match=r"2 \* D=16\] \(K and V packed\)"):
        lsa.vllm.paged_decode_attention(
            q, cache[..., :D], physical, logical, torch.tensor([37, 10])
        )


def test_paged_layout_is_vllms():
    pytest.importorskip("vllm")
    from vllm.v1.attention.backends.triton_attn import TritonAttentionBackend

    assert TritonAttentionBackend.get_kv_cache_shape(40, CS * 4, H_KV, D) == (
        40,
        H_KV,
        CS * 4,
        2 * D,
    )
